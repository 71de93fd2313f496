"""`dataworth audit`: the lineage of a valuation (text, JSON) and `--verify`, on a tiny real setup.

The module values 6 shards, adds a batch and revalues (a second valuation id), so every test can
check that the older valuation still reads and reproduces from its recorded table versions.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from domain.artifacts import latest_row
from pipelines.cli import main
from resources.delta import DeltaStore
from tests.pipeline_harness import landing_records, make_tiny_setup, write_jsonl

SCRIPT = Path(sys.executable).parent / "dataworth"


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """(setup, old valuation id, new valuation id, old run, new run): valued, then a batch added and revalued."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        setup = make_tiny_setup(tmp_path_factory.mktemp("audit"), monkeypatch)
        setup.stage()
        (old_run,) = setup.run_stale()
        write_jsonl(setup.landing / "batch2.jsonl", landing_records("numpy", 4, 3))
        setup.stage()
        (new_run,) = setup.run_stale()
        records = setup.delta.read("valuation_provenance").sort("created_at")
        assert old_run.success and new_run.success and records.height == 2
        old, new = records["valuation_id"].to_list()
        yield setup, old, new, old_run, new_run


def audit(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, in a subprocess (the environment points at the tiny setup)."""
    return subprocess.run([SCRIPT, "audit", *args], check=False, capture_output=True, text=True, timeout=120)


def provenance(delta: DeltaStore, vid: str) -> dict:
    return json.loads(delta.read("valuation_provenance", where={"valuation_id": vid})["provenance"][0])


def test_every_valuation_row_has_an_id_and_history_is_kept(audited):
    setup, old, new, _, _ = audited
    values = setup.delta.read("provider_valuations")
    assert values["valuation_id"].null_count() == 0 and set(values["valuation_id"]) == {old, new}
    assert set(setup.delta.read("influence_scores")["valuation_id"]) == {old, new}
    assert len(provenance(setup.delta, new)["shards"]) == len(provenance(setup.delta, old)["shards"]) + 1


def test_audit_prints_the_lineage_for_people(audited):
    setup, _, new, _, new_run = audited
    result = audit(new)
    assert result.returncode == 0, result.stderr
    text, prov = result.stdout, provenance(setup.delta, new)
    model = latest_row(setup.delta, "model_checkpoint")  # its path absolute, as the audit shows it
    values = setup.delta.read("provider_valuations", where={"valuation_id": new})
    for table, version in prov["tables"].items():
        assert f"{table:<32} v{version}  run " in text
    for expected in [
        f"valuation {new}",
        f"Dagster run {new_run.run_id}",
        f"code version: {prov['code_version']}",
        f"model checkpoint: {prov['model_hash']} (embedded) at {model['path']}",
        f"trained in MLflow run {model['mlflow_run_id']}",
        f"projection: {prov['projection_hash']}",
        '"rank_in": 4',
        "curvature: ekfac, fisher empirical, damping 0.01 (relative)",
        "queries (20, ",
        "dagster-0: 'dagster._core.storage.event_log",
        f"MLflow run {values['mlflow_run_id'][0]} (FINISHED), params:",
        f"  valuation_id = {new}",
        "  hessian = ekfac",
    ]:
        assert expected in text, expected


def test_older_valuation_still_verifies_after_a_new_batch_json(audited):
    setup, old, _, old_run, _ = audited
    result = audit(old, "--json", "--verify")
    assert result.returncode == 0, result.stderr
    report, prov = json.loads(result.stdout), provenance(setup.delta, old)
    assert report["valuation_id"] == old and report["dagster_run_id"] == old_run.run_id
    assert {t: info["version"] for t, info in report["tables"].items()} == prov["tables"]
    assert report["tables"]["projected_gradients"]["version"] < setup.delta.version(
        "projected_gradients"
    )  # time travel
    assert report["tables"]["projected_gradients"]["dagster_run_id"] == old_run.run_id
    assert (
        report["model"]["checkpoint_hash"] == prov["model_hash"]
        and report["projection"]["hash"] == prov["projection_hash"]
    )
    assert report["curvature"] == {
        "kind": "ekfac",
        "fisher": "empirical",
        "damping": 0.01,
        "damping_mode": "relative",
        "per_layer_damping": {},
    }
    assert report["query_settings"]["queries_file"] == "data/embedded_queries.jsonl" and len(report["queries"]) == 20
    assert report["shards"] == prov["shards"] and report["unavailable"] == []
    assert (
        report["mlflow"]["params"]["valuation_id"] == old
        and report["mlflow"]["tags"]["dagster_run_id"] == old_run.run_id
    )
    verify = report["verify"]
    assert verify["passed"] and verify["queries_recomputed"] == 4
    assert verify["max_relative_deviation"] <= verify["tolerance"]


def test_verify_fails_loudly_when_a_recorded_version_was_vacuumed(audited, tmp_path, monkeypatch, capsys):
    """On a copy of the state folder: the revaluation replaced hessian_factors, a vacuum removes the old files."""
    setup, old, new, _, _ = audited
    copy = tmp_path / "home"
    shutil.copytree(setup.home, copy)
    monkeypatch.setenv("DATAWORTH_HOME", str(copy))
    removed = DeltaTable(DeltaStore().table_path("hessian_factors")).vacuum(
        retention_hours=0, enforce_retention_duration=False, dry_run=False
    )
    assert removed

    assert main(["audit", old, "--verify"]) == 2
    out, err = capsys.readouterr()
    assert (
        f"audit failed: valuation {old} cannot be reproduced" in err and "hessian_factors" in err and "vacuumed" in err
    )
    assert "verify: FAILED" in out and f"valuation {old}" in out  # the lineage itself still prints
    assert main(["audit", new, "--verify", "--json"]) == 0  # the latest valuation reads current files
    assert json.loads(capsys.readouterr().out)["verify"]["passed"]


def test_verify_fails_loudly_when_the_checkpoint_changed(audited, capsys):
    setup, old, _, _, _ = audited
    config = Path(latest_row(setup.delta, "model_checkpoint")["path"]) / "config.json"
    original = config.read_text()
    try:
        config.write_text(original.replace("{", '{"edited": true, ', 1))
        assert main(["audit", old, "--verify", "--json"]) == 2
        out, err = capsys.readouterr()
        assert "checkpoint files" in err and "changed" in err
        assert json.loads(out)["verify"] == {"passed": False, "error": json.loads(out)["verify"]["error"]}
    finally:
        config.write_text(original)
    assert main(["audit", old, "--verify"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_unknown_valuation_id_is_a_clear_error(audited, capsys):
    _, old, new, _, _ = audited
    assert main(["audit", "v-0000000000000000"]) == 2
    err = capsys.readouterr().err
    assert "unknown valuation id 'v-0000000000000000'" in err and old in err and new in err


def test_valuation_id_with_a_quote_is_an_unknown_id(audited, capsys):
    _, old, _, _, _ = audited
    assert main(["audit", old + "'"]) == 2  # reads are typed: the quote is data, never parsed as SQL
    assert f"unknown valuation id {old + chr(39)!r}" in capsys.readouterr().err
