"""Per-provider valuation from provider x query influence sums, with a bootstrap over queries.

For provider p and query q, V[p, q] is the sum of the influence scores of p's training sequences on
q (units: change of q's completion loss, in nats, per unit up-weighting, first order).
    total_value    = sum_q V[p, q]
    positive_value = sum_q max(V[p, q], 0)
    share          = positive_value / sum over providers of positive_value
    value_per_token = total_value / tokens of p
    [ci_low, ci_high] = 2.5% / 97.5% quantiles of total_value over queries resampled with replacement
"""

import hashlib
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from domain.scoring import ScoredValuation  # noqa: E402
from resources.delta import DeltaStore  # noqa: E402

SCORE_SCHEMA = {
    "valuation_id": pl.String,
    "query_id": pl.String,
    "kind": pl.String,
    "rank": pl.Int64,
    "seq_id": pl.String,
    "doc_id": pl.String,
    "provider_id": pl.String,
    "score": pl.Float64,
}


def valuation_id(provenance: dict) -> str:
    """Deterministic id of a valuation: same inputs and settings, same id."""
    return "v-" + hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]


def provider_table(
    values: np.ndarray,
    providers: list[str],
    documents: dict[str, int],
    tokens: dict[str, int],
    *,
    bootstrap_samples: int,
    seed: int,
) -> pl.DataFrame:
    """values: (P, Q) provider x query sums -> one row per provider, sorted by total value."""
    n_queries = values.shape[1]
    totals = values.sum(1)
    positive = np.clip(values, 0, None).sum(1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_queries, size=(bootstrap_samples, n_queries))  # (S, Q) query resamples
    resampled = values[:, picks].sum(2) * 1.0  # (P, S) totals over each resample of Q queries
    low, high = np.quantile(resampled, [0.025, 0.975], axis=1)
    positive_sum = positive.sum()
    frame = pl.DataFrame(
        {
            "provider_id": providers,
            "total_value": totals,
            "positive_value": positive,
            "share": positive / positive_sum if positive_sum > 0 else np.zeros_like(positive),
            "documents": [documents.get(p, 0) for p in providers],
            "tokens": [tokens.get(p, 0) for p in providers],
            "ci_low": low,
            "ci_high": high,
        },
        schema_overrides={"documents": pl.Int64, "tokens": pl.Int64},
    )
    frame = frame.with_columns(
        value_per_token=pl.when(pl.col("tokens") > 0).then(pl.col("total_value") / pl.col("tokens")).otherwise(0.0)
    )
    return frame.sort("total_value", descending=True)


def provider_chart(table: pl.DataFrame, title: str):
    """Horizontal bars of total value per provider with the bootstrap interval; a matplotlib Figure."""
    table = table.sort("total_value")
    fig, ax = plt.subplots(figsize=(7, 0.4 * table.height + 1.5))
    totals = table["total_value"].to_numpy()
    errors = np.vstack([totals - table["ci_low"].to_numpy(), table["ci_high"].to_numpy() - totals]).clip(0)
    ax.barh(table["provider_id"].to_list(), totals, xerr=errors, color="#3b7dd8", ecolor="#333333", capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("total influence on the queries' completions (sum of scores)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def score_rows(vid: str, scored: ScoredValuation, top_k: int) -> pl.DataFrame:
    """The influence_scores table: top sequences and documents per query, document totals, provider x query sums."""
    result, docs = scored.result, scored.docs
    seq_ids, seq_docs, seq_providers = (scored.rows[c].to_list() for c in ("seq_id", "doc_id", "provider_id"))
    doc_provider = dict(zip(seq_docs, seq_providers))
    out = []
    for q, query_id in enumerate(scored.query_ids):
        for rank, (score, index) in enumerate(zip(result.top_scores[q].tolist(), result.top_indices[q].tolist())):
            out.append(
                (vid, query_id, "top_sequence", rank + 1, seq_ids[index], seq_docs[index], seq_providers[index], score)
            )
        top = result.group_sums["doc"][:, q].topk(min(top_k, len(docs)))
        for rank, (score, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            out.append((vid, query_id, "top_document", rank + 1, None, docs[index], doc_provider[docs[index]], score))
        for p, provider in enumerate(scored.providers):
            out.append(
                (
                    vid,
                    query_id,
                    "provider_query",
                    None,
                    None,
                    None,
                    provider,
                    float(result.group_sums["provider"][p, q]),
                )
            )
    for d, total in enumerate(result.group_sums["doc"].sum(1).tolist()):
        out.append((vid, None, "document_total", None, None, docs[d], doc_provider[docs[d]], total))
    return pl.DataFrame(out, schema=SCORE_SCHEMA, orient="row")


def provider_valuation(
    delta: DeltaStore, vid: str, provenance: dict, *, bootstrap_samples: int, seed: int
) -> pl.DataFrame:
    """`provider_table` of valuation `vid` from its provider x query sums and the token_shards it read."""
    sums = delta.read("influence_scores", where={"valuation_id": vid, "kind": "provider_query"})
    matrix = sums.pivot(on="query_id", index="provider_id", values="score", sort_columns=True).sort("provider_id")
    seqs = delta.read(
        "token_shards",
        version=provenance["tables"]["token_shards"],
        where={"shard_id": provenance["shards"]},
        columns=["provider_id", "doc_id", "n_tokens"],
    )
    per_provider = seqs.group_by("provider_id").agg(
        documents=pl.col("doc_id").n_unique(), tokens=pl.col("n_tokens").sum()
    )
    return provider_table(
        matrix.drop("provider_id").fill_null(0).to_numpy(),
        matrix["provider_id"].to_list(),
        dict(per_provider.select("provider_id", "documents").iter_rows()),
        dict(per_provider.select("provider_id", "tokens").iter_rows()),
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )


def tracking_params(vid: str, provenance: dict, queries: int) -> dict:
    """The MLflow params of a valuation: projection ranks, init, seed, Hessian, damping, hashes."""
    projection, curvature = provenance["projection"], provenance["curvature"]
    return {
        "valuation_id": vid,
        "rank_in": projection["rank_in"],
        "rank_out": projection["rank_out"],
        "projection_ranks": projection["ranks"],
        "projection_init": projection["init"],
        "projection_seed": projection["seed"],
        "modules_include": projection["include"],
        "modules_exclude": projection["exclude"],
        "hessian": curvature["kind"],
        "fisher": curvature["fisher"],
        "damping": curvature["damping"],
        "damping_mode": curvature["damping_mode"],
        "normalize": provenance["scores"]["normalize"],
        "model_hash": provenance["model_hash"],
        "projection_hash": provenance["projection_hash"],
        "corpus_version": provenance["tables"]["training_corpus"],
        "queries": queries,
    }
