"""Revaluation on the real graph: the landing sensor, the schedule, staleness, and `dataworth run`.

One tiny valuation is shared by the module and changed step by step (new batches, new settings), so
the tests run in file order; each states what it leaves behind.
"""

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._core.test_utils import create_run_for_test
from dagster._utils.test.data_versions import get_stale_status_resolver
from deltalake import DeltaTable

from domain.artifacts import latest_row
from domain.settings import Settings
from domain.staging import plan_landing, staged_corpus
from pipelines.automation import (
    ALL,
    NEW_SHARDS,
    REPROJECT,
    SCORES,
    code_versions,
    stale_shards,
    stale_work,
)
from pipelines.cli import DAGSTER_YAML
from pipelines.definitions import build_definitions
from resources.delta import DeltaStore
from tests.pipeline_harness import (
    RANGE_END,
    RANGE_START,
    TINY_SETTINGS,
    landing_records,
    make_tiny_setup,
    write_jsonl,
)

GRADIENTS = dg.AssetKey("projected_gradients")


def tiny_settings(damping=None, projection_seed=None, queries_file=None, train_steps=None, checkpoint_dir=None) -> str:
    text = TINY_SETTINGS
    if projection_seed is not None:
        text = text.replace("[projection]\n", f"[projection]\nseed = {projection_seed}\n")
    if queries_file is not None:
        text = text.replace('queries_file = "data/embedded_queries.jsonl"', f'queries_file = "{queries_file}"')
    if train_steps is not None:
        text = text.replace("train_steps = 30", f"train_steps = {train_steps}")
    if checkpoint_dir is not None:
        text = text.replace("[model]\n", f'[model]\ncheckpoint_dir = "{checkpoint_dir}"\n')
    if damping is not None:
        text += f"[curvature]\ndamping = {damping}\n"
    return text


def use_settings(text: str) -> dg.Definitions:
    """Write the settings file the tiny setup points at; the definitions built from it."""
    Path(os.environ["DATAWORTH_SETTINGS"]).write_text(text)
    return build_definitions(Settings.load())


# The contexts are closed with `with`: one built from a persistent instance opens its own instance from
# the reference and makes it Dagster's current one, which would otherwise outlive the context.
def evaluate_sensor(setup, defs: dg.Definitions) -> dg.SensorResult:
    with dg.build_sensor_context(instance=setup.instance, resources={"delta": DeltaStore()}) as context:
        return defs.resolve_sensor_def("landing_sensor")(context)


def evaluate_schedule(setup, defs: dg.Definitions):
    with dg.build_schedule_context(instance=setup.instance, resources={"delta": DeltaStore()}) as context:
        return defs.resolve_schedule_def("revaluation_schedule")(context)


def execute(setup, defs: dg.Definitions, requests) -> list[dg.ExecuteInProcessResult]:
    job = defs.resolve_job_def("valuation")
    results = [
        job.execute_in_process(instance=setup.instance, tags=r.tags, asset_selection=r.asset_selection)
        for r in requests
    ]
    assert all(r.success for r in results)
    return results


def apply_partitions(setup, result: dg.SensorResult) -> None:
    for added in result.dynamic_partitions_requests:
        setup.instance.add_dynamic_partitions(added.partitions_def_name, list(added.partition_keys))


def selection(request: dg.RunRequest) -> set[str]:
    return {k.path[-1] for k in request.asset_selection}


def materialized(result: dg.ExecuteInProcessResult, key: dg.AssetKey = GRADIENTS) -> list[str | None]:
    """Partition keys (None when unpartitioned) of `key` materialized by the run."""
    return [e.partition for e in result.get_asset_materialization_events() if e.asset_key == key]


def shard_files(delta: DeltaStore, shards: list[str]) -> dict[str, list[str]]:
    table = DeltaTable(delta.table_path("projected_gradients"))
    return {s: sorted(table.file_uris([("shard_id", "=", s)])) for s in shards}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """Assets of the valuation graph whose code version differs."""
    return {a for a in ALL if after[a] != before[a]}


