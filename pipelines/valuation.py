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
