"""Per-provider value in nats of query loss, with honest uncertainty.

The unit. The model minimises the mean training loss over N training rows, and the engine's curvature H is
the per-example mean Fisher (dataworth/statistics.py divides its sums by the examples). Removing row i moves
the parameters by (1/N) H^-1 g_i (first order), so it changes query q's loss L_q (the summed NLL of its
completion tokens, nats) by g_q^T (H + lambda)^-1 g_i / N = score(i, q) / N. With V[p, q] the sum of the
scores of provider p's rows on query q (influence_scores, kind provider_query):

    effect[p, q]      = V[p, q] / N        predicted rise of L_q if p's rows were removed (nats)
    value_nats        = mean_q effect[p, q]  predicted rise of the MEAN query loss if p were removed
    value_relative    = value_nats / mean_q L_q   (the same, as a fraction of the current mean query loss)
    value_nats_per_token = mean_q effect[p, q] / completion tokens of q  (rise of the per-token loss)
    share             = value_nats / sum over providers of |value_nats|  (signed; |shares| add up to 1)
    value_per_training_token = value_nats / training tokens of p

A positive value means the provider's data lowers the query loss (removing it would hurt). The unit holds
for `normalize = "none"`; with "relatif"/"cosine" scores the columns keep these names but are not nats.
It is first order in the tracked parameters, seen through the projection: layers left out (lm_head by default)
and the directions a low-rank projection drops carry part of the effect too, so the value is an under-estimate
(benchmarks/RESULTS.md measures how much).

Two kinds of spread, kept apart:
    [ci_low, ci_high]  95% percentile bootstrap over queries of value_nats: the estimator's uncertainty
                       about the mean over queries like these. `verdict` is "helps" / "hurts" only when the
                       interval excludes 0, else "not distinguishable from 0".
    queries_helped, query_p10, query_p90  real disagreement between queries: the fraction of queries whose
                       loss the provider lowers, and the 10% / 90% quantiles of effect[p, q] over queries.
"""

import hashlib
import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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
HELPS, HURTS, UNCLEAR = "helps", "hurts", "not distinguishable from 0"
VERDICTS = (HELPS, UNCLEAR, HURTS)  # also the display order
UNSAFE_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")
VALUE_LABEL = "predicted rise of mean query loss if removed (nats)"


def valuation_id(provenance: dict) -> str:
    """Deterministic id of a valuation: same inputs and settings, same id."""
    return "v-" + hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]


def provider_table(
    values: np.ndarray,
    providers: list[str],
    documents: dict[str, int],
    tokens: dict[str, int],
    *,
    training_rows: int,
    query_losses: np.ndarray,
    completion_tokens: np.ndarray,
    bootstrap_samples: int,
    seed: int,
    level: float = 0.95,
) -> pl.DataFrame:
    """values: (P, Q) provider x query score sums -> one row per provider (module docstring), ordered
    helps / not distinguishable / hurts, each by value_nats descending."""
    values = np.asarray(values, dtype=np.float64)
    n_providers, n_queries = values.shape
    if n_queries == 0:
        raise ValueError("provider_table needs at least one query")
    effect = values / max(int(training_rows), 1)  # (P, Q) nats
    losses = np.asarray(query_losses, dtype=np.float64)  # (Q,)
    counts = np.asarray(completion_tokens, dtype=np.float64)  # (Q,)
    value = effect.mean(1)
    per_token = np.where(counts > 0, effect / np.maximum(counts, 1), 0.0)[:, counts > 0]
    mean_loss = float(losses.mean())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_queries, size=(bootstrap_samples, n_queries))  # (S, Q) query resamples
    resampled = effect[:, picks].mean(2)  # (P, S) means over each resample of Q queries
    low, high = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2], axis=1)
    low, high = np.minimum(low, value), np.maximum(high, value)  # a mean outside its interval is rounding
    magnitude = np.abs(value).sum()
    verdict = np.where(low > 0, HELPS, np.where(high < 0, HURTS, UNCLEAR))
    p10, p90 = np.quantile(effect, [0.1, 0.9], axis=1)
    frame = pl.DataFrame(
        {
            "provider_id": providers,
            "value_nats": value,
            "value_relative": value / mean_loss if mean_loss > 0 else np.zeros(n_providers),
            "value_nats_per_token": per_token.mean(1) if per_token.shape[1] else np.zeros(n_providers),
            "share": value / magnitude if magnitude > 0 else np.zeros(n_providers),
            "ci_low": low,
            "ci_high": high,
            "verdict": verdict.tolist(),
            "queries_helped": (effect > 0).mean(1),
            "query_p10": p10,
            "query_p90": p90,
            "documents": [documents.get(p, 0) for p in providers],
            "tokens": [tokens.get(p, 0) for p in providers],
            "queries": [n_queries] * n_providers,
            "training_rows": [int(training_rows)] * n_providers,
            "mean_query_loss": [mean_loss] * n_providers,
        },
        schema_overrides={"documents": pl.Int64, "tokens": pl.Int64, "queries": pl.Int64, "training_rows": pl.Int64},
    )
    frame = frame.with_columns(
        value_per_training_token=pl.when(pl.col("tokens") > 0)
        .then(pl.col("value_nats") / pl.col("tokens"))
        .otherwise(0.0)
    )
    order = pl.col("verdict").replace_strict(VERDICTS, range(len(VERDICTS)), return_dtype=pl.Int64)
    return frame.sort(order, -pl.col("value_nats"))


