"""A provider valuation as one self-contained HTML page a person can forward (no script, no external file).

`valuation_report(delta, tracker, vid, chart_png)` reads what the page shows; `render_report` only renders:

- the provider table: every column of the provider_valuations rows, whatever they are, with readable headers;
- the chart, a PNG embedded as base64;
- per provider, the documents most often among the queries' top documents (influence_scores kind
  `top_document`), with a snippet of their text, licence and source from training_corpus;
- the audit lineage (`domain.audit.lineage`): table versions, model, projection, curvature, queries, MLflow run.

Every piece of text is escaped (`html.escape`), so a provider id or a document cannot inject markup.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import polars as pl

from domain import audit
from resources.delta import DeltaStore, TableVersionMissing
from resources.tracking import MlflowTracker

HIDDEN_COLUMNS = ("valuation_id", "mlflow_run_id")  # shown once in the header instead of on every row
HEADERS = {
    "provider_id": "provider",
    "value_nats": "value (nats)",
    "value_relative": "% of query loss",
    "value_nats_per_token": "value per token (nats)",
    "ci_low": "95% interval low",
    "ci_high": "95% interval high",
    "share": "signed share",
    "queries_helped": "queries helped",
    "query_p10": "per-query 10%",
    "query_p90": "per-query 90%",
    "mean_query_loss": "mean query loss (nats)",
    "training_rows": "training rows",
}
PERCENT_COLUMNS = {"value_relative": "{:+.2%}", "share": "{:+.1%}", "queries_helped": "{:.0%}"}  # else 4 digits
MAX_LIST_ITEMS = 40  # a longer list in the lineage (shards) is cut, saying how many more there are
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; } th, td { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
blockquote { margin: .3em 0 1em 0; padding: .3em .8em; background: #f7f7f7; border-left: 3px solid #bbb;
  white-space: pre-wrap; }
dl { margin: 0; } dt { font-weight: 600; } dd { margin: 0 0 .4em 1.5em; } .muted { color: #777; }
img { max-width: 100%; } .wide { overflow-x: auto; }
"""


def readable(name: str) -> str:
    """A column name as a header: the known ones by HEADERS, else underscores become spaces."""
    return HEADERS.get(name, name.replace("_", " "))


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _cell(name: str, value) -> str:
    if value is None:
        return '<td class="muted">-</td>'
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, float):
        text = PERCENT_COLUMNS.get(name, "{:.4g}").format(value)
        return f'<td class="num">{_e(text)}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{_e(value)}</td>"


def frame_table(frame: pl.DataFrame, hidden: Sequence[str] = ()) -> str:
    """Every column of `frame` (except `hidden`) as an HTML table with readable headers."""
    columns = [c for c in frame.columns if c not in hidden]
    head = "".join(f"<th>{_e(readable(c))}</th>" for c in columns)
    body = frame.select(columns).iter_rows(named=True)
    rows = "".join("<tr>" + "".join(_cell(c, row[c]) for c in columns) + "</tr>" for row in body)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _value(value) -> str:
    """Any JSON-like value (the lineage) as HTML: dicts as definition lists, lists of dicts as tables."""
    if isinstance(value, Mapping):
        if not value:
            return '<span class="muted">none</span>'
        items = "".join(f"<dt>{_e(readable(str(k)))}</dt><dd>{_value(v)}</dd>" for k, v in value.items())
        return f"<dl>{items}</dl>"
    if isinstance(value, list | tuple):
        if not value:
            return '<span class="muted">none</span>'
        more = len(value) - MAX_LIST_ITEMS
        shown = value[:MAX_LIST_ITEMS]
        tail = f' <span class="muted">... and {more} more</span>' if more > 0 else ""
        if all(isinstance(v, Mapping) for v in shown):
            keys = list(dict.fromkeys(k for v in shown for k in v))
            head = "".join(f"<th>{_e(readable(str(k)))}</th>" for k in keys)
            rows = "".join("<tr>" + "".join(f"<td>{_value(v.get(k))}</td>" for k in keys) + "</tr>" for v in shown)
            return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{tail}"
        return ", ".join(_e(v) for v in shown) + tail
    if value is None:
        return '<span class="muted">-</span>'
    if isinstance(value, float):
        return _e(f"{value:.6g}")
    return _e(value)


def top_documents(scores: pl.DataFrame, corpus: pl.DataFrame, per_provider: int = 3) -> pl.DataFrame:
    """Per provider, its documents most often among the queries' top documents (then by summed score), with
    the corpus columns (text, licence, source) joined on doc_id."""
    tops = scores.filter(pl.col("kind") == "top_document")
    if tops.is_empty():
        return pl.DataFrame(schema={"provider_id": pl.String, "doc_id": pl.String, "queries": pl.UInt32})
    ranked = (
        tops.group_by("provider_id", "doc_id")
        .agg(
            queries=pl.col("query_id").n_unique(),
            best_rank=pl.col("rank").min(),
            score=pl.col("score").sum(),
        )
        .sort(["provider_id", "queries", "score", "doc_id"], descending=[False, True, True, False])
        .group_by("provider_id", maintain_order=True)
        .head(per_provider)
    )
    return ranked.join(corpus, on="doc_id", how="left")


