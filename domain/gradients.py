"""Training gradients of one shard, and the curvature fitted from every shard's partial statistics."""

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import polars as pl
from torch import nn

from dataworth import (
    ConfigError,
    Curvature,
    CurvatureStatistics,
    GradientLayout,
    LoGra,
    NonFiniteError,
    ProjectionConfig,
    Task,
    batch_shared_layers,
    find_layers,
    tied_layers,
)
from dataworth.adapters import lora_projection_config
from dataworth.projection import input_width, requested_ranks
from domain.settings import Settings
from resources.codecs import frame_gradients, frame_to_tensors, gradients_to_binary, tensors_to_frame
from resources.delta import DeltaStore

PCA_SEQUENCES = 256  # sequences of the statistics pass that fits PCA projections
SAMPLED_BLOCK_LIMIT = 4096  # widest layer whose (D_l x D_l) second moment a shard keeps: 128 MiB in float64


def pipeline_logra(model: nn.Module, task: Task, settings: Settings, **projection) -> LoGra:
    """LoGra with the settings' capture batch size and activation checkpointing; `projection` is either
    config (+ pca_examples) or projection, as `LoGra` takes them."""
    return LoGra(
        model,
        task,
        **projection,
        batch_size=settings.capture_batch_size,
        checkpoint_blocks=settings.checkpoint_blocks,
    )


def examples_of(sequences: pl.DataFrame) -> list[list[int]]:
    """token_shards rows -> token id lists, in row order."""
    return [list(ids) for ids in sequences["input_ids"].to_list()]


def pipeline_projection_config(config: ProjectionConfig, model: nn.Module, adapter: bool) -> ProjectionConfig:
    """The projection the pipeline makes for `model`. Without an adapter: `[projection]` as set, except that a
    rank wider than its layer is cut to the layer's width, an embedding whose input is shared by the whole batch
    (GPT-2's position embedding) is not tracked and, with shared_weights = "refuse", neither is a layer whose
    weight is tied to another module (lm_head and the input embedding), each recorded as an exact `ranks` /
    `exclude` entry. With a LoRA adapter: only its lora_A / lora_B layers, at
    rank_in / rank_out clipped to the adapter rank r (`ranks`, `include` and `exclude` name base layers,
    which are then never tracked); seed, init and bias are kept."""
    if adapter:
        return lora_projection_config(
            model, config.rank_in, config.rank_out, seed=config.seed, init=config.init, bias=config.bias
        )
    if config.shared_weights == "refuse":  # leave tied layers out rather than fail
        tied = tied_layers(model)
        candidates = find_layers(model, config.include, config.exclude, config.embeddings, shared_weights="module_use")
        config = replace(config, exclude=(*config.exclude, *(n for n in candidates if n in tied)))
    if config.embeddings:  # position embeddings: one input row for the whole batch
        found = find_layers(model, config.include, config.exclude, True, shared_weights="module_use")
        shared = batch_shared_layers(model, [n for n, spec in found.items() if spec.kind == "embedding"])
        config = replace(config, exclude=(*config.exclude, *shared))
    if config.init == "identity":
        return config
    clipped = {}
    layers = find_layers(model, config.include, config.exclude, config.embeddings, config.shared_weights)
    for name, spec in layers.items():
        k_in, k_out = requested_ranks(spec, config)
        n_in = input_width(spec, config)
        if k_in > n_in or k_out > spec.n_out:
            clipped[name] = (min(k_in, n_in), min(k_out, spec.n_out))
    if not clipped:
        return config
    return replace(config, ranks=clipped | {p: r for p, r in config.ranks.items() if p not in clipped})  # first match


