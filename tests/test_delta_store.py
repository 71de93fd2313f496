"""DeltaStore against real Delta tables in tmp_path (and real spawned writer processes)."""

from __future__ import annotations

import json
import multiprocessing
import pickle

import polars as pl
import pytest
from deltalake import DeltaTable

from resources.delta import (
    DeltaStore,
    TableNotFoundError,
    TableSchemaMismatch,
    TableVersionMissing,
    run_metadata,
)
from resources.schemas import SCHEMAS, validate
from tests.test_schemas import VALID as VALID_FRAMES

META = run_metadata("run-1", "code-v1", {"training_corpus": 3})


def shard_frame(shard_id: str, n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "shard_id": [shard_id] * n,
            "seq_index": list(range(start, start + n)),
            "gradient": [bytes([i % 256]) * 8 for i in range(n)],
            "input_ids": [[i, i + 1] for i in range(n)],
        },
        schema={"shard_id": pl.String, "seq_index": pl.Int64, "gradient": pl.Binary, "input_ids": pl.List(pl.Int32)},
    )


@pytest.fixture
def store(tmp_path) -> DeltaStore:
    return DeltaStore(root=str(tmp_path / "delta"))


def test_round_trip_keeps_types_and_returns_versions(store):
    assert not store.exists("t") and store.version("t") is None
    frame = shard_frame("s-0000", 3)
    assert store.write("t", frame, partition_by=["shard_id"], metadata=META) == 0
    assert store.exists("t") and store.version("t") == 0
    back = store.read("t")
    assert back.schema == frame.schema
    assert back.sort("seq_index").equals(frame)
    assert store.write("t", shard_frame("s-0001", 2), metadata=META) == 1
    assert store.read("t", columns=["seq_index"], where={"shard_id": "s-0001"})["seq_index"].to_list() == [0, 1]
    assert store.read("t", where={"shard_id": ["s-0000", "s-0001"]}).height == 5
    assert store.read("t", where={"shard_id": []}).height == 0
    quoted = "s-0001' OR '1' = '1"  # values are data, never SQL
    assert store.read("t", where={"shard_id": quoted}).height == 0


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_every_table_schema_survives_a_delta_round_trip(store, table):
    store.write(table, VALID_FRAMES[table], metadata=META)
    back = store.read(table)
    assert back.equals(VALID_FRAMES[table])
    assert validate(table, back) == []


def test_time_travel_reads_old_versions(store):
    store.write("t", shard_frame("a", 2), partition_by=["shard_id"], metadata=META)
    store.write("t", shard_frame("b", 5), metadata=META)
    store.write("t", shard_frame("a", 1), mode="overwrite", replace_where={"shard_id": "a"}, metadata=META)
    assert store.read("t", version=0).height == 2
    assert store.read("t", version=1).height == 7
    assert store.read("t", version=2).height == 6
    assert store.read("t").height == 6


def test_partition_replace_is_idempotent_and_leaves_other_partitions(store):
    for shard in ("s-0001", "s-0002", "s-0003"):
        store.write("t", shard_frame(shard, 4), partition_by=["shard_id"], metadata=META)
    for _ in range(2):
        store.write(
            "t",
            shard_frame("s-0003", 2, start=100),
            mode="overwrite",
            replace_where={"shard_id": "s-0003"},
            metadata=META,
        )
    counts = dict(store.read("t").group_by("shard_id").len().iter_rows())
    assert counts == {"s-0001": 4, "s-0002": 4, "s-0003": 2}
    assert sorted(store.read("t", where={"shard_id": "s-0003"})["seq_index"]) == [100, 101]


def test_replace_where_refuses_rows_outside_the_partition(store):
    store.write("t", shard_frame("a", 2), partition_by=["shard_id"], metadata=META)
    with pytest.raises(ValueError, match="do not match replace_where"):
        store.write("t", shard_frame("b", 2), mode="overwrite", replace_where={"shard_id": "a"}, metadata=META)
    with pytest.raises(ValueError, match="needs mode='overwrite'"):
        store.write("t", shard_frame("a", 2), replace_where={"shard_id": "a"}, metadata=META)