def group_table(
    values: np.ndarray,
    providers: list[str],
    query_groups: list[str | None],
    *,
    training_rows: int,
    query_losses: np.ndarray,
    completion_tokens: np.ndarray,
    bootstrap_samples: int,
    seed: int,
) -> pl.DataFrame:
    """`provider_table` of each query group (queries without a group are left out), stacked with a
    query_group column; empty when no query has a group."""
    values, losses, counts = np.asarray(values), np.asarray(query_losses), np.asarray(completion_tokens)
    parts = []
    for group in sorted({g for g in query_groups if g is not None}):
        keep = np.array([g == group for g in query_groups])
        table = provider_table(
            values[:, keep],
            providers,
            {},
            {},
            training_rows=training_rows,
            query_losses=losses[keep],
            completion_tokens=counts[keep],
            bootstrap_samples=bootstrap_samples,
            seed=seed,
        )
        parts.append(table.select(pl.lit(group).alias("query_group"), pl.all()))
    return pl.concat(parts) if parts else pl.DataFrame()


def metric_name(prefix: str, name: str) -> str:
    """An MLflow metric key `prefix.name`, with characters MLflow refuses replaced by "_"."""
    return f"{prefix}.{UNSAFE_METRIC_CHARS.sub('_', name)}"


def tracking_metrics(table: pl.DataFrame) -> dict[str, float]:
    """One metric per provider (value_nats, value_relative, ci_low, ci_high, queries_helped), runs comparable."""
    metrics = {}
    for row in table.iter_rows(named=True):
        for column in ("value_nats", "value_relative", "ci_low", "ci_high", "queries_helped"):
            metrics[metric_name(column, row["provider_id"])] = float(row[column])
    if table.height:
        metrics["mean_query_loss"] = float(table["mean_query_loss"][0])
        metrics["providers_distinguishable"] = float((table["verdict"] != UNCLEAR).sum())
    return metrics


