"""Faults: a gradient step or `dataworth run` killed with SIGKILL, concurrent writers, re-materialization,
two fresh homes.

One tiny home is materialized per module and its tables kept as the reference (the uninterrupted run).
Child processes (tests/reliability_worker.py) run the real job on a clone of that home.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from deltalake import DeltaTable

from domain.artifacts import latest_row
from pipelines import cli
from pipelines.automation import active_run, code_versions, stale_shards, stale_work
from resources.schemas import SCHEMAS
from resources.state import PROJECT_ROOT, dagster_home
from tests.pipeline_harness import make_tiny_setup
from tests.reliability_support import assert_same_rows, clone, materialized_setup, run

GRADIENT_TABLES = ("projected_gradients", "projected_gradients_statistics")
SECRET = "sk-test-do-not-store-0123456789"
RUN_METADATA_KEYS = {"dataworth.dagster_run_id", "dataworth.code_version", "dataworth.upstream_versions"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The materialized home and a copy of every table as the uninterrupted run wrote it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("DATAWORTH_TEST_API_TOKEN", SECRET)  # a secret in the environment of the run
        setup = materialized_setup(tmp_path_factory.mktemp("faults"), monkeypatch)
        yield setup, {table: setup.delta.read(table) for table in SCHEMAS}


def worker(log, assets: str, shards: list[str], all_shards: list[str]) -> subprocess.Popen:
    """A child process materializing `assets` for the contiguous range `shards` (env: the current home)."""
    command = [sys.executable, "-m", "tests.reliability_worker", assets, shards[0], shards[-1], *all_shards]
    return subprocess.Popen(command, cwd=PROJECT_ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)


def commits(home, table: str) -> int:
    log = home / "delta" / table / "_delta_log"
    return len([p for p in log.glob("*.json") if p.stem.isdigit()]) if log.is_dir() else 0


def fresh_gradient_tables(setup, tmp_path, monkeypatch):
    """A clone of the home whose gradient tables were never written (the first gradient run)."""
    home = clone(setup, tmp_path, monkeypatch)
    for table in GRADIENT_TABLES:
        shutil.rmtree(home.home / "delta" / table)
    return home, home.instance.get_dynamic_partitions("shards")


def test_sigkill_mid_run_then_rerun_gives_exactly_the_uninterrupted_rows(base, tmp_path, monkeypatch):
    setup, reference = base
    home, shards = fresh_gradient_tables(setup, tmp_path, monkeypatch)
    with open(tmp_path / "worker.log", "wb") as log:
        child = worker(log, "projected_gradients", shards, shards)
        deadline = time.monotonic() + 300
        while (
            not any(commits(home.home, t) for t in GRADIENT_TABLES)
            and child.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)  # the first shard just committed: kill it mid-range, mid-shard maybe
        assert child.wait() == -signal.SIGKILL, (tmp_path / "worker.log").read_text()[-3000:]

    landed = (
        home.delta.read("projected_gradients")["shard_id"].unique().to_list()
        if home.delta.exists("projected_gradients")
        else []
    )
    assert len(landed) < len(shards)  # it died before finishing
    stale = stale_shards(home.delta, shards)
    assert stale == [s for s in shards if s not in landed]
    covering = shards[shards.index(stale[0]) : shards.index(stale[-1]) + 1]  # the range stale_work requests
    assert run(home, "projected_gradients", shards=covering).success
    for table in GRADIENT_TABLES:  # no duplicates, no gaps, the same bytes
        assert_same_rows(table, home.delta.read(table), reference[table])

    assert run(home, "hessian_factors", "influence_scores").success
    assert_same_rows("hessian_factors", home.delta.read("hessian_factors"), reference["hessian_factors"])
    vid = latest_row(home.delta, "valuation_provenance")["valuation_id"]
    scores = home.delta.read("influence_scores", where={"valuation_id": vid})
    assert_same_rows("influence_scores", scores, reference["influence_scores"], drop=("valuation_id",))


def test_dataworth_run_waits_for_a_live_run_and_takes_over_from_a_killed_one(tmp_path, monkeypatch, capsys):
    """A second `dataworth run` refuses while the first runs; killed (its whole process group), the first
    stays STARTED until the next `dataworth run` marks it failed and finishes the valuation."""
    setup = make_tiny_setup(tmp_path, monkeypatch)
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home()))  # the instance `dataworth run` uses
    script = Path(sys.executable).parent / "dataworth"
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(
            [script, "run"], env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 300
            while (
                not commits(setup.home, "projected_gradients") and first.poll() is None and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            instance = dg.DagsterInstance.get()
            (live,) = instance.get_runs()
            warnings = []
            assert active_run(instance, warnings.append) == live.run_id and warnings == []
            assert cli.main(["run"]) == 1
            assert f"valuation run {live.run_id} is in progress; wait for it to end" in capsys.readouterr().err
            assert len(instance.get_runs()) == 1 and first.poll() is None  # it refused while the first still ran
        finally:
            os.killpg(first.pid, signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert instance.get_run_by_id(live.run_id).status == dg.DagsterRunStatus.STARTED

    resumed = subprocess.run([script, "run"], check=False, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"marked valuation run {live.run_id} failed: process {first.pid}, which ran it, is gone" in resumed.stderr
    assert instance.get_run_by_id(live.run_id).status == dg.DagsterRunStatus.FAILURE
    shards = instance.get_dynamic_partitions("shards")
    gradients = setup.delta.read("projected_gradients")
    assert sorted(gradients["shard_id"].unique()) == sorted(shards) and gradients["seq_id"].is_unique().all()
    assert gradients.height == setup.delta.read("token_shards").height
    assert stale_work(instance, setup.delta, code_versions(setup.definitions().assets)) == []


def test_two_processes_writing_partitions_of_one_table_both_land(base, tmp_path, monkeypatch):
    setup, reference = base
    home, shards = fresh_gradient_tables(setup, tmp_path, monkeypatch)
    half = len(shards) // 2
    with open(tmp_path / "worker.log", "wb") as log:  # both race to create the tables, then to commit
        children = [worker(log, "projected_gradients", part, shards) for part in (shards[:half], shards[half:])]
        assert [c.wait(timeout=300) for c in children] == [0, 0], (tmp_path / "worker.log").read_text()[-3000:]
    for table in GRADIENT_TABLES:
        assert_same_rows(table, home.delta.read(table), reference[table])
        assert home.delta.version(table) == len(shards) - 1  # one commit per shard and table, none lost


def test_two_fresh_homes_give_identical_scores(base, tmp_path, monkeypatch):
    setup, reference = base
    other = materialized_setup(tmp_path, monkeypatch)
    for table in (
        "token_shards",
        "projected_gradients",
        "hessian_factors",
        "valuation_queries",
        "influence_scores",
        "provider_valuations",
        "valuation_provenance",
    ):
        assert_same_rows(
            table,
            other.delta.read(table),
            reference[table],
            drop=("provenance",) if table == "valuation_provenance" else (),
        )
    assert (
        other.delta.read("valuation_provenance")["provenance"].to_list()
        == reference["valuation_provenance"]["provenance"].to_list()
    )


def test_commit_metadata_and_state_folder_hold_no_secret(base):
    setup, _ = base
    for table in SCHEMAS:
        for commit in DeltaTable(setup.delta.table_path(table)).history():
            if commit.get("operation") in ("WRITE", "CREATE TABLE"):
                assert {k for k in commit if k.startswith("dataworth.")} == RUN_METADATA_KEYS, (table, commit)
    leaked = [p for p in setup.home.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_rematerializing_every_asset_is_idempotent(base):
    setup, reference = base
    vid = reference["valuation_provenance"]["valuation_id"][0]
    assert run(setup, "influence_scores", "provider_valuations").success  # same inputs: same valuation
    assert setup.delta.read("valuation_provenance")["valuation_id"].to_list() == [vid]
    for table in ("influence_scores", "provider_valuations"):
        assert_same_rows(table, setup.delta.read(table), reference[table])

    assert run(setup, *(a.key.path[-1] for a in setup.definitions().assets)).success  # every asset, every shard
    for table in SCHEMAS:
        after = setup.delta.read(table)
        if "valuation_id" in after.columns:  # newer table versions are new inputs: a second valuation
            vids = after["valuation_id"].unique().to_list()
            assert len(vids) == 2 and vid in vids
            after = after.filter(after["valuation_id"] != vid)
        drop = tuple(
            c for c in ("valuation_id", "provenance", "corpus_version") if c in after.columns
        )  # input versions
        assert_same_rows(table, after, reference[table], drop=drop)
