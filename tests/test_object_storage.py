"""Delta tables, MLflow artifacts, checkpoints and projections on object storage: an S3-compatible server
started here (moto), safe concurrent writers (conditional put, never the unsafe-rename escape hatch), time
travel, folders fetched by a process that never had them, and `dataworth audit --verify`."""

import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from domain.artifacts import latest_row
from resources.delta import DeltaStore, TableVersionMissing, run_metadata
from resources.folders import COMPLETE, FolderStoreError, local_folder, publish
from tests.pipeline_harness import make_tiny_setup
from tests.test_delta_store import META, ROUNDS, _write_partitions, shard_frame

pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install -e '.[dev]'")


def test_round_trip_replace_and_time_travel_on_s3(bucket):
    store = DeltaStore(root=f"{bucket}/delta")
    assert store.table_path("t") == f"{bucket}/delta/t" and not store.exists("t")
    assert store.write("t", shard_frame("s-0000", 3), partition_by=["shard_id"], metadata=META) == 0
    store.replace_shard("t", "s-0001", shard_frame("s-0001", 2), metadata=META)
    store.replace_shard("t", "s-0000", shard_frame("s-0000", 1, start=10), metadata=META)
    assert store.version("t") == 2
    assert dict(store.read("t").group_by("shard_id").len().iter_rows()) == {"s-0000": 1, "s-0001": 2}
    assert store.read("t", version=0).height == 3  # time travel
    assert store.commit_metadata("t", 1) == {**META}
    with pytest.raises(TableVersionMissing):
        store.read("t", version=7)


def test_two_processes_writing_partitions_of_one_s3_table_both_land(bucket):
    store = DeltaStore(root=f"{bucket}/delta")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_write_partitions, args=(store, w, barrier)) for w in ("w0", "w1")]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=300)
    assert [p.exitcode for p in workers] == [0, 0]
    counts = dict(store.read("t").group_by("shard_id").len().iter_rows())
    assert counts == {f"{w}-{r}": 3 for w in ("w0", "w1") for r in range(ROUNDS)}
    assert store.read("log").height == 2 * ROUNDS and store.version("t") == 2 * ROUNDS - 1


def test_valuation_on_s3_tables_audits_and_verifies(bucket, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("DATAWORTH_DELTA_ROOT", f"{bucket}/state/delta")
    monkeypatch.setenv("DATAWORTH_ARTIFACT_ROOT", f"{bucket}/state/mlflow")
    monkeypatch.setenv("DATAWORTH_MODELS_ROOT", f"{bucket}/state")
    setup = make_tiny_setup(tmp_path, monkeypatch)
    setup.stage()
    assert all(r.success for r in setup.run_stale())
    assert not (setup.home / "delta").exists()  # every table went to the bucket
    checkpoint = DeltaStore().read("model_checkpoint")["path"][0]
    projection = DeltaStore().read("gradient_projection")["path"][0]
    assert checkpoint.startswith(f"{bucket}/state/models/") and projection.startswith(f"{bucket}/state/projections/")
    # a worker that never had the folders (they are not in its state folder) fetches them from the bucket
    for folder in ("models", "projections"):
        shutil.rmtree(setup.home / folder)
    objects = boto3.client("s3").list_objects_v2(Bucket=bucket.removeprefix("s3://"), Prefix="state/mlflow/")
    artifacts = {item["Key"].rsplit("/", 1)[-1] for item in objects.get("Contents", [])}
    assert {"provider_valuations.png", "provenance.json"} <= artifacts  # MLflow's artifacts too
    store = DeltaStore()
    vid = store.read("valuation_provenance")["valuation_id"][0]
    assert store.table_path("influence_scores").startswith(f"{bucket}/state/delta/")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dataworth"), "audit", vid, "--verify"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout
    assert Path(latest_row(store, "gradient_projection")["path"]).parent == setup.home / "projections"
    assert (setup.home / "models" / checkpoint.rsplit("/", 1)[-1] / "config.json").is_file()
    store.write("unrelated", shard_frame("s-0000", 1), metadata=run_metadata("r", "v", {}))  # the bucket stays usable


def test_published_folder_is_fetched_once_by_another_state_folder(bucket, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("DATAWORTH_MODELS_ROOT", f"{bucket}/shared/")
    folder = tmp_path / "writer" / "projections" / "abc123"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(bytes(range(256)) * 50)
    (folder / "sub" / "config.json").write_text('{"rank": 4}')
    uri = publish(folder, "projections", "abc123")
    assert uri == f"{bucket}/shared/projections/abc123"
    assert publish(folder, "projections", "abc123") == uri  # already there: nothing is uploaded again

    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "reader"))
    fetched = local_folder(uri)
    assert fetched == tmp_path / "reader" / "projections" / "abc123"
    assert sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()) == [
        "sub/config.json",
        "weights.safetensors",
    ]  # the completion marker is not part of the copy
    assert (fetched / "weights.safetensors").read_bytes() == (folder / "weights.safetensors").read_bytes()
    assert (fetched / "sub" / "config.json").read_text() == '{"rank": 4}'
    assert [p.name for p in fetched.parent.iterdir()] == ["abc123"]  # no staging folder left behind

    # an upload that stopped before its marker is never read
    boto3.client("s3").delete_object(Bucket=bucket.removeprefix("s3://"), Key=f"shared/projections/abc123/{COMPLETE}")
    shutil.rmtree(fetched)
    with pytest.raises(FolderStoreError, match="not fully uploaded; re-materialize"):
        local_folder(uri)
    assert not (tmp_path / "reader" / "projections" / "abc123").exists()
    with pytest.raises(FolderStoreError, match="not a published folder name"):
        local_folder(f"{bucket}/shared/../etc")
    for wrong in ("gs://elsewhere/x", "/mnt/shared/models", "s3://"):
        monkeypatch.setenv("DATAWORTH_MODELS_ROOT", wrong)
        with pytest.raises(FolderStoreError, match=r"DATAWORTH_MODELS_ROOT=.* is not an s3://bucket/prefix URI"):
            publish(folder, "projections", "abc123")
