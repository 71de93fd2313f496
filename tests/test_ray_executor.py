"""The same asset graph on a Ray cluster with its tables on object storage: a head node started here, every
step a Ray job, the Delta tables, checkpoint, projection and MLflow artifacts in a bucket of a local S3 server
(moto); rows equal to the local executor's on local disk. The cluster has the S3 credentials (its processes
start with the AWS_* variables, as a cluster's nodes would); `[deployment]` (Ray, capture and scoring each split
over 2 steps) and the DATAWORTH_*_ROOT variables are the only differences between the two homes."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.pipeline_harness import TINY_SETTINGS, make_tiny_setup
from tests.reliability_support import assert_same_rows

pytest.importorskip("dagster_ray", reason="dagster-ray is not installed: pip install -e '.[dev]'")
pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install -e '.[dev]'")
RAY = Path(sys.executable).parent / "ray"
COMPARED = (
    "training_corpus",
    "token_shards",
    "projected_gradients",
    "hessian_factors",
    "valuation_queries",
    "influence_scores",
    "provider_valuations",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A Ray head node on this machine with 4 worker CPUs; yields its job-submission address."""
    dashboard, gcs = free_port(), free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    start = [
        str(RAY),
        "start",
        "--head",
        "--num-cpus",
        "4",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
        "--temp-dir",
        str(temp),
    ]
    env = {**os.environ, "PATH": f"{RAY.parent}{os.pathsep}{os.environ['PATH']}"}  # jobs run `dagster api ...`
    subprocess.run(start, check=True, capture_output=True, timeout=180, env=env)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], check=False, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_on_s3_gives_the_local_executors_rows(tmp_path, monkeypatch, bucket, ray_cluster):
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    local = make_tiny_setup(tmp_path / "local", monkeypatch)
    local.stage()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray step with 1 CPU (OMP_NUM_THREADS=1): same float summation order
    try:
        assert all(r.success for r in local.run_stale())
    finally:
        torch.set_num_threads(threads)
    expected = {t: local.delta.read(t) for t in COMPARED}

    monkeypatch.setenv("DATAWORTH_DELTA_ROOT", f"{bucket}/state/delta")
    monkeypatch.setenv("DATAWORTH_ARTIFACT_ROOT", f"{bucket}/state/mlflow")
    monkeypatch.setenv("DATAWORTH_MODELS_ROOT", f"{bucket}/state")
    on_ray = make_tiny_setup(
        tmp_path / "ray",
        monkeypatch,
        TINY_SETTINGS
        + f'[deployment]\nexecutor = "ray"\nray_address = "{ray_cluster}"\ncapture_workers = 2\nscoring_workers = 2\n',
    )
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dataworth"), "run"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = subprocess.run(
        [str(RAY), "job", "list", "--address", ray_cluster], capture_output=True, text=True, timeout=60
    )
    assert jobs.stdout.count("SUCCEEDED") >= len(COMPARED), jobs.stdout[-2000:]  # the steps ran as Ray jobs
    assert not (on_ray.home / "delta").exists()  # every table went to the bucket
    assert on_ray.delta.table_path("influence_scores").startswith(f"{bucket}/state/delta/")
    for table in COMPARED:
        assert_same_rows(table, on_ray.delta.read(table), expected[table], ("mlflow_run_id",))
