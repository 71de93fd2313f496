"""The real asset graph on a tiny configuration: Delta tables, blocking checks, MLflow run, audit."""

import json

import dagster as dg
import polars as pl
import pytest

from domain.audit import lineage, verify
from resources.codecs import binary_to_gradients
from resources.tracking import MlflowTracker
from tests.pipeline_harness import make_tiny_setup


def test_tiny_graph_materializes_end_to_end(tmp_path, monkeypatch):
    setup = make_tiny_setup(tmp_path, monkeypatch)
    shards = setup.stage()
    assert len(shards) == 6  # 3 providers x 4 documents, 3 documents per shard
    results = setup.run_stale()
    assert len(results) == 1 and results[0].success
    checks = results[0].get_asset_check_evaluations()
    assert len(checks) == 11 and all(c.passed for c in checks)

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
