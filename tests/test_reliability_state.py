"""State an outside red team broke (issue 12): stuck valuations, half-written valuations, settings that made
nothing stale, tables damaged behind our back, a moved state folder.

One tiny home is valued per module (its Dagster instance keeps the materializations, as the daemon's does)
and changed step by step, so the tests run in file order; each leaves the home valued and nothing stale.
Tests that must break something unrecoverable do it on a clone.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from domain.audit import AuditError, lineage, verify
from domain.settings import Settings
from domain.valuation import provider_chart
from pipelines.automation import ALL, NEW_SHARDS, REPROJECT, SCORES, code_versions, stale_work
from pipelines.cli import main
from pipelines.definitions import build_definitions
from resources.delta import DeltaStore, TableDataMissing, TableLogCorrupt
from resources.state import PROJECT_ROOT
from resources.tracking import MlflowTracker
from tests.pipeline_harness import TINY_SETTINGS
from tests.reliability_support import changed, clone, materialized_setup, run

SCORES_ONLY = set(SCORES)


@pytest.fixture(scope="module")
def valued(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield materialized_setup(tmp_path_factory.mktemp("state"), monkeypatch)


def use(setup, text: str = TINY_SETTINGS) -> Settings:
    """Write the settings file of the setup; the settings it holds."""
    Path(os.environ["DATAWORTH_SETTINGS"]).write_text(text)
    setup.settings = Settings.load()
    return setup.settings


def requests_for(setup, settings: Settings):
    versions = code_versions(build_definitions(settings).assets)
    return stale_work(setup.instance, setup.delta, versions, settings=settings)


def selection(request) -> set[str]:
    return {k.path[-1] for k in request.asset_selection}


def execute(setup, settings: Settings, requests) -> None:
    job = build_definitions(settings).resolve_job_def("valuation")
    for request in requests:
        result = job.execute_in_process(
            instance=setup.instance, tags=request.tags, asset_selection=request.asset_selection, raise_on_error=False
        )
        assert result.success, request.tags


def latest_vid(delta: DeltaStore) -> str:
    return delta.read("valuation_provenance").sort("created_at")["valuation_id"][-1]


# --- case 8: every setting makes stale exactly what it changes -------------------------------------

ALL_SHARDS = "all shards"
SETTINGS_CHANGES = {
    "model.train_steps": ({"model": {"train_steps": 31}}, set(ALL), ALL_SHARDS),
    "model.n_embd": ({"model": {"n_embd": 16}}, set(ALL), ALL_SHARDS),
    "shards.seq_len": ({"shards": {"seq_len": 16}}, set(NEW_SHARDS), ALL_SHARDS),
    "projection.rank_in": ({"projection": {"rank_in": 3}}, set(REPROJECT), ALL_SHARDS),
    "projection.seed": ({"projection": {"seed": 7}}, set(REPROJECT), ALL_SHARDS),
    "projection.embedding_ranks": ({"projection": {"embedding_ranks": [8, 4]}}, set(REPROJECT), ALL_SHARDS),
    "curvature.fisher": ({"curvature": {"fisher": "sampled"}}, set(NEW_SHARDS), ALL_SHARDS),
    "curvature.kind": ({"curvature": {"kind": "kfac"}}, SCORES_ONLY, None),
    "curvature.damping": ({"curvature": {"damping": 0.5}}, SCORES_ONLY, None),
    "curvature.damping_mode": ({"curvature": {"damping_mode": "absolute"}}, SCORES_ONLY, None),
    "queries.max_new_tokens": ({"queries": {"max_new_tokens": 5}}, SCORES_ONLY, None),
    "scores.top_k": ({"scores": {"top_k": 2}}, SCORES_ONLY, None),
    "scores.normalize": ({"scores": {"normalize": "cosine"}}, SCORES_ONLY, None),
    "corpus.docs_per_shard": ({"corpus": {"docs_per_shard": 5}}, set(), None),
    "corpus.seed_embedded_corpus": ({"corpus": {"seed_embedded_corpus": True}}, set(), None),
    "automation.revaluation_cron": ({"automation": {"revaluation_cron": "0 4 * * *"}}, set(), None),
    "capture_batch_size": ({"capture_batch_size": 3}, set(), None),
    "checkpoint_blocks": ({"checkpoint_blocks": True}, set(), None),
    "gradient_dtype": ({"gradient_dtype": "bfloat16"}, set(), None),  # new shards use it; nothing is stale
    "deployment.shard_readers": ({"deployment": {"shard_readers": 4}}, set(), None),
    "deployment.capture_workers": ({"deployment": {"capture_workers": 3}}, set(), None),  # same gradients
    "deployment.scoring_workers": ({"deployment": {"scoring_workers": 3}}, set(), None),  # same valuation
}


@pytest.mark.parametrize("name", sorted(SETTINGS_CHANGES))
def test_each_setting_change_requests_exactly_what_it_changes(valued, name):
    sections, expected, shard_range = SETTINGS_CHANGES[name]
    requests = requests_for(valued, changed(valued.settings, **sections))
    if not expected:
        assert requests == []
        return
    (request,) = requests
    assert selection(request) == expected, request.tags
    shards = valued.instance.get_dynamic_partitions("shards")
    tags = request.tags
    if shard_range == ALL_SHARDS:
        assert (tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]) == (
            shards[0],
            shards[-1],
        )
    else:
        assert "dagster/asset_partition_range_start" not in tags


# --- case 7: a new fisher recomputes the gradients instead of failing every run --------------------


def test_sampled_fisher_recomputes_the_gradients_of_every_shard(valued):
    settings = use(valued, TINY_SETTINGS + '[curvature]\nfisher = "sampled"\n')
    (request,) = requests_for(valued, settings)
    assert "projected_gradients" in selection(request) and "fisher" in request.tags["dataworth/stale"]
    execute(valued, settings, [request])
    assert valued.delta.read("projected_gradients_statistics")["fisher"].unique().to_list() == ["sampled"]
    assert valued.delta.read("hessian_factors")["fisher"].unique().to_list() == ["sampled"]
    assert requests_for(valued, settings) == []


# --- case 8: a new seq_len re-sequences every shard -----------------------------------------------


def test_new_seq_len_resequences_every_shard(valued):
    settings = use(valued, TINY_SETTINGS.replace("seq_len = 32", "seq_len = 16") + '[curvature]\nfisher = "sampled"\n')
    (request,) = requests_for(valued, settings)
    assert selection(request) == set(NEW_SHARDS) and "token_shards" in request.tags["dataworth/stale"]
    execute(valued, settings, [request])
    assert valued.delta.read("token_shards")["n_tokens"].max() <= 16
    gradients = valued.delta.read("projected_gradients", columns=["seq_id"])
    assert sorted(gradients["seq_id"]) == sorted(valued.delta.read("token_shards")["seq_id"])
    assert requests_for(valued, settings) == []


# --- case 5: a provider id with `$`, and a valuation left without provider rows -----------------------


def test_provider_id_with_dollar_signs_is_charted_literally():
    table = pl.DataFrame(
        {
            "provider_id": ["a$_$b", "$x^$", "cash$"],
            "value_nats": [0.1, -0.2, 0.3],
            "ci_low": [0.0, -0.3, 0.1],
            "ci_high": [0.2, -0.1, 0.5],
            "verdict": ["not distinguishable from 0", "hurts", "helps"],
            "queries_helped": [0.5, 0.1, 0.9],
        }
    )
    figure = provider_chart(table, "valuation v-$_$")
    figure.canvas.draw()  # mathtext would raise here
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert any("a\\$_\\$b" in label for label in labels)


def test_valuation_without_provider_rows_is_stale(valued):
    settings = use(
        valued,
        TINY_SETTINGS.replace("seq_len = 32", "seq_len = 16") + '[curvature]\nfisher = "sampled"\ndamping = 0.05\n',
    )
    # the scores of a new valuation land, then provider_valuations dies (a crash, or SIGKILL)
    assert run(valued, "influence_scores", settings=settings).success
    vid = latest_vid(valued.delta)
    assert valued.delta.read("provider_valuations", where={"valuation_id": vid}).height == 0
    (request,) = requests_for(valued, settings)
    assert selection(request) == {"provider_valuations"} and vid in request.tags["dataworth/stale"]
    execute(valued, settings, [request])
    assert valued.delta.read("provider_valuations", where={"valuation_id": vid}).height == 3
    assert requests_for(valued, settings) == []


# --- case 6: SIGKILL between the score and provenance commits -------------------------------------


def test_sigkill_between_the_score_and_provenance_commits_leaves_no_orphan(valued, tmp_path, capsys):
    settings = valued.settings
    assert run(valued, "hessian_factors", settings=settings).success  # new table versions: a new valuation id
    shards = valued.instance.get_dynamic_partitions("shards")
    command = [
        sys.executable,
        "-m",
        "tests.reliability_kill_worker",
        "influence_scores",
        shards[0],
        shards[-1],
        *shards,
    ]
    child = subprocess.run(command, cwd=PROJECT_ROOT, env=dict(os.environ), capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stdout[-3000:] + child.stderr[-3000:]

    delta = valued.delta
    known = set(delta.read("valuation_provenance")["valuation_id"])
    assert set(delta.read("influence_scores")["valuation_id"]) <= known  # no score rows nobody knows
    vid = latest_vid(delta)
    assert delta.read("influence_scores", where={"valuation_id": vid}).height == 0  # half-written: provenance only
    with pytest.raises(AuditError, match=rf"valuation {vid} is incomplete: .*influence_scores"):
        lineage(delta, MlflowTracker(), vid)
    assert main(["audit", vid]) == 2
    assert "incomplete" in capsys.readouterr().err

    (request,) = requests_for(valued, settings)
    assert selection(request) == {"influence_scores", "provider_valuations"}  # same inputs: the same id, completed
    assert vid in request.tags["dataworth/stale"]
    execute(valued, settings, [request])
    assert latest_vid(delta) == vid and verify(delta, vid, 2)["passed"]
    assert requests_for(valued, settings) == []


# --- case 9: a data file deleted, a truncated log entry -------------------------------------------


def data_file(delta: DeltaStore, table: str, shard: str) -> Path:
    uri = next(u for u in DeltaTable(delta.table_path(table)).file_uris() if f"shard_id={shard}" in u)
    return Path(delta.table_path(table)) / uri.split(f"/{table}/", 1)[1]


def test_deleted_token_shards_file_is_stale_and_fails_the_audit(valued):
    delta, settings = valued.delta, valued.settings
    vid = latest_vid(delta)
    shard = valued.instance.get_dynamic_partitions("shards")[1]
    victim = data_file(delta, "token_shards", shard)
    victim.unlink()
    with pytest.raises(AuditError, match=rf"version \d+ of Delta table 'token_shards'.*{victim.name}.*restore"):
        verify(delta, vid, 1)
    assert main(["audit", vid, "--verify", "--sample", "1"]) == 2

    (request,) = requests_for(valued, settings)
    assert selection(request) == set(NEW_SHARDS) and "token_shards" in request.tags["dataworth/stale"]
    assert (
        request.tags["dagster/asset_partition_range_start"]
        == shard
        == request.tags["dagster/asset_partition_range_end"]
    )
    execute(valued, settings, [request])
    assert delta.missing_files("token_shards") == [] and requests_for(valued, settings) == []


def test_truncated_log_entry_names_table_file_and_repair(valued, tmp_path, monkeypatch):
    home = clone(valued, tmp_path, monkeypatch)
    log = Path(home.delta.table_path("hessian_factors")) / "_delta_log"
    last = max(p for p in log.glob("*.json") if p.stem.isdigit())
    last.write_bytes(last.read_bytes()[:-30])
    for call in (lambda: home.delta.read("hessian_factors"), lambda: home.delta.version("hessian_factors")):
        with pytest.raises(TableLogCorrupt, match=rf"Delta table 'hessian_factors'.*{last.name}.*move it out"):
            call()
    with pytest.raises(TableLogCorrupt, match="hessian_factors"):
        stale_work(home.instance, home.delta, code_versions(build_definitions(home.settings).assets))


def test_a_lost_file_of_a_history_table_is_named_with_restore(valued, tmp_path, monkeypatch):
    home = clone(valued, tmp_path, monkeypatch)
    victim = next(
        Path(u.removeprefix("file://")) for u in DeltaTable(home.delta.table_path("influence_scores")).file_uris()
    )
    victim.unlink()
    with pytest.raises(TableDataMissing, match=r"influence_scores.*restore"):
        stale_work(home.instance, home.delta, code_versions(build_definitions(home.settings).assets))


# --- case 10: the state folder moved ---------------------------------------------------------------


def test_absolute_paths_of_old_rows_still_read(valued, tmp_path, monkeypatch):
    from domain.artifacts import latest_row

    row = latest_row(valued.delta, "model_checkpoint")
    assert Path(row["path"]).is_absolute() and Path(row["path"]).is_dir()
    stored = valued.delta.read("model_checkpoint").sort("created_at")["path"][-1]
    assert not Path(stored).is_absolute()  # relative to the state folder
    old = valued.delta.read("model_checkpoint").with_columns(path=pl.lit(row["path"]))  # a row written before
    home = clone(valued, tmp_path, monkeypatch)
    home.delta.write("model_checkpoint", old, mode="overwrite", metadata={})
    assert latest_row(home.delta, "model_checkpoint")["path"] == row["path"]


def test_moved_state_folder_still_audits_and_nothing_is_stale(valued, tmp_path, monkeypatch):
    """Moves the module's state folder: run nothing on it after this test."""
    vid = latest_vid(valued.delta)
    target = tmp_path / "moved"
    shutil.move(valued.home, target)
    monkeypatch.setenv("DATAWORTH_HOME", str(target))
    delta = DeltaStore()
    report = lineage(delta, MlflowTracker(), vid)
    assert report["model"]["path"].startswith(str(target))
    assert verify(delta, vid, 2)["passed"]
    assert (
        stale_work(
            valued.instance, delta, code_versions(build_definitions(valued.settings).assets), settings=valued.settings
        )
        == []
    )
    assert json.loads(json.dumps(report, default=str))["valuation_id"] == vid
