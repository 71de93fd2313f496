"""Scoring a valuation: the one function that turns stored gradients and factors into influence.

`influence_scores` runs it on the current table versions; `dataworth audit --verify` runs it again on
the versions a valuation recorded, for a sample of its queries. Every read is pinned to `versions`.
Training rows are scored shard by shard in `seq_id` order; each shard's gradients are read with their
ids, and the ids are checked against the order the group codes were built from.

Scoring can be split: `shard_groups` cuts the sorted shards into contiguous groups, each scored on its
own (any worker), written to `influence_partials` (`partial_frame`) and merged exactly (`merge_partials`:
top-k of the top-k's, sums add), as one stream over every shard would give up to float64 rounding.
"""

import json
import time
from dataclasses import dataclass

import polars as pl
import torch

from dataworth import Curvature, CurvatureConfig, InfluenceResult, InfluenceScorer, MismatchError, merge_results
from domain.artifacts import latest_row, load_projection, require_single
from domain.gradients import stored_gradients
from domain.settings import Settings
from domain.staging import shard_groups
from resources.codecs import binary_to_gradients, frame_to_tensors, tensors_to_frame
from resources.delta import DeltaStore

# Every table a valuation reads, in lineage order: their versions are its provenance.
VALUATION_INPUTS = (
    "training_corpus",
    "token_shards",
    "model_checkpoint",
    "gradient_projection",
    "projected_gradients",
    "projected_gradients_statistics",
    "hessian_factors",
    "valuation_queries",
)
ROW_COLUMNS = ["shard_id", "seq_id", "doc_id", "provider_id"]
PARTIALS = "influence_partials"  # one scored group of shards per (valuation_id, part): see `partial_frame`
PARTIALS_EMPTY = pl.DataFrame(
    schema={"part": pl.String, "shards": pl.List(pl.String), "rows": pl.Int64, "queries": pl.Int64}
)


@dataclass
class ScoredValuation:
    """Influence of every training row on every (picked) query, aggregated as the scorer keeps it."""

    query_ids: list[str]  # (Q,) in the order of the result's query axis
    rows: pl.DataFrame  # (N,) shard_id, seq_id, doc_id, provider_id: row i of the training stream
    docs: list[str]  # group ids of result.group_sums["doc"]
    providers: list[str]  # group ids of result.group_sums["provider"]
    result: InfluenceResult
    seconds: float  # wall time of the streaming product


def score_valuation(
    delta: DeltaStore,
    versions: dict[str, int | None],
    shards: list[str],
    curvature: CurvatureConfig,
    *,
    normalize: str,
    top_k: int,
    block_rows: int,
    query_ids: list[str] | None = None,
    readers: int = 1,
) -> ScoredValuation:
    """Score the training gradients of `shards` against the queries (all, or `query_ids`) at `versions`,
    reading `readers` shards ahead (`stored_gradients`)."""
    projection, projection_row = load_projection(delta, version=versions["gradient_projection"])
    queries = delta.read("valuation_queries", version=versions["valuation_queries"]).sort("query_id")
    if query_ids is not None:
        queries = queries.filter(pl.col("query_id").is_in(query_ids))
    require_single(queries, "projection_hash", projection_row["projection_hash"], "query gradients")
    require_single(queries, "model_hash", projection_row["model_hash"], "query gradients")
    factors = delta.read("hessian_factors", version=versions["hessian_factors"])
    require_single(factors, "projection_hash", projection_row["projection_hash"], "Hessian factors")
    require_single(factors, "kind", curvature.kind, "Hessian factors")
    fitted = Curvature.from_tensors(curvature.kind, projection.layout, frame_to_tensors(factors))
    scorer = InfluenceScorer(binary_to_gradients(queries["gradient"]), fitted.preconditioner(curvature), normalize)

    rows = training_rows(delta, versions, shards, projection_row)
    docs = rows["doc_id"].unique(maintain_order=True)
    providers = rows["provider_id"].unique(maintain_order=True)
    codes = {"doc": codes_of(rows["doc_id"], docs), "provider": codes_of(rows["provider_id"], providers)}

    def blocks():
        offset = 0
        for shard, seq_ids, gradients in stored_gradients(delta, shards, versions["projected_gradients"], readers):
            if seq_ids != rows["seq_id"][offset : offset + len(seq_ids)].to_list():
                raise MismatchError(f"projected_gradients of shard {shard} changed while it was scored; score again")
            offset += len(seq_ids)
            yield from gradients.split(block_rows)

    started = time.perf_counter()
    result = scorer.stream(blocks(), top_k=top_k, groups=codes)
    return ScoredValuation(
        queries["query_id"].to_list(), rows, docs.to_list(), providers.to_list(), result, time.perf_counter() - started
    )