def shards_of(setup) -> list[str]:
    return setup.instance.get_dynamic_partitions("shards")


def valuation_ids(delta: DeltaStore) -> list[str]:
    return delta.read("valuation_provenance").sort("created_at")["valuation_id"].to_list()


@pytest.fixture(scope="module")
def valued(tmp_path_factory):
    """A tiny setup valued by the landing sensor's first run (3 landing files, 6 shards).

    Its Dagster instance is the state folder's (`$DATAWORTH_HOME/dagster`, as `dataworth run` uses it):
    persistent, because schedule contexts need an instance reference."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        setup = make_tiny_setup(tmp_path_factory.mktemp("revaluation"), monkeypatch)
        folder = setup.home / "dagster"
        folder.mkdir()
        (folder / "dagster.yaml").write_text(DAGSTER_YAML)
        with dg.DagsterInstance.local_temp(str(folder)) as instance:
            setup = replace(setup, instance=instance)
            defs = setup.definitions()
            first = evaluate_sensor(setup, defs)
            apply_partitions(setup, first)
            setup.first_sensor_result = first
            setup.first_runs = execute(setup, defs, first.run_requests)
            yield setup


def test_sensor_values_a_fresh_state_folder_whole(valued):
    result = valued.first_sensor_result
    shards = shards_of(valued)
    assert len(shards) == 6 and list(result.dynamic_partitions_requests[0].partition_keys) == shards
    (request,) = result.run_requests
    assert selection(request) == set(ALL)
    assert (request.tags[RANGE_START], request.tags[RANGE_END]) == (shards[0], shards[-1])
    assert sorted(materialized(valued.first_runs[0])) == sorted(shards)
    assert valued.delta.read("provider_valuations")["valuation_id"].n_unique() == 1
    assert not any(valued.landing.glob("*.jsonl"))  # staged and removed from the landing folder

    defs = valued.definitions()
    assert stale_work(valued.instance, valued.delta, code_versions(defs.assets)) == []
    skipped = evaluate_schedule(valued, defs)
    assert isinstance(skipped, dg.SkipReason) and "nothing is stale" in skipped.skip_message


def test_sensor_does_nothing_for_an_already_ingested_file(valued):
    before = valued.delta.version("training_corpus")
    write_jsonl(valued.landing / "numpy-again.jsonl", landing_records("numpy", 0, 4))  # the same bytes as numpy.jsonl
    result = evaluate_sensor(valued, valued.definitions())
    assert not result.run_requests and not result.dynamic_partitions_requests
    assert "1 file(s) already ingested" in result.skip_reason.skip_message
    assert valued.delta.version("training_corpus") == before and len(shards_of(valued)) == 6
    set_aside = valued.landing / "_already_ingested"
    assert not (valued.landing / "numpy-again.jsonl").exists() and (set_aside / "numpy-again.jsonl").is_file()
    assert "already ingested as batch b-" in (set_aside / "numpy-again.jsonl.reason.txt").read_text()
    assert "0 file(s) already ingested" in evaluate_sensor(valued, valued.definitions()).skip_reason.skip_message


def test_sensor_quarantines_malformed_files_whole(valued):
    staged_before = staged_corpus().height
    (valued.landing / "broken.jsonl").write_text(
        '{"provider_id": "numpy", "doc_id": "x1", "text": "ok", "license": "MIT"}\n{not json\n'
    )
    good = landing_records("polars", 10, 1)[0]
    write_jsonl(
        valued.landing / "half.jsonl", [good, {**good, "doc_id": "half-2", "text": "   "}]
    )  # one good, one empty document
    result = evaluate_sensor(valued, valued.definitions())
    assert not result.run_requests and "2 quarantined" in result.skip_reason.skip_message
    rejected = valued.landing / "_rejected"
    assert "line 2 is not valid JSON" in (rejected / "broken.jsonl.reason.txt").read_text()
    assert "half-2" in (rejected / "half.jsonl.reason.txt").read_text() and (rejected / "half.jsonl").exists()
    assert not (valued.landing / "broken.jsonl").exists() and not (valued.landing / "half.jsonl").exists()
    assert staged_corpus().height == staged_before and good["doc_id"] not in staged_corpus()["doc_id"].to_list()
    assert len(shards_of(valued)) == 6


def test_sensor_values_a_new_batch_computing_only_its_shards(valued):
    """Leaves 8 shards valued twice (two valuation ids)."""
    old_shards, delta = shards_of(valued), valued.delta
    old_files, old_version = shard_files(delta, old_shards), delta.version("projected_gradients")
    write_jsonl(valued.landing / "batch2.jsonl", landing_records("numpy", 4, 2) + landing_records("torch", 4, 2))
    defs = valued.definitions()

    run = create_run_for_test(valued.instance, job_name="valuation", status=dg.DagsterRunStatus.STARTED)
    waiting = evaluate_sensor(valued, defs)
    assert "in progress" in waiting.skip_reason.skip_message and (valued.landing / "batch2.jsonl").exists()
    assert "in progress" in evaluate_schedule(valued, defs).skip_message
    valued.instance.delete_run(run.run_id)

    crashed = plan_landing(valued.landing, 3)  # a tick that staged the file, then died before adding its partitions
    assert len(crashed.shard_ids) == 2 and not (valued.landing / "batch2.jsonl").exists()
    result = evaluate_sensor(valued, defs)
    new = list(result.dynamic_partitions_requests[0].partition_keys)
    assert new == crashed.shard_ids and not set(new) & set(old_shards)
    (request,) = result.run_requests
    assert selection(request) == set(NEW_SHARDS)
    assert (request.tags[RANGE_START], request.tags[RANGE_END]) == (new[0], new[-1])
    apply_partitions(valued, result)

    # Dagster's own view: the old gradient partitions stay fresh, the new ones are missing
    resolver = get_stale_status_resolver(valued.instance, defs.assets)
    assert {s: resolver.get_status(GRADIENTS, s) for s in old_shards} == {s: StaleStatus.FRESH for s in old_shards}
    assert {resolver.get_status(GRADIENTS, s) for s in new} == {StaleStatus.MISSING}

    (run,) = execute(valued, defs, result.run_requests)
    assert sorted(materialized(run)) == sorted(new)  # gradient work: the new shards only
    sequences = delta.read("token_shards", where={"shard_id": new[:2]}).height
    step = next(e for e in run.get_asset_materialization_events() if e.asset_key == GRADIENTS)
    assert step.materialization.metadata["sequences_in_this_run"].value == sequences
    observed = {
        e.event_specific_data.asset_observation.partition: e.event_specific_data.asset_observation.metadata
        for e in run.all_events
        if e.event_type_value == "ASSET_OBSERVATION" and e.asset_key == GRADIENTS
    }
    assert set(observed) == set(new)  # each shard reported as it landed, with its own count
    assert sum(m["sequences"].value for m in observed.values()) == sequences
    assert shard_files(delta, old_shards) == old_files  # the untouched shards' data files were not rewritten
    commits = [
        delta.commit_metadata("projected_gradients", v)
        for v in range(old_version + 1, delta.version("projected_gradients") + 1)
    ]
    assert len(commits) == len(new) and {c["dagster_run_id"] for c in commits} == {run.run_id}

    vids = valuation_ids(delta)
    assert len(vids) == 2
    values = delta.read("provider_valuations")
    assert set(values["valuation_id"]) == set(vids) and values["valuation_id"].null_count() == 0
    assert stale_work(valued.instance, delta, code_versions(defs.assets)) == []


def test_dataworth_run_values_a_new_landing_file_then_finds_nothing_stale(valued):
    """The console script (multiprocess executor, spawned steps) on the module's state folder, twice.

    Leaves 9 shards valued (three valuation ids)."""
    old_shards, delta = shards_of(valued), valued.delta
    old_version = delta.version("projected_gradients")
    write_jsonl(valued.landing / "batch3.jsonl", landing_records("polars", 4, 3))
    script = Path(sys.executable).parent / "dataworth"
    first = subprocess.run([script, "run"], check=False, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stdout + first.stderr
    new = [s for s in shards_of(valued) if s not in old_shards]
    assert len(new) == 1 and "staged 1 batch(es): 1 new shard(s)" in first.stdout
    assert f"materializing {', '.join(NEW_SHARDS)} over shards {new[0]} .. {new[0]}\n" in first.stdout
    (commit,) = [
        delta.commit_metadata("projected_gradients", v)
        for v in range(old_version + 1, delta.version("projected_gradients") + 1)
    ]
    assert f"run {commit['dagster_run_id']} succeeded" in first.stdout  # one gradient write: the new shard's
    vids = valuation_ids(delta)
    assert len(vids) == 3 and f"valuation {vids[-1]}" in first.stdout

    second = subprocess.run([script, "run"], check=False, capture_output=True, text=True, timeout=200)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (
        "nothing is stale" in second.stdout
        and "materializing" not in second.stdout
        and f"valuation {vids[-1]}" in second.stdout
    )


def test_new_damping_recomputes_scores_without_gradients(valued):
    """Leaves damping 0.05 in the settings, valued."""
    delta, before = valued.delta, code_versions(valued.definitions().assets)
    gradients_version = delta.version("projected_gradients")
    defs = use_settings(tiny_settings(damping=0.05))
    after = code_versions(defs.assets)
    assert changed(before, after) == {"influence_scores"}

    (request,) = stale_work(valued.instance, delta, after)
    assert selection(request) == set(SCORES) and RANGE_START not in request.tags
    (scheduled,) = evaluate_schedule(valued, defs)
    assert selection(scheduled) == set(SCORES) and RANGE_START not in scheduled.tags

    (run,) = execute(valued, defs, [request])
    assert materialized(run) == [] and delta.version("projected_gradients") == gradients_version
    latest = delta.read("valuation_provenance").sort("created_at").row(-1, named=True)
    assert '"damping": 0.05' in latest["provenance"] and latest["dagster_run_id"] == run.run_id
    assert stale_work(valued.instance, delta, after) == []


def test_new_query_set_recomputes_scores_without_gradients(valued):
    """A query file in another place, then the same file edited: both re-version valuation_queries only."""
    before = code_versions(valued.definitions().assets)
    queries = valued.home / "queries.jsonl"
    queries.write_text('{"query_id": "a", "prompt": "Compute the mean of"}\n')
    after = code_versions(use_settings(tiny_settings(damping=0.05, queries_file=queries)).assets)
    assert changed(before, after) == {"valuation_queries"}
    (request,) = stale_work(valued.instance, valued.delta, after)
    assert selection(request) == set(SCORES)

    queries.write_text('{"query_id": "a", "prompt": "Compute the median of"}\n')
    edited = code_versions(build_definitions(Settings.load()).assets)
    assert changed(after, edited) == {"valuation_queries"}
    use_settings(tiny_settings(damping=0.05))
    assert stale_work(valued.instance, valued.delta, before) == []


def test_new_projection_makes_every_shard_stale(valued):
    """Leaves projection seed 1 in the settings, every shard re-projected and valued."""
    delta, shards = valued.delta, shards_of(valued)
    defs = use_settings(tiny_settings(damping=0.05, projection_seed=1))
    (request,) = stale_work(valued.instance, delta, code_versions(defs.assets))
    assert selection(request) == set(REPROJECT)
    assert (request.tags[RANGE_START], request.tags[RANGE_END]) == (shards[0], shards[-1])

    execute(valued, defs, [dg.RunRequest(asset_selection=[dg.AssetKey("gradient_projection")])])
    assert stale_shards(delta, shards) == shards
    resolver = get_stale_status_resolver(valued.instance, defs.assets)
    assert {resolver.get_status(GRADIENTS, s) for s in shards} == {StaleStatus.STALE}
    (cause,) = resolver.get_stale_causes(GRADIENTS, shards[0])
    assert cause.dependency_asset_key == dg.AssetKey("gradient_projection")

    (request,) = stale_work(valued.instance, delta, code_versions(defs.assets))
    assert selection(request) == {*NEW_SHARDS, "valuation_queries"}  # the query gradients are of the old projection too
    (run,) = execute(valued, defs, [request])
    assert sorted(materialized(run)) == sorted(shards)
    assert stale_shards(delta, shards) == [] and stale_work(valued.instance, delta, code_versions(defs.assets)) == []


def test_new_model_checkpoint_makes_every_shard_stale(valued, tmp_path):
    """Ends with a model that no gradient was made with: run nothing after this test."""
    delta, shards = valued.delta, shards_of(valued)
    defs = use_settings(tiny_settings(damping=0.05, projection_seed=1, train_steps=31))
    (request,) = stale_work(valued.instance, delta, code_versions(defs.assets))
    assert selection(request) == set(ALL) and (request.tags[RANGE_START], request.tags[RANGE_END]) == (
        shards[0],
        shards[-1],
    )

    old_hash = delta.read("model_checkpoint").sort("created_at")["checkpoint_hash"][-1]
    execute(valued, defs, [dg.RunRequest(asset_selection=[dg.AssetKey("model_checkpoint")])])
    new_hash = delta.read("model_checkpoint").sort("created_at")["checkpoint_hash"][-1]
    assert new_hash != old_hash
    resolver = get_stale_status_resolver(valued.instance, defs.assets)
    assert {resolver.get_status(GRADIENTS, s) for s in shards} == {StaleStatus.STALE}
    (request,) = stale_work(valued.instance, delta, code_versions(defs.assets))
    assert selection(request) == set(REPROJECT) and "another model" in request.tags["dataworth/stale"]
    assert (request.tags[RANGE_START], request.tags[RANGE_END]) == (shards[0], shards[-1])

    # a local checkpoint anywhere on disk (the operator's setting; like a Hugging Face cache outside the project):
    # its files changing in place make the model stale too
    local = tmp_path / "hf-cache" / "local-checkpoint"
    shutil.copytree(latest_row(delta, "model_checkpoint")["path"], local)
    defs = use_settings(tiny_settings(damping=0.05, projection_seed=1, train_steps=31, checkpoint_dir=local))
    execute(valued, defs, [dg.RunRequest(asset_selection=[dg.AssetKey("model_checkpoint")])])
    assert settings_of_latest_model(delta) == ("local", new_hash)
    config = local / "config.json"
    config.write_text(config.read_text().replace("{", '{"edited": true, ', 1))
    (request,) = stale_work(valued.instance, delta, code_versions(defs.assets))
    assert selection(request) == set(ALL) and "changed" in request.tags["dataworth/stale"]


def settings_of_latest_model(delta: DeltaStore) -> tuple[str, str]:
    row = delta.read("model_checkpoint").sort("created_at").row(-1, named=True)
    return row["source"], row["checkpoint_hash"]


def test_schedule_cron_comes_from_the_settings():
    default = build_definitions(Settings()).resolve_schedule_def("revaluation_schedule")
    assert default.cron_schedule == "0 3 * * *"
    custom = build_definitions(Settings.from_dict({"automation": {"revaluation_cron": "*/15 * * * *"}}))
    assert custom.resolve_schedule_def("revaluation_schedule").cron_schedule == "*/15 * * * *"
