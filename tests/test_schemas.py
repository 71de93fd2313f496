"""One valid and one invalid frame per table schema."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from pipelines.schemas import SCHEMAS, validate

F32 = np.arange(4, dtype="<f4").tobytes()
F64_2x3 = np.zeros((2, 3), dtype="<f8").tobytes()
NOW = datetime(2025, 1, 1, tzinfo=UTC)

VALID = {
    "training_corpus": pl.DataFrame(
        {
            "provider_id": ["p"],
            "doc_id": ["d"],
            "text": ["hello"],
            "source_uri": ["landing:a.jsonl"],
            "license": ["MIT"],
            "content_sha256": [hashlib.sha256(b"hello").hexdigest()],
            "ingested_at": [NOW],
            "batch_id": ["b-0123456789abcdef"],
        }
    ),
    "token_shards": pl.DataFrame(
        {
            "shard_id": ["b-0123456789abcdef-0000"] * 2,
            "seq_id": ["b-0123456789abcdef-0000:00000", "b-0123456789abcdef-0000:00001"],
            "seq_index": [0, 1],
            "doc_id": ["d", "d"],
            "provider_id": ["p", "p"],
            "batch_id": ["b-0123456789abcdef"] * 2,
            "token_start": [0, 3],
            "token_end": [3, 5],
            "n_tokens": [3, 2],
            "input_ids": pl.Series([[1, 2, 3], [4, 5]], dtype=pl.List(pl.Int32)),
        }
    ),
    "projected_gradients": pl.DataFrame(
        {
            "shard_id": ["s", "s"],
            "seq_id": ["s:0", "s:1"],
            "doc_id": ["d", "d"],
            "provider_id": ["p", "p"],
            "n_tokens": [3, 2],
            "loss": [2.5, 1.0],
            "gradient": [F32, F32],
        }
    ),
    "projected_gradients_statistics": pl.DataFrame(
        {
            "shard_id": ["s"],
            "module": ["h.0.mlp"],
            "name": ["forward"],
            "shape": pl.Series([[2, 3]], dtype=pl.List(pl.Int64)),
            "data": [F64_2x3],
        }
    ),
    "hessian_factors": pl.DataFrame(
        {
            "module": ["h.0.mlp"],
            "name": ["forward"],
            "shape": pl.Series([[2, 3]], dtype=pl.List(pl.Int64)),
            "data": [F64_2x3],
        }
    ),
    "valuation_queries": pl.DataFrame(
        {
            "query_id": ["q00"],
            "prompt": ["Compute the"],
            "completion": [" eigenvalues"],
            "prompt_tokens": [2],
            "completion_tokens": [1],
            "gradient": [F32],
        }
    ),
    "influence_scores": pl.DataFrame(
        {
            "valuation_id": ["v"] * 3,
            "query_id": ["q00", "q00", None],
            "kind": ["top_sequence", "top_document", "document_total"],
            "rank": [1, 1, 1],
            "seq_id": ["s:0", None, None],
            "doc_id": ["d"] * 3,
            "provider_id": ["p"] * 3,
            "score": [0.5, -0.25, 1.0],
        }
    ),
    "provider_valuations": pl.DataFrame(
        {
            "valuation_id": ["v"],
            "provider_id": ["p"],
            "total_value": [-1.5],
            "positive_value": [0.5],
            "share": [-0.2],
            "documents": [3],
            "tokens": [100],
            "value_per_token": [-0.015],
            "ci_low": [-2.0],
            "ci_high": [-1.0],
            "mlflow_run_id": ["abc123"],
        }
    ),
}

INVALID = {
    "training_corpus": (
        VALID["training_corpus"].with_columns(content_sha256=pl.lit("XYZ"), text=pl.lit("  ")),
        ["content_sha256", "text"],
    ),
    "token_shards": (VALID["token_shards"].with_columns(n_tokens=pl.lit(9, dtype=pl.Int64)), ["token_counts_agree"]),
    "projected_gradients": (
        VALID["projected_gradients"].with_columns(
            loss=pl.Series([float("nan"), 1.0]), gradient=pl.Series([F32, b"abc"])
        ),
        ["loss", "gradient"],
    ),
    "projected_gradients_statistics": (
        VALID["projected_gradients_statistics"].with_columns(data=pl.lit(b"\x00" * 8)),
        ["matches_shape"],
    ),
    "hessian_factors": (VALID["hessian_factors"].with_columns(extra=pl.lit(1)), ["extra"]),
    "valuation_queries": (VALID["valuation_queries"].drop("completion"), ["completion"]),
    "influence_scores": (
        VALID["influence_scores"].with_columns(
            kind=pl.Series(["top_sequence", "best", "document_total"]), score=pl.lit(float("inf"))
        ),
        ["kind", "score"],
    ),
    "provider_valuations": (
        VALID["provider_valuations"].with_columns(ci_low=pl.lit(0.0), documents=pl.lit(1, dtype=pl.Int32)),
        ["ci_low_not_above_ci_high", "documents"],
    ),
}


def test_every_table_has_a_schema_and_test_frames():
    assert set(SCHEMAS) == set(VALID) == set(INVALID)


@pytest.mark.parametrize("table", sorted(VALID))
def test_valid_frame_passes(table):
    assert validate(table, VALID[table]) == []


@pytest.mark.parametrize("table", sorted(INVALID))
def test_invalid_frame_reports_each_problem(table):
    frame, expected = INVALID[table]
    failures = validate(table, frame)
    assert failures and all(f.startswith(f"{table}: ") for f in failures)
    for word in expected:
        assert any(word in failure for failure in failures), (word, failures)


def test_null_in_a_required_column_and_unknown_table():
    frame = VALID["training_corpus"].with_columns(doc_id=pl.lit(None, dtype=pl.String))
    assert any("doc_id" in failure for failure in validate("training_corpus", frame))
    with pytest.raises(KeyError, match="known tables"):
        validate("nope", frame)