def training_rows(delta: DeltaStore, versions: dict[str, int | None], shards: list[str], hashes: dict) -> pl.DataFrame:
    """ROW_COLUMNS of every stored gradient of `shards` at `versions`, sorted by shard and seq_id: the order
    of the training stream. Refuses shards without gradients, or gradients of another projection or model
    than `hashes` names (projection_hash, model_hash: a gradient_projection row, or a valuation's provenance)."""
    stored = delta.read(
        "projected_gradients",
        version=versions["projected_gradients"],
        where={"shard_id": shards},
        columns=[*ROW_COLUMNS, "projection_hash", "model_hash"],
    ).sort("shard_id", "seq_id")
    missing = sorted(set(shards) - set(stored["shard_id"].unique().to_list()))
    if missing:
        raise MismatchError(
            f"{len(missing)} shard(s) have no gradients yet ({missing[:5]}); materialize projected_gradients for them"
        )
    require_single(stored, "projection_hash", hashes["projection_hash"], "training gradients")
    require_single(stored, "model_hash", hashes["model_hash"], "training gradients")
    return stored.select(ROW_COLUMNS)


def codes_of(ids: pl.Series, groups: pl.Series) -> torch.Tensor:
    """(N,) int64: the position of each id in `groups`."""
    return torch.tensor(ids.replace_strict(groups, range(len(groups)), return_dtype=pl.Int64).to_numpy())


def valuation_provenance(
    delta: DeltaStore, versions: dict[str, int | None], shards: list[str], settings: Settings, code_version: str
) -> dict:
    """What a valuation is a function of: table versions, model and projection hashes, the settings that
    change scores, the shards and the code version. `valuation_id` hashes it, so every scoring worker that
    reads the same versions names the same valuation."""
    projection_row = latest_row(delta, "gradient_projection", versions["gradient_projection"])
    data = settings.to_dict()
    return {
        "tables": versions,
        "model_hash": projection_row["model_hash"],
        "projection_hash": projection_row["projection_hash"],
        "projection": json.loads(projection_row["config"]),
        "curvature": data["curvature"],
        "scores": data["scores"],
        "queries": data["queries"],
        "shards": shards,
        "code_version": code_version,
    }


def partial_frame(vid: str, part: int, shards: list[str], scored: ScoredValuation) -> pl.DataFrame:
    """Group `part` (its `shards`) scored, as influence_partials rows: its result's tensors (top_scores,
    top_indices local to the part, example_totals, doc_sums, provider_sums) as float64, keyed by valuation
    and part."""
    result = scored.result
    tensors = {
        "top_scores": result.top_scores,
        "top_indices": result.top_indices,
        "example_totals": result.example_totals,
        "doc_sums": result.group_sums["doc"],
        "provider_sums": result.group_sums["provider"],
    }
    tensors = {name: tensor.double() for name, tensor in tensors.items()}
    frame = tensors_to_frame(tensors, valuation_id=vid, part=f"{part:04d}")
    return frame.with_columns(
        shards=pl.Series([shards] * frame.height, dtype=pl.List(pl.String)),
        rows=pl.lit(scored.rows.height, dtype=pl.Int64),
        queries=pl.lit(len(scored.query_ids), dtype=pl.Int64),
        seconds=pl.lit(scored.seconds, dtype=pl.Float64),
    )


def merge_partials(delta: DeltaStore, vid: str, provenance: dict, parts: int, top_k: int) -> ScoredValuation:
    """The valuation `vid` scored in `parts` groups (`shard_groups` of its shards), merged from the
    influence_partials rows its workers wrote; `seconds` is the sum of the workers' seconds."""
    versions, shards = provenance["tables"], provenance["shards"]
    rows = training_rows(delta, versions, shards, provenance)  # the provenance names both hashes
    query_ids = delta.read("valuation_queries", version=versions["valuation_queries"], columns=["query_id"])
    query_ids = sorted(query_ids["query_id"].to_list())
    stored = delta.read(PARTIALS, where={"valuation_id": vid}) if delta.exists(PARTIALS) else PARTIALS_EMPTY
    docs = rows["doc_id"].unique(maintain_order=True)
    providers = rows["provider_id"].unique(maintain_order=True)
    results, doc_codes, provider_codes, seconds = [], [], [], 0.0
    for part, group in enumerate(shard_groups(shards, parts)):
        if not group:
            continue
        frame = stored.filter(pl.col("part") == f"{part:04d}")
        part_rows = rows.filter(pl.col("shard_id").is_in(group))
        if frame.select("shards", "rows", "queries").unique().rows() != [(group, part_rows.height, len(query_ids))]:
            raise MismatchError(
                f"influence_partials holds no complete scores of part {part} (shards {group[0]}..{group[-1]}) of "
                f"valuation {vid}: its scoring step failed or did not run, an input table changed while it ran, "
                "or `[deployment] scoring_workers` changed during the run; materialize influence_scores again"
            )
        tensors = frame_to_tensors(frame)
        part_docs = part_rows["doc_id"].unique(maintain_order=True)
        part_providers = part_rows["provider_id"].unique(maintain_order=True)
        results.append(
            InfluenceResult(
                top_scores=tensors["top_scores"].float(),
                top_indices=tensors["top_indices"].long(),
                example_totals=tensors["example_totals"],
                group_sums={"doc": tensors["doc_sums"], "provider": tensors["provider_sums"]},
            )
        )
        doc_codes.append(codes_of(part_docs, docs))
        provider_codes.append(codes_of(part_providers, providers))
        seconds += float(frame["seconds"][0])
    result = merge_results(results, top_k=top_k, group_codes={"doc": doc_codes, "provider": provider_codes})
    return ScoredValuation(query_ids, rows, docs.to_list(), providers.to_list(), result, seconds)