def value_markdown(table: pl.DataFrame, *, by_group: bool = False) -> str:
    """A markdown table of provider values (with a query_group column when `by_group`)."""
    head = "| query group " * by_group + (
        "| provider | value (nats) | % of query loss | 95% interval (nats) | verdict | queries helped | "
        "per-query 10%..90% (nats) | signed share |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for row in table.iter_rows(named=True):
        lines.append(
            (f"| {row['query_group']} " if by_group else "")
            + f"| {row['provider_id']} | {row['value_nats']:+.3g} | {row['value_relative']:+.2%} | "
            f"[{row['ci_low']:+.3g}, {row['ci_high']:+.3g}] | {row['verdict']} | {row['queries_helped']:.0%} | "
            f"{row['query_p10']:+.3g} .. {row['query_p90']:+.3g} | {row['share']:+.1%} |"
        )
    return "\n".join(lines)


def summary_lines(table: pl.DataFrame) -> list[str]:
    """The provider values for people: the unit, then one line per provider, grouped by verdict."""
    if table.height == 0:
        return []
    loss, queries, rows = table["mean_query_loss"][0], table["queries"][0], table["training_rows"][0]
    out = [
        f"value = predicted rise of the mean query loss (now {loss:.3f} nats over {queries} queries) if the "
        f"provider's data were removed from the {rows} training rows; first order, 95% bootstrap interval over queries"
    ]
    for verdict in VERDICTS:
        part = table.filter(pl.col("verdict") == verdict).sort("value_nats", descending=True)
        if part.height == 0:
            continue
        out.append(f"  {verdict}:")
        for row in part.iter_rows(named=True):
            out.append(
                f"    {row['provider_id']:<14} {row['value_nats']:+.3e} nats "
                f"({row['value_relative']:+.2%} of the loss)  "
                f"95% [{row['ci_low']:+.2e}, {row['ci_high']:+.2e}]  helps {row['queries_helped']:.0%} of queries  "
                f"signed share {row['share']:+.1%}"
            )
    return out


def _label(text: str) -> str:
    """Matplotlib label text: `$` escaped so a provider id is never read as mathtext."""
    return text.replace("$", r"\$")


def provider_chart(table: pl.DataFrame, title: str, xlabel: str = VALUE_LABEL):
    """Horizontal bars of value_nats per provider with the 95% interval (grey: not distinguishable from 0)
    and a dot at the fraction of queries helped; a matplotlib Figure."""
    table = table.sort("value_nats")
    fig, ax = plt.subplots(figsize=(8, 0.45 * table.height + 1.8))
    values = table["value_nats"].to_numpy()
    errors = np.vstack([values - table["ci_low"].to_numpy(), table["ci_high"].to_numpy() - values]).clip(0)
    colors = [{HELPS: "#3b7dd8", HURTS: "#d8553b"}.get(v, "#b0b0b0") for v in table["verdict"].to_list()]
    labels = [
        _label(f"{p}  ({h:.0%} of queries helped)")
        for p, h in zip(table["provider_id"].to_list(), table["queries_helped"].to_list())
    ]
    ax.barh(labels, values, xerr=errors, color=colors, ecolor="#333333", capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.set_xlabel(_label(xlabel + "; grey: 95% interval contains 0"))
    ax.set_title(_label(title))
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
    delta: DeltaStore, vid: str, provenance: dict, training_rows: int, *, bootstrap_samples: int, seed: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(`provider_table`, `group_table`) of valuation `vid` from its provider x query sums, the query losses
    and groups of the valuation_queries and the token_shards it read, and its `training_rows` (N)."""
    sums = delta.read("influence_scores", where={"valuation_id": vid, "kind": "provider_query"})
    matrix = sums.pivot(on="query_id", index="provider_id", values="score", sort_columns=True).sort("provider_id")
    query_ids = matrix.drop("provider_id").columns
    queries = (
        delta.read("valuation_queries", version=provenance["tables"]["valuation_queries"])
        .filter(pl.col("query_id").is_in(query_ids))
        .sort("query_id")
    )
    if queries["query_id"].to_list() != query_ids:
        raise ValueError(f"valuation {vid}: its queries are not those of valuation_queries at the version it read")
    seqs = delta.read(
        "token_shards",
        version=provenance["tables"]["token_shards"],
        where={"shard_id": provenance["shards"]},
        columns=["provider_id", "doc_id", "n_tokens"],
    )
    per_provider = seqs.group_by("provider_id").agg(
        documents=pl.col("doc_id").n_unique(), tokens=pl.col("n_tokens").sum()
    )
    values, providers = matrix.drop("provider_id").fill_null(0).to_numpy(), matrix["provider_id"].to_list()
    common = {
        "training_rows": training_rows,
        "query_losses": queries["loss"].to_numpy(),
        "completion_tokens": queries["completion_tokens"].to_numpy(),
        "bootstrap_samples": bootstrap_samples,
        "seed": seed,
    }
    table = provider_table(
        values,
        providers,
        dict(per_provider.select("provider_id", "documents").iter_rows()),
        dict(per_provider.select("provider_id", "tokens").iter_rows()),
        **common,
    )
    return table, group_table(values, providers, queries["query_group"].to_list(), **common)


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
