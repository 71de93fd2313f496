"""Scoring a valuation: the one function that turns stored gradients and factors into influence.

`influence_scores` runs it on the current table versions; `dataworth audit --verify` runs it again on
the versions a valuation recorded, for a sample of its queries. Every read is pinned to `versions`.
Training rows are scored shard by shard in `seq_id` order; each shard's gradients are read with their
ids, and the ids are checked against the order the group codes were built from.
"""

import time
from dataclasses import dataclass

import polars as pl
import torch

from dataworth import Curvature, CurvatureConfig, InfluenceResult, InfluenceScorer, MismatchError
from domain.artifacts import load_projection, require_single
from domain.gradients import stored_gradients
from resources.codecs import binary_to_gradients, frame_to_tensors
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
    model_hash = projection_row["model_hash"]
    queries = delta.read("valuation_queries", version=versions["valuation_queries"]).sort("query_id")
    if query_ids is not None:
        queries = queries.filter(pl.col("query_id").is_in(query_ids))
    require_single(queries, "projection_hash", projection_row["projection_hash"], "query gradients")
    require_single(queries, "model_hash", model_hash, "query gradients")
    factors = delta.read("hessian_factors", version=versions["hessian_factors"])
    require_single(factors, "projection_hash", projection_row["projection_hash"], "Hessian factors")
    require_single(factors, "kind", curvature.kind, "Hessian factors")
    fitted = Curvature.from_tensors(curvature.kind, projection.layout, frame_to_tensors(factors))
    scorer = InfluenceScorer(binary_to_gradients(queries["gradient"]), fitted.preconditioner(curvature), normalize)

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
    require_single(stored, "projection_hash", projection_row["projection_hash"], "training gradients")
    require_single(stored, "model_hash", model_hash, "training gradients")
    rows = stored.select(ROW_COLUMNS)
    docs = rows["doc_id"].unique(maintain_order=True)
    providers = rows["provider_id"].unique(maintain_order=True)
    codes = {
        "doc": torch.tensor(rows["doc_id"].replace_strict(docs, range(len(docs)), return_dtype=pl.Int64).to_numpy()),
        "provider": torch.tensor(
            rows["provider_id"].replace_strict(providers, range(len(providers)), return_dtype=pl.Int64).to_numpy()
        ),
    }

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
