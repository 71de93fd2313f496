"""Corpus ingestion: landing files, validation, de-duplication, quarantine."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domain.landing import (
    CORPUS_COLUMNS,
    LandingFileError,
    batch_id_for,
    merge_into_corpus,
    quarantine,
    read_landing_file,
    validate_documents,
)
from domain.staging import assign_shards, shard_groups
from resources.schemas import validate

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def doc(provider="p1", doc_id="d1", text="hello world", license="MIT", **extra):
    return {"provider_id": provider, "doc_id": doc_id, "text": text, "license": license, **extra}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows), encoding="utf-8")
    return path


def ingest(path, existing=None):
    accepted, rejected = validate_documents(read_landing_file(path), ingested_at=NOW, batch_id=batch_id_for(path))
    return merge_into_corpus(existing, accepted, validation_rejected=rejected)


def test_jsonl_happy_path(tmp_path):
    path = write_jsonl(
        tmp_path / "drop.jsonl",
        [doc(doc_id="d1", source_uri="https://x/1"), doc(doc_id="d2", text="line\u2028separator ü")],
    )
    rows, report = ingest(path)
    assert rows.columns == list(CORPUS_COLUMNS)
    assert rows["doc_id"].to_list() == ["d1", "d2"]
    assert rows["source_uri"].to_list() == ["https://x/1", "landing:drop.jsonl"]
    assert rows["text"][1] == "line\u2028separator ü"
    assert rows["content_sha256"][0] == hashlib.sha256(b"hello world").hexdigest()
    assert rows["ingested_at"].to_list() == [NOW, NOW] and rows.schema["ingested_at"] == pl.Datetime("us", "UTC")
    expected_batch = "b-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert rows["batch_id"].unique().to_list() == [expected_batch]
    assert (report.appended, report.skipped_duplicates, report.rejected.height) == (2, 0, 0)
    assert validate("training_corpus", assign_shards(rows, expected_batch, docs_per_shard=1)) == []  # as staged


def test_parquet_happy_path(tmp_path):
    path = tmp_path / "drop.parquet"
    pl.DataFrame([doc(doc_id="d1"), doc(doc_id="d2", text="ünïcødé", source_uri=None)]).write_parquet(path)
    rows, report = ingest(path)
    assert rows["text"].to_list() == ["hello world", "ünïcødé"]
    assert rows["source_uri"].to_list() == ["landing:drop.parquet"] * 2
    assert rows["content_sha256"][1] == hashlib.sha256("ünïcødé".encode()).hexdigest()
    assert report.appended == 2


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", b"provider_id,doc_id\n", r"unknown extension '\.csv'.*\.jsonl"),
        ("a.jsonl", json.dumps(doc(extra="x")).encode(), r"line 1 has unknown field\(s\) \['extra'\]; remove them"),
        (
            "a.jsonl",
            json.dumps({"provider_id": "p", "doc_id": "d", "text": "t"}).encode(),
            r"line 1 lacks required field\(s\) \['license'\]",
        ),
        (
            "a.jsonl",
            (json.dumps(doc()) + "\n" + json.dumps(doc())[:20]).encode(),
            r"line 2 is not valid JSON.*one complete JSON object per line",
        ),
        (
            "a.jsonl",
            json.dumps(doc()).encode()
            + b"\n"
            + json.dumps(doc(text="caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9"),
            r"line 2 is not valid UTF-8.*re-export the file as UTF-8",
        ),
        ("a.jsonl", b"[1, 2]\n", r"line 1 is a JSON list, not an object"),
        (
            "a.jsonl",
            json.dumps(doc(doc_id=12)).encode(),
            r"line 1: field 'doc_id' is a int; every field must be a string",
        ),
        ("a.jsonl", b"\n\n", r"contains no documents"),
        ("a.parquet", b"PAR1 not really", r"cannot be read as Parquet"),
    ],
)
def test_bad_landing_files_name_file_problem_and_fix(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LandingFileError, match=message) as caught:
        read_landing_file(path)
    assert str(path) in str(caught.value)


def test_bad_parquet_columns(tmp_path):
    missing = tmp_path / "missing.parquet"
    pl.DataFrame({"provider_id": ["p"], "doc_id": ["d"], "text": ["t"]}).write_parquet(missing)
    with pytest.raises(LandingFileError, match=r"lacks required field\(s\) \['license'\]"):
        read_landing_file(missing)
    extra = tmp_path / "extra.parquet"
    pl.DataFrame([doc(score="1")]).write_parquet(extra)
    with pytest.raises(LandingFileError, match=r"unknown field\(s\) \['score'\]"):
        read_landing_file(extra)
    typed = tmp_path / "typed.parquet"
    pl.DataFrame([doc()]).with_columns(pl.lit(3).alias("doc_id")).write_parquet(typed)
    with pytest.raises(LandingFileError, match=r"column 'doc_id' has type Int32; every column must be a string"):
        read_landing_file(typed)


def test_parquet_with_invalid_utf8_text(tmp_path):
    text = pa.Array.from_buffers(
        pa.string(), 1, [None, pa.py_buffer(bytes([0, 0, 0, 0, 1, 0, 0, 0])), pa.py_buffer(b"\xff")]
    )
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"provider_id": ["p"], "doc_id": ["d"], "text": text, "license": ["MIT"]}), path)
    with pytest.raises(LandingFileError, match=r"bad.parquet: cannot be read as Parquet.*invalid UTF-8.*re-export"):
        read_landing_file(path)


def test_invalid_rows_are_rejected_with_reasons(tmp_path):
    rows = [
        doc(doc_id="ok"),
        doc(doc_id="blank", text="  \n\t"),
        doc(doc_id="", text="x"),
        doc(provider=None, doc_id="noprov", text="y"),
        doc(doc_id="nolicense", text="z", license=""),
    ]
    accepted, rejected = validate_documents(
        read_landing_file(write_jsonl(tmp_path / "a.jsonl", rows)), ingested_at=NOW, batch_id="b-0"
    )
    assert accepted["doc_id"].to_list() == ["ok"]
    assert dict(zip(rejected["text"], rejected["reason"], strict=True)) == {
        "  \n\t": "text is empty or whitespace only",
        "x": "doc_id is missing",
        "y": "provider_id is missing",
        "z": "license is missing",
    }
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_documents(read_landing_file(tmp_path / "a.jsonl"), ingested_at=datetime(2025, 1, 1), batch_id="b-0")


def test_duplicates_are_skipped_and_changed_doc_ids_rejected(tmp_path):
    first, _ = ingest(
        write_jsonl(tmp_path / "1.jsonl", [doc(doc_id="d1", text="alpha"), doc(doc_id="d2", text="beta")])
    )
    second = [
        doc(doc_id="d1", text="alpha"),  # already present -> skipped
        doc(doc_id="d9", text="beta"),  # same text under another id -> skipped
        doc(doc_id="d2", text="beta v2"),  # existing doc_id, different text -> rejected
        doc(doc_id="d3", text="gamma"),  # new
        doc(doc_id="d3", text="gamma v2"),  # same doc_id twice in the file -> later one rejected
        doc(doc_id="d4", text="gamma"),  # same text twice in the file -> skipped
    ]
    rows, report = ingest(write_jsonl(tmp_path / "2.jsonl", second), existing=first)
    assert rows["doc_id"].to_list() == ["d3"]
    assert (report.appended, report.skipped_duplicates) == (1, 3)
    assert report.rejected["reason"].to_list() == [
        "doc_id d2 already exists with different text; give the new version a new doc_id",
        "doc_id d3 already exists with different text; give the new version a new doc_id",
    ]
    assert report.providers_fully_rejected == []


def test_provider_whose_every_document_is_rejected_is_named(tmp_path):
    existing, _ = ingest(write_jsonl(tmp_path / "1.jsonl", [doc(provider="bad", doc_id="x", text="one")]))
    rows = [
        doc(provider="good", doc_id="g1"),
        doc(provider="bad", doc_id="x", text="two"),
        doc(provider="empty", doc_id="e", text=" "),
    ]
    _, report = ingest(write_jsonl(tmp_path / "2.jsonl", rows), existing=existing)
    assert report.providers_fully_rejected == ["bad", "empty"]
    assert report.rejected.columns == ["provider_id", "doc_id", "text", "source_uri", "license", "reason"]


def test_quarantine_moves_and_never_overwrites(tmp_path):
    rejected_dir = tmp_path / "rejected"
    moved = []
    for content in ("first", "second", "third"):
        landing = tmp_path / "drop.jsonl"
        landing.write_text(content)
        moved.append(quarantine(landing, f"bad {content}", rejected_dir))
        assert not landing.exists()
    assert [p.name for p in moved] == ["drop.jsonl", "drop.1.jsonl", "drop.2.jsonl"]
    assert [p.read_text() for p in moved] == ["first", "second", "third"]
    assert (rejected_dir / "drop.1.jsonl.reason.txt").read_text() == "bad second\n"


@pytest.mark.parametrize(
    ("shards", "parts", "sizes"),
    [(6, 4, [2, 2, 1, 1]), (2, 4, [1, 1, 0, 0]), (5, 1, [5]), (0, 2, [0, 0])],
)
def test_shard_groups_cut_the_sorted_shards_into_contiguous_groups(shards, parts, sizes):
    ids = [f"b-{i:04d}" for i in range(shards)]
    groups = shard_groups(list(reversed(ids)), parts)
    assert [len(g) for g in groups] == sizes
    assert [s for g in groups for s in g] == ids  # every shard once, in order
