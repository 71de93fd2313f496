"""domain/report.py: the forwardable HTML report of a valuation, on a tiny real valuation."""

import base64
import re
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import polars as pl

from domain.report import render_report, top_documents, valuation_report
from resources.tracking import MlflowTracker
from tests.pipeline_harness import PROVIDERS, make_tiny_setup


class Page(HTMLParser):
    """What a browser would find in the page: tags, image sources, text; and any unclosed table."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.images, self.text, self.open_tables = [], [], [], 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.open_tables += tag == "table"
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        self.open_tables -= tag == "table"

    def handle_data(self, data):
        self.text.append(data)


def test_report_of_a_tiny_real_valuation(tmp_path, monkeypatch):
    setup = make_tiny_setup(tmp_path, monkeypatch)
    setup.stage()
    (result,) = setup.run_stale()
    assert result.success
    chart_markdown = result.asset_materializations_for_node("provider_valuations")[0].metadata["chart (picture)"].value
    chart_png = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)", chart_markdown).group(1))
    delta = setup.delta
    values = delta.read("provider_valuations")
    vid = values["valuation_id"][0]

    # the asset wrote the page, linked it from its metadata and put it in its MLflow run
    written = Path(result.asset_materializations_for_node("provider_valuations")[0].metadata["report"].path)
    assert written.name == f"{vid}.html" and f"Provider valuation {vid}" in written.read_text(encoding="utf-8")
    assert written.name in MlflowTracker().get_run(values["mlflow_run_id"][0])["artifacts"]

    report = valuation_report(delta, MlflowTracker(), vid, chart_png, unit="nats")
    page = Page(report)
    text = " ".join(page.text)
    assert report.startswith("<!DOCTYPE html>") and page.open_tables == 0
    assert "script" not in page.tags and "link" not in page.tags  # self-contained, nothing to fetch or run
    # the provider table: one row per provider, a header per column (the columns may change: no names here)
    shown = [c for c in values.columns if c not in ("valuation_id", "mlflow_run_id")]
    assert report.count("<th>") >= len(shown)
    assert all(provider in text for provider in PROVIDERS)
    # the chart, embedded
    (image,) = [src for src in page.images if src.startswith("data:image/png;base64,")]
    assert base64.b64decode(image.split(",", 1)[1]).startswith(b"\x89PNG")
    # top documents per provider, with a snippet of their text from the corpus
    tops = delta.read("influence_scores", where={"valuation_id": vid, "kind": "top_document"})
    corpus = delta.read("training_corpus")
    best = top_documents(tops, corpus.select("doc_id", "text", "license", "source_uri"), per_provider=2)
    assert best.height and (best.group_by("provider_id").len()["len"] <= 2).all()
    for doc_id, snippet in best.select("doc_id", pl.col("text").str.slice(0, 40)).iter_rows():
        assert doc_id in text and snippet.split("\n")[0] in text
    # the audit lineage
    assert vid in text and values["mlflow_run_id"][0] in text
    assert "Audit lineage" in text and "ekfac" in text  # the curvature
    assert f"dataworth audit {vid} --verify" in text


def test_every_text_is_escaped():
    evil = "<script>alert(1)</script>"
    table = pl.DataFrame(
        {"provider_id": [evil], "value_nats": [0.5], "share": [1.0], "documents": [3], "valuation_id": ["v-1"]}
    )
    documents = pl.DataFrame(
        {
            "provider_id": [evil],
            "doc_id": ['d"1'],
            "queries": [2],
            "best_rank": [1],
            "score": [1.5],
            "text": [f"a & b {evil}"],
            "license": ["<i>MIT</i>"],
            "source_uri": ["javascript:alert(1)"],
        }
    )
    lineage = {"valuation_id": "v-1<b>", "model": {"path": evil}, "shards": [evil] * 50, "queries": [{"prompt": evil}]}
    report = render_report(table, lineage, documents, generated_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert "<script" not in report and "<i>" not in report and "<b>" not in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report and "a &amp; b" in report
    assert 'href="javascript' not in report
    assert "... and 10 more" in report  # long lists are cut
    page = Page(report)
    assert page.open_tables == 0 and page.images == []
    assert "value (nats)" in " ".join(page.text) and "+100.0%" in report  # readable header, share in percent
