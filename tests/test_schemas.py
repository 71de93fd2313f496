"""One valid and one invalid frame per table schema."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from resources.schemas import SCHEMAS, validate

F32 = np.arange(4, dtype="<f4").tobytes()
F64_2x3 = np.zeros((2, 3), dtype="<f8").tobytes()
NAN_F32 = np.array([0, np.nan, 1, 2], dtype="<f4").tobytes()
INF_F64_2x3 = np.array([0, 0, np.inf, 0, 0, 0], dtype="<f8").tobytes()
NOW = datetime(2025, 1, 1, tzinfo=UTC)
SHARD = "b-0123456789abcdef-0000"
H1 = hashlib.sha256(b"projection").hexdigest()
H2 = hashlib.sha256(b"model").hexdigest()
VID = "v-0123456789abcdef"

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
            "shard_id": [SHARD],
        }
    ),
    "token_shards": pl.DataFrame(
        {
            "shard_id": [SHARD] * 2,
            "seq_id": [f"{SHARD}:00000", f"{SHARD}:00001"],
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
            "shard_id": [SHARD] * 2,
            "seq_id": [f"{SHARD}:00000", f"{SHARD}:00001"],
            "doc_id": ["d", "d"],
            "provider_id": ["p", "p"],
            "n_tokens": [3, 2],
            "gradient": [F32, F32],
            "projection_hash": [H1] * 2,
            "model_hash": [H2] * 2,
        }
    ),
    "projected_gradients_statistics": pl.DataFrame(
        {
            "name": ["h.0.mlp|activation"],
            "shape": pl.Series([[2, 3]], dtype=pl.List(pl.Int64)),
            "dtype": ["float64"],
            "data": [F64_2x3],
            "shard_id": [SHARD],
            "fisher": ["empirical"],
            "projection_hash": [H1],
            "model_hash": [H2],
        }
    ),
    "hessian_factors": pl.DataFrame(
        {
            "name": ["h.0.mlp|eigenvectors_in"],
            "shape": pl.Series([[2, 3]], dtype=pl.List(pl.Int64)),
            "dtype": ["float64"],
            "data": [F64_2x3],
            "kind": ["ekfac"],
            "fisher": ["empirical"],
            "projection_hash": [H1],
            "examples": [10],
            "tokens": [300],
        }
    ),
    "influence_partials": pl.DataFrame(
        {
            "name": ["doc_sums"],
            "shape": pl.Series([[2, 3]], dtype=pl.List(pl.Int64)),
            "dtype": ["float64"],
            "data": [F64_2x3],
            "valuation_id": [VID],
            "part": ["0001"],
            "shards": pl.Series([[SHARD]], dtype=pl.List(pl.String)),
            "rows": [4],
            "queries": [3],
            "seconds": [0.5],
        }
    ),
    "valuation_queries": pl.DataFrame(
        {
            "query_id": ["q00"],
            "prompt": ["Compute the"],
            "completion": [" eigenvalues"],
            "reference": [True],
            "query_group": pl.Series([None], dtype=pl.String),
            "prompt_tokens": [2],
            "completion_tokens": [1],
            "loss": [3.25],
            "gradient": [F32],
            "projection_hash": [H1],
            "model_hash": [H2],
        }
    ),
    "influence_scores": pl.DataFrame(
        {
            "valuation_id": [VID] * 4,
            "query_id": ["q00", "q00", None, "q00"],
            "kind": ["top_sequence", "top_document", "document_total", "provider_query"],
            "rank": [1, 1, None, None],
            "seq_id": [f"{SHARD}:00000", None, None, None],
            "doc_id": ["d", "d", "d", None],
            "provider_id": ["p"] * 4,
            "score": [0.5, -0.25, 1.0, 0.75],
        }
    ),
    "provider_valuations": pl.DataFrame(
        {
            "valuation_id": [VID],
            "provider_id": ["p"],
            "value_nats": [-1.5e-3],
            "value_relative": [-1.5e-4],
            "value_nats_per_token": [-1e-5],
            "share": [-0.2],
            "ci_low": [-2e-3],
            "ci_high": [-1e-3],
            "verdict": ["hurts"],
            "queries_helped": [0.25],
            "query_p10": [-4e-3],
            "query_p90": [1e-3],
            "documents": [3],
            "tokens": [100],
            "queries": [20],
            "training_rows": [300],
            "mean_query_loss": [10.0],
            "value_per_training_token": [-1.5e-5],
            "mlflow_run_id": ["abc123"],
        }
    ),
    "model_checkpoint": pl.DataFrame(
        {
            "checkpoint_hash": [H2],
            "path": ["/state/models/0123456789abcdef"],
            "adapter_path": [""],
            "source": ["embedded"],
            "model_type": ["gpt2"],
            "parameters": [123456],
            "context_length": [128],
            "corpus_version": pl.Series([None], dtype=pl.Int64),
            "mlflow_run_id": [""],
            "created_at": [NOW],
        }
    ),
    "gradient_projection": pl.DataFrame(
        {
            "projection_hash": [H1],
            "path": ["/state/projections/0123456789abcdef"],
            "config": ['{"rank_in": 16}'],
            "dim": [512],
            "layers": [8],
            "model_hash": [H2],
            "created_at": [NOW],
        }
    ),
    "valuation_provenance": pl.DataFrame(
        {
            "valuation_id": [VID],
            "provenance": ['{"tables": {}}'],
            "dagster_run_id": ["run-1"],
            "training_rows": [244],
            "queries": [24],
            "scoring_seconds": [0.5],
            "rows_per_second": [488.0],
            "created_at": [NOW],
        }
    ),
}

INVALID = {
    "training_corpus": (
        VALID["training_corpus"].with_columns(content_sha256=pl.lit("XYZ"), text=pl.lit("  "), shard_id=pl.lit("s-1")),
        ["content_sha256", "text", "shard_id"],
    ),
    "token_shards": (VALID["token_shards"].with_columns(n_tokens=pl.lit(9, dtype=pl.Int64)), ["token_counts_agree"]),
    "projected_gradients": (
        VALID["projected_gradients"].with_columns(gradient=pl.Series([NAN_F32, b"abc"]), model_hash=pl.lit("short")),
        ["finite_blob", "float_blob", "model_hash"],
    ),
    "projected_gradients_statistics": (
        VALID["projected_gradients_statistics"].with_columns(data=pl.lit(b"\x00" * 8), fisher=pl.lit("true")),
        ["matches_shape", "fisher"],
    ),
    "hessian_factors": (
        VALID["hessian_factors"].with_columns(data=pl.lit(INF_F64_2x3), extra=pl.lit(1)),
        ["finite_blob", "extra"],
    ),
    "influence_partials": (
        VALID["influence_partials"].with_columns(data=pl.lit(INF_F64_2x3), part=pl.lit("1"), rows=pl.lit(0)),
        ["finite_blob", "part", "rows"],
    ),
    "valuation_queries": (VALID["valuation_queries"].drop("completion"), ["completion"]),
    "influence_scores": (
        VALID["influence_scores"].with_columns(
            kind=pl.Series(["top_sequence", "best", "document_total", "provider_query"]), score=pl.lit(float("inf"))
        ),
        ["kind", "score"],
    ),
    "provider_valuations": (
        VALID["provider_valuations"].with_columns(ci_low=pl.lit(1e-3), documents=pl.lit(1, dtype=pl.Int32)),
        ["ci_low_not_above_ci_high", "verdict_agrees_with_the_interval", "documents"],
    ),
    "model_checkpoint": (
        VALID["model_checkpoint"].with_columns(source=pl.lit("hub"), created_at=pl.lit(datetime(2025, 1, 1))),
        ["source", "created_at"],
    ),
    "gradient_projection": (
        VALID["gradient_projection"].with_columns(config=pl.lit("rank_in=16"), dim=pl.lit(0, dtype=pl.Int64)),
        ["config", "dim"],
    ),
    "valuation_provenance": (
        VALID["valuation_provenance"].with_columns(valuation_id=pl.lit("v-1"), rows_per_second=pl.lit(float("nan"))),
        ["valuation_id", "rows_per_second"],
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
