"""MlflowTracker against a real sqlite MLflow store in a temporary folder."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from resources.tracking import MlflowTracker  # noqa: E402


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> MlflowTracker:
    folder = tmp_path_factory.mktemp("mlflow")
    return MlflowTracker(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", experiment="tests")


def test_params_metrics_artifacts_round_trip(tracker, tmp_path):
    report = tmp_path / "report.txt"
    report.write_text("hello")
    figure, axes = plt.subplots()
    axes.plot([0, 1], [1, 0])
    with tracker.run(
        "valuation", params={"rank": 16, "curvature": "kfac", "ranks": {"a": 1}}, tags={"dagster_run_id": "r1"}
    ) as run:
        run.log_metrics({"loss": 2.5}, step=0)
        run.log_metrics({"loss": 1.25, "share_sum": 1.0}, step=1)
        run.log_artifact(report)
        run.log_figure(figure, "plots/shares.png")
        run.log_dict({"providers": ["a", "b"]}, "summary.json")
    plt.close(figure)

    audit = tracker.get_run(run.run_id)
    assert audit["status"] == "FINISHED" and audit["run_name"] == "valuation"
    assert audit["params"] == {"rank": "16", "curvature": "kfac", "ranks": '{"a": 1}'}
    assert audit["metrics"] == {"loss": 1.25, "share_sum": 1.0}
    assert audit["tags"] == {"dagster_run_id": "r1"}
    assert audit["artifacts"] == ["plots/shares.png", "report.txt", "summary.json"]


def test_artifacts_live_next_to_the_store_not_in_the_cwd(tracker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with tracker.run("artifact-location", params={}, tags={}) as run:
        run.log_dict({"a": 1}, "a.json")
    db = Path(tracker.tracking_uri.removeprefix("sqlite:///"))
    stored = list((db.parent / "artifacts" / "tests").rglob("a.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == []


def test_failed_block_marks_the_run_failed_and_no_run_leaks(tracker):
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.run("failing", params={}, tags={}) as run:
            raise RuntimeError("boom")
    assert tracker.get_run(run.run_id)["status"] == "FAILED"
    import mlflow

    assert mlflow.active_run() is None


def test_default_store_lives_in_dataworth_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert MlflowTracker().resolved_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


def test_a_shared_store_named_by_mlflow_tracking_uri_receives_the_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "home"))
    shared = tmp_path / "shared" / "mlflow.db"
    shared.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared}")
    tracker = MlflowTracker(experiment="shared")
    with tracker.run("on-the-cluster", params={"rank": 32}, tags={"k": "v"}) as run:
        run.log_metrics({"lds": 0.5})
    assert tracker.get_run(run.run_id)["metrics"] == {"lds": 0.5}
    assert shared.is_file() and not (tmp_path / "home" / "mlflow" / "mlflow.db").exists()
    explicit = MlflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'own.db'}")  # the resource's own URI wins
    assert explicit.resolved_tracking_uri() == f"sqlite:///{tmp_path / 'own.db'}"


def _open_run(tracker: MlflowTracker, barrier) -> None:
    barrier.wait()
    with tracker.run("concurrent", params={}, tags={}) as run:
        run.log_metrics({"x": 1.0})


def test_concurrent_first_use_of_a_fresh_store(tmp_path):
    tracker = MlflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="fresh")
    assert pickle.loads(pickle.dumps(tracker)) == tracker
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_open_run, args=(tracker, barrier)) for _ in range(2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0]


def test_the_experiment_opens_as_model_development_not_genai(tracker):
    with tracker.run("kind", params={}, tags={}):
        pass
    assert tracker.experiment_tags()["mlflow.experimentKind"] == "custom_model_development"


def test_an_experiment_made_without_the_kind_gets_it(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    tracker = MlflowTracker(tracking_uri=uri, experiment="old")
    assert tracker.experiment_tags()["mlflow.experimentKind"] == "custom_model_development"


def test_a_replacing_run_leaves_one_run_per_tag_value(tracker):
    tags = {"valuation_id": "v-0123456789abcdef"}
    with tracker.run("valuation-v-0123456789abcdef", params={"a": 1}, tags=tags, replaces="valuation_id") as first:
        first.log_metrics({"x": 1.0})
    with tracker.run("other", params={}, tags={"valuation_id": "v-other"}, replaces="valuation_id") as other:
        pass
    with pytest.raises(RuntimeError):
        with tracker.run("valuation-v-0123456789abcdef", params={}, tags=tags, replaces="valuation_id"):
            raise RuntimeError("a failed attempt deletes nothing")
    assert first.run_id in tracker.runs_tagged("valuation_id", "v-0123456789abcdef")
    with tracker.run("valuation-v-0123456789abcdef", params={"a": 1}, tags=tags, replaces="valuation_id") as second:
        second.log_metrics({"x": 2.0})
    assert tracker.runs_tagged("valuation_id", "v-0123456789abcdef") == [second.run_id]
    assert tracker.runs_tagged("valuation_id", "v-other") == [other.run_id]
    assert tracker.get_run(second.run_id)["metrics"] == {"x": 2.0}
