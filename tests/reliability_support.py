"""Helpers of the reliability tests: a materialized tiny home, clones of it, runs of chosen assets.

A clone copies the state folder (Delta tables, staged batches, models) into a new folder and points
DATAWORTH_HOME at it, so a test can break things without touching the module's shared home.
"""

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import torch
from polars.testing import assert_frame_equal

from domain.settings import Settings
from pipelines.definitions import build_definitions
from resources.delta import DeltaStore
from resources.schemas import SCHEMAS
from tests.pipeline_harness import RANGE_END, RANGE_START, TinySetup, landing_records, make_tiny_setup, write_jsonl

PARTITIONED = {"training_corpus", "token_shards", "projected_gradients"}
LONG_DOC_ID = "pandas/long-document"


def materialized_setup(tmp_path: Path, monkeypatch, long_document: bool = False) -> TinySetup:
    """The tiny setup with every asset materialized (optionally with one document of ~1000 tokens)."""
    setup = make_tiny_setup(tmp_path, monkeypatch)
    if long_document:
        record = landing_records("pandas", 5, 1, chars=1500)[0]
        write_jsonl(setup.landing / "long.jsonl", [{**record, "doc_id": LONG_DOC_ID}])
    setup.stage()
    assert all(result.success for result in setup.run_stale())
    return setup


def changed(settings: Settings, **sections: dict) -> Settings:
    """`settings` with some keys of some sections (or top-level values) changed, validated like a settings file."""
    data = settings.to_dict()
    for section, values in sections.items():
        data[section] = {**data[section], **values} if isinstance(values, dict) else values
    return Settings.from_dict(data)


def run(
    setup: TinySetup, *assets: str, settings: Settings | None = None, shards: list[str] | None = None
) -> dg.ExecuteInProcessResult:
    """Materialize `assets` (over `shards`, default all, for partitioned ones) in process; never raises."""
    job = build_definitions(settings or setup.settings).resolve_job_def("valuation")
    tags = {}
    if PARTITIONED & set(assets):
        shards = shards or setup.instance.get_dynamic_partitions("shards")
        tags = {RANGE_START: shards[0], RANGE_END: shards[-1]}
    return job.execute_in_process(
        instance=setup.instance, asset_selection=[dg.AssetKey(a) for a in assets], tags=tags, raise_on_error=False
    )


def failure(result: dg.ExecuteInProcessResult) -> str:
    """The error (class names and messages, causes included) of the failed steps of a run."""
    assert not result.success
    texts = []
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        while error is not None:
            texts.append(f"{error.cls_name}: {error.message}")
            error = error.cause
    return "\n".join(texts)


def versions(delta: DeltaStore) -> dict[str, int | None]:
    """The latest version of every table."""
    return {table: delta.version(table) for table in sorted(SCHEMAS)}


def clone(setup: TinySetup, target: Path, monkeypatch) -> TinySetup:
    """A copy of `setup`'s state folder at `target`, made current, with its shards registered."""
    home = target / "home"
    shutil.copytree(setup.home, home, symlinks=True)
    monkeypatch.setenv("DATAWORTH_HOME", str(home))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", setup.instance.get_dynamic_partitions("shards"))
    return TinySetup(home, home / "landing", setup.settings, instance)


# Columns that identify a row, and columns that legitimately differ between two materializations
# (timestamps, run ids, timings); `canonical` drops the latter and sorts by the former.
KEYS = {
    "training_corpus": ["doc_id"],
    "token_shards": ["seq_id"],
    "projected_gradients": ["seq_id"],
    "projected_gradients_statistics": ["shard_id", "name"],
    "hessian_factors": ["name"],
    "valuation_queries": ["query_id"],
    "influence_scores": ["valuation_id", "kind", "query_id", "rank", "doc_id", "provider_id"],
    "influence_partials": ["valuation_id", "part", "name"],
    "provider_valuations": ["valuation_id", "provider_id"],
    "model_checkpoint": ["checkpoint_hash"],
    "gradient_projection": ["projection_hash"],
    "valuation_provenance": ["valuation_id"],
}
VOLATILE = {
    "training_corpus": ["ingested_at"],
    "model_checkpoint": ["created_at", "mlflow_run_id"],
    "gradient_projection": ["created_at"],
    "provider_valuations": ["mlflow_run_id"],
    "influence_partials": ["seconds"],
    "valuation_provenance": ["dagster_run_id", "scoring_seconds", "rows_per_second", "created_at"],
}


def canonical(table: str, frame, drop: tuple[str, ...] = ()):
    """`frame` without volatile (and `drop`) columns, sorted by its key columns."""
    gone = [c for c in (*VOLATILE.get(table, ()), *drop) if c in frame.columns]
    return frame.drop(gone).sort([k for k in KEYS[table] if k not in gone], nulls_last=True)


# Float32 sums are reassociated by the BLAS's blocking, which MKL chooses by thread count and memory
# alignment: tensors written by another process agree to rounding, not to the bit. Everything else
# (keys, shapes, counts, ids) must agree exactly.
def blob_values(frame: pl.DataFrame, column: str) -> torch.Tensor:
    """The values of a blob column, concatenated as float64: float32 `gradient` rows, or `data` rows of their
    row's `dtype`."""
    dtypes = frame["dtype"].to_list() if column == "data" else ["float32"] * frame.height
    arrays = [np.frombuffer(blob, dtype=np.dtype(dtype)) for blob, dtype in zip(frame[column], dtypes)]
    return torch.from_numpy(np.concatenate([np.zeros(0), *arrays]).astype(np.float64))


def assert_same_rows(table: str, actual: pl.DataFrame, expected: pl.DataFrame, drop: tuple[str, ...] = ()):
    """`actual` holds `expected`'s rows: exactly, except tensor blobs, which agree up to float32 rounding
    (relative 1e-4, absolute 1e-5 of the largest value)."""
    actual, expected = canonical(table, actual, drop), canonical(table, expected, drop)
    blobs = [c for c in ("gradient", "data") if c in expected.columns]
    assert_frame_equal(actual.drop(blobs), expected.drop(blobs))
    for column in blobs:
        got, want = blob_values(actual, column), blob_values(expected, column)
        atol = 1e-5 * want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=lambda m, c=column: f"{table}.{c}: {m}")