def test_whole_table_overwrite_replaces_everything(store):
    store.write("t", shard_frame("a", 2), partition_by=["shard_id"], metadata=META)
    store.write("t", pl.DataFrame({"x": [1.5]}), mode="overwrite", metadata=META)
    assert store.read("t").to_dict(as_series=False) == {"x": [1.5]}


def test_schema_mismatch_is_named(store):
    store.write("t", shard_frame("a", 2), partition_by=["shard_id"], metadata=META)
    with pytest.raises(TableSchemaMismatch, match="'t'"):
        store.write("t", pl.DataFrame({"other": ["x"]}), metadata=META)


def test_commit_metadata_round_trip(store):
    store.write("t", shard_frame("a", 1), metadata=META)
    other = run_metadata("run-2", "code-v2", {"training_corpus": 4, "token_shards": None})
    store.write("t", shard_frame("b", 1), metadata=other)
    assert store.commit_metadata("t", 0) == META
    assert store.commit_metadata("t", 1) == other
    assert json.loads(store.commit_metadata("t", 1)["upstream_versions"]) == {
        "token_shards": None,
        "training_corpus": 4,
    }


def test_secret_looking_metadata_is_dropped(store, caplog):
    leaky = {**META, "api_key": "sk-123", "DB_PASSWORD": "hunter2", "github_token": "ghp_x", "client_secret": "s"}
    store.write("t", shard_frame("a", 1), metadata=leaky)
    assert store.commit_metadata("t", 0) == META
    log = DeltaTable(store.table_path("t")).history()[0]
    assert not {"sk-123", "hunter2", "ghp_x"} & {str(v) for v in log.values()}
    assert "api_key" in caplog.text and "sk-123" not in caplog.text
    with pytest.raises(TypeError, match="json.dumps"):
        store.write("t", shard_frame("a", 1), metadata={"upstream_versions": {"a": 1}})


def test_missing_table_and_version_errors_say_what_to_do(store):
    with pytest.raises(TableNotFoundError, match="'nope' does not exist.*Materialize"):
        store.read("nope")
    store.write("t", shard_frame("a", 2), partition_by=["shard_id"], metadata=META)
    with pytest.raises(TableVersionMissing, match="version 7 of Delta table 't'.*never committed.*latest version is 0"):
        store.read("t", version=7)
    with pytest.raises(TableVersionMissing, match="never committed"):
        store.commit_metadata("t", 3)


def test_vacuumed_version_is_reported(store):
    store.write("t", shard_frame("a", 2), partition_by=["shard_id"], metadata=META)
    store.write("t", shard_frame("a", 1), mode="overwrite", replace_where={"shard_id": "a"}, metadata=META)
    DeltaTable(store.table_path("t")).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    with pytest.raises(TableVersionMissing, match=r"version 0 of Delta table 't'.*vacuumed.*latest version is \d+"):
        store.read("t", version=0)
    assert store.read("t").height == 1


def test_table_names_cannot_escape_the_root(store):
    for name in ("../x", "/etc", "a/b", ""):
        with pytest.raises(ValueError):
            store.table_path(name)


def test_default_root_follows_dataworth_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "home"))
    assert DeltaStore().table_path("t") == str(tmp_path / "home" / "delta" / "t")


ROUNDS = 4


def _write_partitions(store: DeltaStore, worker: str, barrier) -> None:
    barrier.wait()
    for round_ in range(ROUNDS):
        shard = f"{worker}-{round_}"
        store.write(
            "t",
            shard_frame(shard, 3),
            mode="overwrite",
            partition_by=["shard_id"],
            replace_where={"shard_id": shard},
            metadata=run_metadata(f"run-{worker}", "v1", {}),
        )
        store.write("log", shard_frame(shard, 1), partition_by=["shard_id"], metadata=META)


def test_concurrent_spawned_writers_all_land(tmp_path):
    root = str(tmp_path / "delta")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    store = DeltaStore(root=root)
    assert pickle.loads(pickle.dumps(store)) == store
    workers = [context.Process(target=_write_partitions, args=(store, w, barrier)) for w in ("w0", "w1")]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0]
    counts = dict(store.read("t").group_by("shard_id").len().iter_rows())
    assert counts == {f"{w}-{r}": 3 for w in ("w0", "w1") for r in range(ROUNDS)}
    assert store.read("log").height == 2 * ROUNDS
    assert store.version("t") == 2 * ROUNDS - 1