def capture_shard(
    logra: LoGra,
    sequences: pl.DataFrame,
    fisher: str,
    hashes: dict[str, str],
    progress=None,
    gradient_dtype: str = "float32",
):
    """(projected_gradients rows, projected_gradients_statistics rows) of one shard's sequences.

    `sequences` are token_shards rows of one shard in seq_index order; `hashes` (projection_hash,
    model_hash) is stamped on every row; gradients are stored as `gradient_dtype` blobs (resources.codecs),
    the statistics are taken before that rounding. Empirical statistics come from the same pass as the gradients and
    leave the (D_l x D_l) second moments to `fit_curvature`'s pass over the stored gradients; sampled ones
    need a second pass with labels drawn from the model, and keep their second moments.
    """
    shard = sequences["shard_id"][0]
    widest = max(b.size for b in logra.projection.layout.blocks)
    if fisher == "sampled" and widest > SAMPLED_BLOCK_LIMIT:
        wide = [b.name for b in logra.projection.layout.blocks if b.size > SAMPLED_BLOCK_LIMIT]
        raise ConfigError(
            f'[curvature] fisher = "sampled" keeps every layer\'s (D_l x D_l) second moment per shard; layers {wide} '
            f"project to more than {SAMPLED_BLOCK_LIMIT} dimensions (up to {widest}: {widest**2 * 8 / 2**30:.1f} GiB "
            'per shard); set fisher = "empirical", or lower their [projection] ranks'
        )
    examples = examples_of(sequences)
    stats = logra.new_statistics(second_moment=False)
    try:
        gradients = logra.capture(examples, statistics=stats if fisher == "empirical" else None, progress=progress)
    except NonFiniteError as error:
        raise NonFiniteError(f"shard {shard} with model {hashes['model_hash'][:12]}: {error}") from None
    if fisher == "sampled":
        stats = logra.statistics(examples, fisher="sampled")
    rows = sequences.select("shard_id", "seq_id", "doc_id", "provider_id", "n_tokens").with_columns(
        gradient=gradients_to_binary(gradients, gradient_dtype),
        gradient_dtype=pl.lit(gradient_dtype),
        **{k: pl.lit(v) for k, v in hashes.items()},
    )
    return rows, tensors_to_frame(stats.to_tensors(), shard_id=shard, fisher=fisher, **hashes)


def stored_gradients(delta: DeltaStore, shards: list[str], version: int | None, readers: int = 1):
    """(shard, seq_ids, (n, D) float32 gradients) of each of `shards` in projected_gradients at `version`:
    shards in sorted order, rows by seq_id. With `readers` > 1 the next `readers` shards are read and
    decoded in background threads while the caller uses the current one (reads from object storage
    overlap with scoring); order and values are the same, and at most `readers` + 1 shards are in memory."""

    def read(shard: str):  # every column: `gradient_dtype` is absent from tables written before it existed
        part = delta.read("projected_gradients", version=version, where={"shard_id": shard}).sort("seq_id")
        return shard, part["seq_id"].to_list(), frame_gradients(part)

    ordered = sorted(shards)
    if readers <= 1:
        yield from map(read, ordered)
        return
    pool = ThreadPoolExecutor(readers, thread_name_prefix="shard-reader")
    try:
        ahead = deque(pool.submit(read, shard) for shard in ordered[:readers])
        for shard in ordered[readers:]:
            current = ahead.popleft().result()
            ahead.append(pool.submit(read, shard))
            yield current
        while ahead:
            yield ahead.popleft().result()
    finally:  # also when the caller stops early: queued reads are dropped
        pool.shutdown(wait=True, cancel_futures=True)


def fit_curvature(
    partials: pl.DataFrame, layout: GradientLayout, kind: str, gradients=None
) -> tuple[Curvature, CurvatureStatistics]:
    """Merge the shards' partial statistics (projected_gradients_statistics rows) and fit `kind`. With
    `gradients` ((B, D) blocks of the same examples, the empirical Fisher), raw and EK-FAC take their second
    moments from one pass over them, and any stored second moments (older shards) are ignored."""
    merged = None
    for (shard,), part in partials.group_by("shard_id", maintain_order=True):
        if gradients is not None:
            part = part.filter(~pl.col("name").str.ends_with("|second_moment"))
        try:
            stats = CurvatureStatistics.from_tensors(layout, frame_to_tensors(part))
        except NonFiniteError as error:
            raise NonFiniteError(
                f"projected_gradients_statistics of shard {shard}: {error} (re-materialize projected_gradients for it)"
            ) from None
        merged = stats if merged is None else merged.merge(stats)
    return Curvature.fit(merged, kind, gradients), merged
