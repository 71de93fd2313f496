"""The real asset graph on a tiny configuration: Delta tables, blocking checks, MLflow run, audit."""

import json

import dagster as dg
import polars as pl
import pytest

from dataworth import MismatchError
from domain.audit import lineage, verify
from domain.scoring import PARTIALS, merge_partials
from resources.codecs import binary_to_gradients
from resources.tracking import MlflowTracker
from tests.pipeline_harness import TINY_SETTINGS, make_tiny_setup
from tests.reliability_support import assert_same_rows

SPLIT_TABLES = (
    "projected_gradients",
    "projected_gradients_statistics",
    "hessian_factors",
    "valuation_queries",
    "influence_scores",
    "valuation_provenance",
    "provider_valuations",
)


def test_tiny_graph_materializes_end_to_end(tmp_path, monkeypatch):
    setup = make_tiny_setup(tmp_path, monkeypatch)
    shards = setup.stage()
    assert len(shards) == 6  # 3 providers x 4 documents, 3 documents per shard
    results = setup.run_stale()
    assert len(results) == 1 and results[0].success
    checks = results[0].get_asset_check_evaluations()
    assert len(checks) == 12 and all(c.passed for c in checks)
    steps = {e.step_key for e in results[0].all_events if e.is_step_success}
    assert {"projected_gradients.capture", "influence_scores.score"} <= steps  # one worker: part and finish in one
    assert not {s for s in steps if "part" in s or s.endswith(("merge_scores", "check_gradients"))}

    delta = setup.delta
    corpus = delta.read("training_corpus")
    assert corpus.height == 12 and set(corpus["shard_id"]) == set(shards)
    seqs = delta.read("token_shards")
    grads = delta.read("projected_gradients")
    assert grads.height == seqs.height and grads["seq_id"].is_unique().all()
    projection = delta.read("gradient_projection").row(0, named=True)
    assert binary_to_gradients(grads["gradient"]).shape == (seqs.height, projection["dim"])

    scores = delta.read("influence_scores")
    vid = scores["valuation_id"][0]
    assert set(scores["kind"]) == {"top_sequence", "top_document", "document_total", "provider_query"}
    assert scores.filter(pl.col("kind") == "top_sequence").group_by("query_id").len()["len"].to_list() == [3] * 20
    queries = delta.read("valuation_queries")
    assert queries["reference"].all() and queries["query_group"].n_unique() == 10  # the held-out documents
    assert (queries["loss"] > 0).all() and (queries["completion_tokens"] > 0).all()
    values = delta.read("provider_valuations")
    assert sorted(values["provider_id"]) == ["numpy", "polars", "torch"]
    assert abs(values["share"].abs().sum() - 1) < 1e-9
    training_rows = seqs.height
    assert (values["training_rows"] == training_rows).all() and (values["queries"] == 20).all()
    assert values["mean_query_loss"][0] == pytest.approx(queries["loss"].mean())
    per_provider = scores.filter(pl.col("kind") == "provider_query").group_by("provider_id").agg(pl.col("score").sum())
    for provider, total in per_provider.iter_rows():
        row = values.row(by_predicate=pl.col("provider_id") == provider, named=True)
        assert row["value_nats"] == pytest.approx(total / training_rows / 20, rel=1e-9, abs=1e-15)
        assert row["ci_low"] <= row["value_nats"] <= row["ci_high"]

    # provenance: commit metadata names the run and the upstream versions read
    meta = delta.commit_metadata("influence_scores", delta.version("influence_scores"))
    assert meta["dagster_run_id"] == results[0].run_id
    assert json.loads(meta["upstream_versions"])["projected_gradients"] == delta.version("projected_gradients")

    # the MLflow run of the valuation
    run = MlflowTracker().get_run(values["mlflow_run_id"][0])
    assert run["params"]["hessian"] == "ekfac" and run["params"]["rank_in"] == "4"
    assert run["params"]["model_hash"] == projection["model_hash"]
    assert "provider_valuations.png" in run["artifacts"] and "provider_values.json" in run["artifacts"]
    assert run["metrics"]["value_nats.numpy"] == pytest.approx(
        values.row(by_predicate=pl.col("provider_id") == "numpy", named=True)["value_nats"]
    )
    assert MlflowTracker().experiment_tags()["mlflow.experimentKind"] == "custom_model_development"

    # the same valuation materialized again: one MLflow run per valuation id, not two with the same name
    again = (
        setup.definitions()
        .resolve_job_def("valuation")
        .execute_in_process(instance=setup.instance, asset_selection=[dg.AssetKey("provider_valuations")])
    )
    assert again.success
    rerun = delta.read("provider_valuations")
    assert set(rerun["valuation_id"]) == {vid}
    assert MlflowTracker().runs_tagged("valuation_id", vid) == [rerun["mlflow_run_id"][0]]

    report = lineage(delta, MlflowTracker(), vid)
    assert report["model"]["checkpoint_hash"] == projection["model_hash"]
    assert report["tables"]["projected_gradients"]["dagster_run_id"] == results[0].run_id
    assert verify(delta, vid, sample=4)["passed"]


def test_capture_and_scoring_split_over_workers_give_the_one_worker_rows(tmp_path, monkeypatch):
    """The same 6 shards in a second home whose run captures them in 4 steps and scores them in 4 (groups of
    2, 2, 1, 1): every table holds the one-step run's rows (float sums up to rounding), under the same
    valuation id; the audit passes; a scored part that is missing stops the merge."""
    (tmp_path / "one").mkdir()
    (tmp_path / "four").mkdir()
    one = make_tiny_setup(tmp_path / "one", monkeypatch)
    one.stage()
    assert all(r.success for r in one.run_stale())
    expected = {t: one.delta.read(t) for t in SPLIT_TABLES}

    split = "[deployment]\ncapture_workers = 4\nscoring_workers = 4\n"
    four = make_tiny_setup(tmp_path / "four", monkeypatch, TINY_SETTINGS + split)
    shards = sorted(four.stage())
    (run,) = four.run_stale()
    assert run.success
    steps = {e.step_key for e in run.all_events if e.is_step_success}
    assert {f"projected_gradients.capture_part_{i}" for i in range(4)} <= steps
    assert {f"influence_scores.score_part_{i}" for i in range(4)} | {"influence_scores.merge_scores"} <= steps
    delta = four.delta
    for table in SPLIT_TABLES:
        assert_same_rows(table, delta.read(table), expected[table], ("mlflow_run_id",))
    observed = [e for e in run.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    steps_of = {e.event_specific_data.asset_observation.partition: e.step_key for e in observed}
    assert steps_of[shards[0]] == steps_of[shards[1]] == "projected_gradients.capture_part_0"
    assert steps_of[shards[5]] == "projected_gradients.capture_part_3"

    (vid,) = set(delta.read("influence_scores")["valuation_id"])
    partials = delta.read(PARTIALS, where={"valuation_id": vid})
    groups = dict(partials.select("part", "shards").unique().iter_rows())
    assert groups == {"0000": shards[0:2], "0001": shards[2:4], "0002": shards[4:5], "0003": shards[5:6]}
    assert verify(delta, vid, sample=4)["passed"]

    provenance = json.loads(delta.read("valuation_provenance", where={"valuation_id": vid})["provenance"][0])
    part0 = partials.filter(pl.col("part") == "0000")
    delta.replace(PARTIALS, part0.clear(), {"valuation_id": vid, "part": "0000"}, metadata={})
    with pytest.raises(MismatchError, match=r"no complete scores of part 0 \(shards .*materialize influence_scores"):
        merge_partials(delta, vid, provenance, 4, top_k=3)
