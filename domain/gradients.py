"""Training gradients of one shard, and the curvature fitted from every shard's partial statistics."""

import polars as pl
from torch import nn

from dataworth import Curvature, CurvatureStatistics, GradientLayout, LoGra, NonFiniteError, ProjectionConfig
from dataworth.adapters import lora_projection_config
from resources.codecs import frame_to_tensors, gradients_to_binary, tensors_to_frame

PCA_SEQUENCES = 256  # sequences of the statistics pass that fits PCA projections


def examples_of(sequences: pl.DataFrame) -> list[list[int]]:
    """token_shards rows -> token id lists, in row order."""
    return [list(ids) for ids in sequences["input_ids"].to_list()]


def pipeline_projection_config(config: ProjectionConfig, model: nn.Module, adapter: bool) -> ProjectionConfig:
    """The projection the pipeline makes: `[projection]` as set, or for a model with a LoRA adapter only the
    adapter's lora_A / lora_B layers, at rank_in / rank_out clipped to the adapter rank r (its `ranks`,
    `include` and `exclude` name base layers, which are then never tracked); seed, init and bias are kept."""
    if not adapter:
        return config
    return lora_projection_config(
        model, config.rank_in, config.rank_out, seed=config.seed, init=config.init, bias=config.bias
    )


def capture_shard(logra: LoGra, sequences: pl.DataFrame, fisher: str, hashes: dict[str, str], progress=None):
    """(projected_gradients rows, projected_gradients_statistics rows) of one shard's sequences.

    `sequences` are token_shards rows of one shard in seq_index order; `hashes` (projection_hash,
    model_hash) is stamped on every row. Empirical statistics come from the same pass as the gradients;
    sampled ones need a second pass with labels drawn from the model.
    """
    shard = sequences["shard_id"][0]
    examples = examples_of(sequences)
    stats = logra.new_statistics()
    try:
        gradients = logra.capture(examples, statistics=stats if fisher == "empirical" else None, progress=progress)
    except NonFiniteError as error:
        raise NonFiniteError(f"shard {shard} with model {hashes['model_hash'][:12]}: {error}") from None
    if fisher == "sampled":
        stats = logra.statistics(examples, fisher="sampled")
    rows = sequences.select("shard_id", "seq_id", "doc_id", "provider_id", "n_tokens").with_columns(
        gradient=gradients_to_binary(gradients), **{k: pl.lit(v) for k, v in hashes.items()}
    )
    return rows, tensors_to_frame(stats.to_tensors(), shard_id=shard, fisher=fisher, **hashes)


def fit_curvature(partials: pl.DataFrame, layout: GradientLayout, kind: str) -> tuple[Curvature, CurvatureStatistics]:
    """Merge the shards' partial statistics (projected_gradients_statistics rows) and fit `kind`."""
    merged = None
    for (shard,), part in partials.group_by("shard_id", maintain_order=True):
        try:
            stats = CurvatureStatistics.from_tensors(layout, frame_to_tensors(part))
        except NonFiniteError as error:
            raise NonFiniteError(
                f"projected_gradients_statistics of shard {shard}: {error} (re-materialize projected_gradients for it)"
            ) from None
        merged = stats if merged is None else merged.merge(stats)
    return Curvature.fit(merged, kind), merged