def _snippet(text: str | None, chars: int) -> str:
    if text is None:
        return '<span class="muted">(text not found in training_corpus)</span>'
    cut = text[:chars]
    return _e(cut) + ("&hellip;" if len(text) > chars else "")


def render_report(
    table: pl.DataFrame,
    lineage: Mapping,
    documents: pl.DataFrame,
    chart_png: bytes | None = None,
    *,
    unit: str | None = None,
    queries: int | None = None,
    snippet_chars: int = 300,
    generated_at: datetime | None = None,
) -> str:
    """The report page (a complete HTML document) of one valuation; see the module docstring."""
    vid = str(lineage.get("valuation_id") or (table["valuation_id"][0] if "valuation_id" in table.columns else "?"))
    run_id = table["mlflow_run_id"][0] if "mlflow_run_id" in table.columns and table.height else None
    when = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    facts = [f"valuation <code>{_e(vid)}</code>", f"created {_e(lineage.get('created_at', '?'))}"]
    if run_id:
        facts.append(f"MLflow run <code>{_e(run_id)}</code>")
    facts.append(f"report generated {_e(when)}")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Provider valuation {_e(vid)}</title><style>{CSS}</style></head><body>",
        f"<h1>Provider valuation {_e(vid)}</h1>",
        f"<p>{' &middot; '.join(facts)}</p>",
        "<h2>Providers</h2>",
    ]
    if unit:
        parts.append(f"<p>Value: {_e(unit)}.</p>")
    parts.append(frame_table(table, HIDDEN_COLUMNS) if table.height else '<p class="muted">no provider rows</p>')
    parts.append("<h2>Chart</h2>")
    if chart_png:
        data = base64.b64encode(chart_png).decode("ascii")
        parts.append(f'<img alt="provider values of valuation {_e(vid)}" src="data:image/png;base64,{data}">')
    else:
        parts.append('<p class="muted">no chart</p>')
    parts.append("<h2>Top documents per provider</h2>")
    of_queries = f" of the {queries} queries" if queries else ""
    parts.append(
        f"<p>Per provider, the documents that are most often among the top documents of a query{_e(of_queries)} "
        "(ties broken by their summed score).</p>"
    )
    if documents.is_empty():
        parts.append('<p class="muted">no top documents recorded</p>')
    for provider, group in documents.group_by("provider_id", maintain_order=True):
        parts.append(f"<h3>{_e(provider[0])}</h3>")
        for row in group.iter_rows(named=True):
            details = [f"top document of {row['queries']} quer{'y' if row['queries'] == 1 else 'ies'}"]
            if row.get("best_rank") is not None:
                details.append(f"best rank {row['best_rank']}")
            if row.get("score") is not None:
                details.append(f"summed score {row['score']:.4g}")
            if row.get("license"):
                details.append(f"licence {row['license']}")
            if row.get("source_uri"):
                details.append(f"source {row['source_uri']}")
            parts.append(f"<p><code>{_e(row['doc_id'])}</code>: {_e(', '.join(details))}</p>")
            parts.append(f"<blockquote>{_snippet(row.get('text'), snippet_chars)}</blockquote>")
    parts.append("<h2>Audit lineage</h2>")
    parts.append(
        f"<p>Everything this valuation read; <code>dataworth audit {_e(vid)} --verify</code> recomputes a sample "
        "of it from these exact table versions.</p>"
    )
    parts.append(_value({k: v for k, v in lineage.items() if k != "valuation_id"}))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def valuation_report(
    delta: DeltaStore,
    tracker: MlflowTracker,
    vid: str,
    chart_png: bytes | None = None,
    *,
    unit: str | None = None,
    per_provider: int = 3,
    snippet_chars: int = 300,
) -> str:
    """Read valuation `vid` (provider rows, top documents with their text, lineage) and render its report."""
    report_lineage = audit.lineage(delta, tracker, vid)
    table = delta.read("provider_valuations", where={"valuation_id": vid})
    table = table.sort("value_nats", descending=True)
    scores = delta.read("influence_scores", where={"valuation_id": vid, "kind": "top_document"})
    doc_ids = scores["doc_id"].drop_nulls().unique().to_list()
    corpus_version = report_lineage["tables"].get("training_corpus", {}).get("version")
    columns = ["doc_id", "text", "license", "source_uri"]
    try:  # the corpus as the valuation read it; the latest if that version was vacuumed
        corpus = delta.read("training_corpus", version=corpus_version, columns=columns, where={"doc_id": doc_ids})
    except TableVersionMissing:
        corpus = delta.read("training_corpus", columns=columns, where={"doc_id": doc_ids})
    documents = top_documents(scores, corpus.unique("doc_id"), per_provider)
    queries = scores["query_id"].n_unique() if scores.height else None
    return render_report(
        table, report_lineage, documents, chart_png, unit=unit, queries=queries, snippet_chars=snippet_chars
    )
