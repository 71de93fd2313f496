"""Pandera (polars) models of every Delta table in docs/architecture.md.

Each model is strict (exactly these columns, these dtypes, no nulls unless noted).
Integers are Int64, floats Float64, timestamps microsecond UTC. Vectors are stored as
little-endian binary blobs: gradients of D float32 or bfloat16 values (`gradient_dtype`, the same
length in every row of a frame with the same dtype) and float64 statistics/factors whose byte length
matches ``shape``. ``validate(table, df)`` returns readable failures instead of raising.

Contract choices the schema fixes (beyond the column list):
- influence_scores: ``seq_id`` is null except for ``top_sequence`` rows, ``query_id`` is
  null only for ``document_total`` rows (a total over all queries); rank starts at 1.
- valuation_queries: prompt_tokens / completion_tokens are token counts (>= 1).
- token_shards: ``token_end - token_start == n_tokens == len(input_ids)``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandera.polars as pa
import polars as pl
from pandera import extensions
from pandera.engines import polars_engine as pe

from resources.codecs import GRADIENT_DTYPES

NON_EMPTY = {"str_contains": r"\S"}
SHA256 = {"str_matches": r"^[0-9a-f]{64}$"}
SHARD_ID = r"^b-[0-9a-f]{16}-[0-9]{4}$"  # at least one non-whitespace character
UTC_MICROSECONDS = {"dtype_kwargs": {"time_zone": "UTC", "time_unit": "us"}}
INFLUENCE_KINDS = ("top_sequence", "top_document", "document_total", "provider_query")
MAX_FAILURE_CHARS = 400
MAX_EXAMPLE_CHARS = 120


@extensions.register_check_method()
def finite_values(data: pa.PolarsData) -> pl.LazyFrame:
    """Every value is finite (no NaN, no +-inf)."""
    return data.lazyframe.select(pl.col(data.key).is_finite())


@extensions.register_check_method(statistics=["itemsize"])
def float_blob(data: pa.PolarsData, *, itemsize: int) -> pl.LazyFrame:
    """Non-empty binary whose length is a multiple of ``itemsize`` bytes."""
    size = pl.col(data.key).bin.size()
    return data.lazyframe.select((size > 0) & (size % itemsize == 0))


@extensions.register_check_method()
def finite_blob(data: pa.PolarsData) -> pl.LazyFrame:
    """A blob holds whole values and no NaN or Inf: float64 with a `dtype` column (statistics, factors),
    else the row's `gradient_dtype` (float32 when absent or null, or bfloat16).

    Checked on the bytes: a float is non-finite exactly when all its exponent bits are set."""
    names = data.lazyframe.collect_schema().names()
    frame = data.lazyframe.select(data.key, *[c for c in ("gradient_dtype",) if c in names]).collect()
    if "dtype" in names:
        dtypes = ["float64"] * frame.height
    elif "gradient_dtype" in frame.columns:
        dtypes = frame["gradient_dtype"].fill_null("float32").to_list()
    else:
        dtypes = ["float32"] * frame.height
    return pl.LazyFrame({data.key: [_finite(b, d) for b, d in zip(frame[data.key].to_list(), dtypes)]})


def _finite(blob: bytes, dtype: str) -> bool:
    if dtype == "bfloat16":  # numpy has no bfloat16: test the exponent bits of each 2-byte word
        return len(blob) % 2 == 0 and not ((np.frombuffer(blob, dtype="<u2") & 0x7F80) == 0x7F80).any()
    width = {"float64": 8, "float32": 4}.get(dtype)
    return width is not None and len(blob) % width == 0 and bool(np.isfinite(np.frombuffer(blob, f"<f{width}")).all())


@extensions.register_check_method()
def same_length(data: pa.PolarsData) -> pl.LazyFrame:
    """Every binary value has the length of the first one of its `gradient_dtype` (one projection dimension D)."""
    size = pl.col(data.key).bin.size()
    if "gradient_dtype" in data.lazyframe.collect_schema().names():
        return data.lazyframe.select(size == size.first().over(pl.col("gradient_dtype").fill_null("float32")))
    return data.lazyframe.select(size == size.first())


@extensions.register_check_method()
def matches_shape(data: pa.PolarsData) -> pl.LazyFrame:
    """The float64 blob holds exactly prod(shape) values."""
    values = pl.col("shape").list.eval(pl.element().product()).list.first()
    return data.lazyframe.select((pl.col("shape").list.len() > 0) & (pl.col(data.key).bin.size() == values * 8))


class _Strict(pa.DataFrameModel):
    class Config:
        strict = True
        coerce = False


class TrainingCorpus(_Strict):
    provider_id: str = pa.Field(**NON_EMPTY)
    doc_id: str = pa.Field(**NON_EMPTY)
    text: str = pa.Field(**NON_EMPTY)
    source_uri: str = pa.Field(**NON_EMPTY)
    license: str = pa.Field(**NON_EMPTY)
    content_sha256: str = pa.Field(str_matches=r"^[0-9a-f]{64}$")
    ingested_at: pe.DateTime = pa.Field(**UTC_MICROSECONDS)
    batch_id: str = pa.Field(str_matches=r"^b-[0-9a-f]{16}$")
    shard_id: str = pa.Field(str_matches=SHARD_ID)


class TokenShards(_Strict):
    shard_id: str = pa.Field(**NON_EMPTY)
    seq_id: str = pa.Field(**NON_EMPTY, unique=True)
    seq_index: pl.Int64 = pa.Field(ge=0)
    doc_id: str = pa.Field(**NON_EMPTY)
    provider_id: str = pa.Field(**NON_EMPTY)
    batch_id: str = pa.Field(**NON_EMPTY)
    token_start: pl.Int64 = pa.Field(ge=0)
    token_end: pl.Int64 = pa.Field(ge=1)
    n_tokens: pl.Int64 = pa.Field(ge=1)
    input_ids: pl.List(pl.Int32) = pa.Field()

    @pa.dataframe_check
    def token_counts_agree(cls, data: pa.PolarsData) -> pl.LazyFrame:
        n = pl.col("n_tokens")
        return data.lazyframe.select(
            (pl.col("token_end") - pl.col("token_start") == n) & (pl.col("input_ids").list.len() == n)
        )


class ProjectedGradients(_Strict):
    shard_id: str = pa.Field(str_matches=SHARD_ID)
    seq_id: str = pa.Field(**NON_EMPTY, unique=True)
    doc_id: str = pa.Field(**NON_EMPTY)
    provider_id: str = pa.Field(**NON_EMPTY)
    n_tokens: pl.Int64 = pa.Field(ge=1)
    gradient: pl.Binary = pa.Field(float_blob={"itemsize": 2}, same_length=(), finite_blob=())
    # absent or null: float32 (tables and rows written before the column existed)
    gradient_dtype: Optional[str] = pa.Field(isin=tuple(GRADIENT_DTYPES), nullable=True)  # noqa: UP045
    projection_hash: str = pa.Field(**SHA256)
    model_hash: str = pa.Field(**SHA256)


class ProjectedGradientsStatistics(_Strict):
    name: str = pa.Field(**NON_EMPTY)
    shape: pl.List(pl.Int64) = pa.Field()
    dtype: str = pa.Field(isin=["float64", "float32", "int64"])
    data: pl.Binary = pa.Field(float_blob={"itemsize": 8}, matches_shape=())
    shard_id: str = pa.Field(str_matches=SHARD_ID)
    fisher: str = pa.Field(isin=("empirical", "sampled"))
    projection_hash: str = pa.Field(**SHA256)
    model_hash: str = pa.Field(**SHA256)


class HessianFactors(_Strict):
    """Zero rows for the identity curvature, which has no factors."""

    name: str = pa.Field(**NON_EMPTY)
    shape: pl.List(pl.Int64) = pa.Field()
    dtype: str = pa.Field(isin=["float64"])
    data: pl.Binary = pa.Field(float_blob={"itemsize": 8}, matches_shape=(), finite_blob=())
    kind: str = pa.Field(isin=("raw", "kfac", "ekfac"))
    fisher: str = pa.Field(isin=("empirical", "sampled"))
    projection_hash: str = pa.Field(**SHA256)
    examples: pl.Int64 = pa.Field(ge=1)
    tokens: pl.Int64 = pa.Field(ge=1)


class InfluencePartials(_Strict):
    """One scored group of shards per (valuation_id, part), merged by influence_scores; every tensor is
    stored as float64 (row indices are exact below 2**53)."""

    name: str = pa.Field(isin=("top_scores", "top_indices", "example_totals", "doc_sums", "provider_sums"))
    shape: pl.List(pl.Int64) = pa.Field()
    dtype: str = pa.Field(isin=["float64"])
    data: pl.Binary = pa.Field(float_blob={"itemsize": 8}, matches_shape=(), finite_blob=())
    valuation_id: str = pa.Field(str_matches=r"^v-[0-9a-f]{16}$")
    part: str = pa.Field(str_matches=r"^[0-9]{4,}$")
    shards: pl.List(pl.String) = pa.Field()
    rows: pl.Int64 = pa.Field(ge=1)
    queries: pl.Int64 = pa.Field(ge=1)
    seconds: pl.Float64 = pa.Field(ge=0)


class ValuationQueries(_Strict):
    """An empty completion (the model ended at once) is allowed: its gradient is zero. `reference`: the
    completion came from the query file (else it is the model's greedy one); `loss`: the completion's summed
    NLL (nats) under the model; `query_group`: the line's optional group."""

    query_id: str = pa.Field(**NON_EMPTY, unique=True)
    prompt: str = pa.Field()
    completion: str = pa.Field()
    reference: bool = pa.Field()
    query_group: str = pa.Field(**NON_EMPTY, nullable=True)
    prompt_tokens: pl.Int64 = pa.Field(ge=1)
    completion_tokens: pl.Int64 = pa.Field(ge=0)
    loss: pl.Float64 = pa.Field(ge=0, finite_values=())
    gradient: pl.Binary = pa.Field(float_blob={"itemsize": 4}, same_length=(), finite_blob=())
    projection_hash: str = pa.Field(**SHA256)
    model_hash: str = pa.Field(**SHA256)


class InfluenceScores(_Strict):
    """top_sequence / top_document rows per query (rank from 1), document_total rows (no query,
    no rank) and provider_query rows (a provider's summed score on one query; no doc, no rank)."""

    valuation_id: str = pa.Field(str_matches=r"^v-[0-9a-f]{16}$")
    query_id: str = pa.Field(**NON_EMPTY, nullable=True)
    kind: str = pa.Field(isin=INFLUENCE_KINDS)
    rank: pl.Int64 = pa.Field(ge=1, nullable=True)
    seq_id: str = pa.Field(**NON_EMPTY, nullable=True)
    doc_id: str = pa.Field(**NON_EMPTY, nullable=True)
    provider_id: str = pa.Field(**NON_EMPTY)
    score: pl.Float64 = pa.Field(finite_values=())

    @pa.dataframe_check
    def seq_id_only_on_top_sequence_rows(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("seq_id").is_not_null() == (pl.col("kind") == "top_sequence"))

    @pa.dataframe_check
    def rank_only_on_top_rows(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("rank").is_not_null() == pl.col("kind").str.starts_with("top_"))

    @pa.dataframe_check
    def doc_id_null_only_on_provider_rows(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("doc_id").is_not_null() | (pl.col("kind") == "provider_query"))

    @pa.dataframe_check
    def query_id_null_only_on_document_totals(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("query_id").is_not_null() | (pl.col("kind") == "document_total"))


class ProviderValuations(_Strict):
    """One row per provider; the unit and every column are defined in domain/valuation.py: value_nats is the
    predicted rise of the mean query loss (nats) if the provider's rows were removed."""

    valuation_id: str = pa.Field(**NON_EMPTY)
    provider_id: str = pa.Field(**NON_EMPTY)
    value_nats: pl.Float64 = pa.Field(finite_values=())
    value_relative: pl.Float64 = pa.Field(finite_values=())
    value_nats_per_token: pl.Float64 = pa.Field(finite_values=())
    share: pl.Float64 = pa.Field(ge=-1, le=1, finite_values=())
    ci_low: pl.Float64 = pa.Field(finite_values=())
    ci_high: pl.Float64 = pa.Field(finite_values=())
    verdict: str = pa.Field(isin=("helps", "hurts", "not distinguishable from 0"))
    queries_helped: pl.Float64 = pa.Field(ge=0, le=1)
    query_p10: pl.Float64 = pa.Field(finite_values=())
    query_p90: pl.Float64 = pa.Field(finite_values=())
    documents: pl.Int64 = pa.Field(ge=0)
    tokens: pl.Int64 = pa.Field(ge=0)
    queries: pl.Int64 = pa.Field(ge=1)
    training_rows: pl.Int64 = pa.Field(ge=1)
    mean_query_loss: pl.Float64 = pa.Field(ge=0, finite_values=())
    value_per_training_token: pl.Float64 = pa.Field(finite_values=())
    mlflow_run_id: str = pa.Field(**NON_EMPTY)

    @pa.dataframe_check
    def ci_low_not_above_ci_high(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("ci_low") <= pl.col("ci_high"))

    @pa.dataframe_check
    def query_p10_not_above_query_p90(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("query_p10") <= pl.col("query_p90"))

    @pa.dataframe_check
    def verdict_agrees_with_the_interval(cls, data: pa.PolarsData) -> pl.LazyFrame:
        verdict = (
            pl.when(pl.col("ci_low") > 0)
            .then(pl.lit("helps"))
            .when(pl.col("ci_high") < 0)
            .then(pl.lit("hurts"))
            .otherwise(pl.lit("not distinguishable from 0"))
        )
        return data.lazyframe.select(pl.col("verdict") == verdict)


class ModelCheckpoint(_Strict):
    checkpoint_hash: str = pa.Field(**SHA256)  # of the base, combined with the adapter's files when there is one
    path: str = pa.Field(**NON_EMPTY)
    adapter_path: str = pa.Field()  # the LoRA adapter folder applied on the base; "" for none
    source: str = pa.Field(isin=("embedded", "local"))
    model_type: str = pa.Field(**NON_EMPTY)
    parameters: pl.Int64 = pa.Field(ge=1)
    context_length: pl.Int64 = pa.Field(ge=1)
    corpus_version: pl.Int64 = pa.Field(ge=0, nullable=True)
    mlflow_run_id: str = pa.Field()
    created_at: pe.DateTime = pa.Field(**UTC_MICROSECONDS)


class GradientProjection(_Strict):
    projection_hash: str = pa.Field(**SHA256)
    path: str = pa.Field(**NON_EMPTY)
    config: str = pa.Field(str_startswith="{")
    dim: pl.Int64 = pa.Field(ge=1)
    layers: pl.Int64 = pa.Field(ge=1)
    model_hash: str = pa.Field(**SHA256)
    created_at: pe.DateTime = pa.Field(**UTC_MICROSECONDS)


class ValuationProvenance(_Strict):
    valuation_id: str = pa.Field(str_matches=r"^v-[0-9a-f]{16}$")
    provenance: str = pa.Field(str_startswith="{")
    dagster_run_id: str = pa.Field(**NON_EMPTY)
    training_rows: pl.Int64 = pa.Field(ge=1)
    queries: pl.Int64 = pa.Field(ge=1)
    scoring_seconds: pl.Float64 = pa.Field(ge=0)
    rows_per_second: pl.Float64 = pa.Field(ge=0, finite_values=())
    created_at: pe.DateTime = pa.Field(**UTC_MICROSECONDS)


SCHEMAS: dict[str, type[pa.DataFrameModel]] = {
    "model_checkpoint": ModelCheckpoint,
    "gradient_projection": GradientProjection,
    "valuation_provenance": ValuationProvenance,
    "training_corpus": TrainingCorpus,
    "token_shards": TokenShards,
    "projected_gradients": ProjectedGradients,
    "projected_gradients_statistics": ProjectedGradientsStatistics,
    "hessian_factors": HessianFactors,
    "valuation_queries": ValuationQueries,
    "influence_partials": InfluencePartials,
    "influence_scores": InfluenceScores,
    "provider_valuations": ProviderValuations,
}


def validate(table_name: str, df: pl.DataFrame) -> list[str]:
    """Human-readable schema failures of ``df`` as table ``table_name``; empty when valid.

    One line per (column, check) that fails, naming the failing rows (0-based) and a few values.
    """
    if table_name not in SCHEMAS:
        raise KeyError(f"no schema for table {table_name!r}; known tables: {sorted(SCHEMAS)}")
    schema = SCHEMAS[table_name].to_schema()
    # pandera reports failing values as text, which a blob that is not UTF-8 cannot be: blobs are checked below
    blobs = [name for name, column in schema.columns.items() if column.checks and df.schema.get(name) == pl.Binary]
    failures = []
    try:
        schema.update_columns({name: {"checks": []} for name in blobs}).validate(df, lazy=True)
    except pa.errors.SchemaErrors as errors:
        grouped = errors.failure_cases.group_by("schema_context", "column", "check", maintain_order=True).agg(
            "failure_case", pl.col("index").drop_nulls()
        )
        failures += [_shorten(f"{table_name}: {_describe(table_name, *row)}") for row in grouped.iter_rows()]
    for name in blobs:
        for check in schema.columns[name].checks:
            passed = check(df.lazy(), name).check_output.collect().to_series()
            rows = (~passed.fill_null(True)).arg_true().to_list()
            if rows:
                cases = [df[name][i][:8].hex() + "..." for i in rows[:3]]
                failures.append(
                    _shorten(
                        f"{table_name}: {_describe(table_name, 'Column', name, check.error or check.name, cases, rows)}"
                    )
                )
    return failures


def _describe(table_name: str, context: str, column: str, check: str, cases: list[str], rows: list[int]) -> str:
    if check == "column_in_schema":
        return f"unexpected column(s) {cases}; the table has exactly {list(SCHEMAS[table_name].to_schema().columns)}"
    if check == "column_in_dataframe":
        return f"missing column(s) {cases}"
    if check.startswith("dtype("):
        return f"column {column!r} has type {cases[0]}, expected {check}"
    where = f"in {len(rows)} row(s) {rows[:5]}{'...' if len(rows) > 5 else ''}"
    subject = f"row check {check}" if context == "DataFrameSchema" else f"column {column!r}: check {check}"
    return f"{subject} fails {where}; e.g. {[_shorten(str(case), MAX_EXAMPLE_CHARS) for case in cases[:3]]}"


def _shorten(message: str, limit: int = MAX_FAILURE_CHARS) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
