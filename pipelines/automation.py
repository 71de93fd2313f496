"""Revaluation: a sensor on the landing folder and a schedule that revalues what is stale.

- `landing_sensor`: stages new landing files (domain.staging), adds their shards as partitions and
  requests `stale_work` for them: normally the new shards only, plus the unpartitioned assets downstream.
  On a fresh state folder it seeds the embedded corpus and runs the whole graph.
- `revaluation_schedule` (cron `[automation] revaluation_cron`, daily by default): requests `stale_work`.
Both wait while a run of the valuation job is queued or in progress, so two runs never score
against each other's half-made shards. A run left STARTED by a process that died on this machine
(SIGKILL, power loss) would block them for ever; `active_run` marks it failed instead, and what it did
not finish is stale like any missing shard.

What is stale, in the order `stale_work` checks it (the first hit decides the one run it requests):
- the model: never materialized, its settings changed (code version), or a local checkpoint's files
  changed -> the whole graph over every shard;
- the projection: never materialized, its settings changed, or made for another model than the
  current one -> every shard's gradients and the query gradients;
- shards without gradients (a new batch), or with gradients of another model or projection -> those
  shards only (one run over the range that covers them), and the query gradients if they are not of
  the current projection either;
- the valuation: a setting of hessian_factors, valuation_queries, influence_scores or
  provider_valuations changed (code version; the query file's bytes are part of valuation_queries'),
  or the latest valuation read other shards or other table versions than the current ones ->
  hessian_factors and what follows, no gradient.
"""

import json
from collections.abc import Callable, Sequence

import dagster as dg
import polars as pl
import psutil

from assets.partitions import shard_partitions
from domain.artifacts import latest_row
from domain.lm import checkpoint_hash
from domain.settings import Settings
from domain.staging import stage_landing
from resources.delta import DeltaStore

JOB = "valuation"
ALL = (
    "training_corpus",
    "model_checkpoint",
    "token_shards",
    "gradient_projection",
    "projected_gradients",
    "hessian_factors",
    "valuation_queries",
    "influence_scores",
    "provider_valuations",
)
SCORES = ("hessian_factors", "valuation_queries", "influence_scores", "provider_valuations")
NEW_SHARDS = tuple(a for a in ALL if a not in ("model_checkpoint", "gradient_projection", "valuation_queries"))
REPROJECT = tuple(a for a in ALL if a != "model_checkpoint")
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
REASON_TAG = "dataworth/stale"
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def code_versions(assets: Sequence[dg.AssetsDefinition]) -> dict[str, str]:
    """Asset name -> its code version (what the settings make it)."""
    return {a.key.path[-1]: a.code_versions_by_key[a.key] for a in assets}


def process_gone(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str | None:
    """Why a started run can never end, when the process that runs it on this machine is gone, or None.

    Only for runs on this machine (the default run launcher, and `dataworth run`): the pid is the one
    that reported the run's start; a pid reused by a younger process counts as gone."""
    if run.status not in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING):
        return None
    if not isinstance(instance.run_launcher, dg.DefaultRunLauncher):
        return None
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
    if not records or (pid := records[0].event_log_entry.dagster_event.pid) is None:
        return None
    try:
        process = psutil.Process(pid)
        if (
            process.status() != psutil.STATUS_ZOMBIE
            and process.create_time() <= records[0].event_log_entry.timestamp + 1
        ):
            return None
    except psutil.NoSuchProcess:
        pass
    return f"process {pid}, which ran it, is gone (killed?)"


def active_run(instance: dg.DagsterInstance, warn: Callable[[str], None]) -> str | None:
    """Id of a queued or running run of the valuation job, if any.

    A started run whose process is gone (see `process_gone`) is first marked failed, and `warn` told."""
    for record in instance.get_run_records(filters=dg.RunsFilter(job_name=JOB, statuses=ACTIVE_STATUSES)):
        run = record.dagster_run
        if reason := process_gone(instance, run):
            message = (
                f"marked valuation run {run.run_id} failed: {reason}; "
                "what it did not finish is stale and will be redone"
            )
            instance.report_run_failed(run, message)
            warn(message)
            continue
        return run.run_id
    return None


def request(assets: tuple[str, ...], shard_range: tuple[str, str] | None, reason: str) -> dg.RunRequest:
    """A run of `assets` of the valuation job, over a contiguous range of shards when given."""
    tags = {RANGE_START: shard_range[0], RANGE_END: shard_range[1]} if shard_range else {}
    return dg.RunRequest(asset_selection=[dg.AssetKey(a) for a in assets], tags={**tags, REASON_TAG: reason})


def settings_changed(instance: dg.DagsterInstance, asset: str, code_versions: dict[str, str]) -> str | None:
    """Why `asset`'s latest materialization is not current by its code version, or None."""
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None:
        return f"{asset} was never materialized"
    if event.asset_materialization.tags.get("dagster/code_version") != code_versions[asset]:
        return f"{asset} has new settings (code version {code_versions[asset]})"
    return None


def model_stale(instance: dg.DagsterInstance, delta: DeltaStore, code_versions: dict[str, str]) -> str | None:
    if reason := settings_changed(instance, "model_checkpoint", code_versions):
        return reason
    if not delta.exists("model_checkpoint"):
        return "the model_checkpoint table is missing"
    row = latest_row(delta, "model_checkpoint")
    if row["source"] == "local" and checkpoint_hash(row["path"]) != row["checkpoint_hash"]:
        return f"the checkpoint files at {row['path']} changed"
    return None


def projection_stale(instance: dg.DagsterInstance, delta: DeltaStore, code_versions: dict[str, str]) -> str | None:
    if reason := settings_changed(instance, "gradient_projection", code_versions):
        return reason
    if not delta.exists("gradient_projection"):
        return "the gradient_projection table is missing"
    model_hash = latest_row(delta, "model_checkpoint")["checkpoint_hash"]
    if latest_row(delta, "gradient_projection")["model_hash"] != model_hash:
        return f"the projection was made for another model than the current {model_hash[:12]}"
    return None


def stale_shards(delta: DeltaStore, shards: list[str]) -> list[str]:
    """Shards with no gradients, or gradients of another model or projection than the current."""
    if not delta.exists("projected_gradients"):
        return list(shards)
    current = latest_row(delta, "gradient_projection")
    done = delta.read("projected_gradients", columns=["shard_id", "projection_hash", "model_hash"]).unique()
    fresh = done.filter(
        (pl.col("projection_hash") == current["projection_hash"]) & (pl.col("model_hash") == current["model_hash"])
    )
    fresh_ids = set(fresh["shard_id"].to_list())
    return [s for s in shards if s not in fresh_ids]


def queries_stale(delta: DeltaStore) -> bool:
    """Whether the query gradients are missing or of another model or projection than the current."""
    if not delta.exists("valuation_queries"):
        return True
    current = latest_row(delta, "gradient_projection")
    made = delta.read("valuation_queries", columns=["projection_hash", "model_hash"]).unique().rows()
    return made != [(current["projection_hash"], current["model_hash"])]


def scores_stale(
    instance: dg.DagsterInstance, delta: DeltaStore, code_versions: dict[str, str], shards: list[str]
) -> str | None:
    for asset in SCORES:
        if reason := settings_changed(instance, asset, code_versions):
            return reason
    if not delta.exists("valuation_provenance"):
        return "no valuation was recorded yet"
    provenance = json.loads(latest_row(delta, "valuation_provenance")["provenance"])
    if provenance["shards"] != sorted(shards):
        return f"the latest valuation covers {len(provenance['shards'])} shard(s), not the current {len(shards)}"
    changed = sorted(t for t, v in provenance["tables"].items() if delta.version(t) != v)
    if changed:
        return f"tables changed since the latest valuation: {', '.join(changed)}"
    return None


def stale_work(
    instance: dg.DagsterInstance, delta: DeltaStore, code_versions: dict[str, str], shards: list[str] | None = None
) -> list[dg.RunRequest]:
    """The run (at most one) that brings every stale asset up to date, recomputing no fresh gradient.

    `shards` defaults to the instance's partitions (the sensor passes them with the ones it adds)."""
    shards = instance.get_dynamic_partitions(shard_partitions.name) if shards is None else shards
    if not shards:
        return []
    if reason := model_stale(instance, delta, code_versions):
        return [request(ALL, (shards[0], shards[-1]), reason)]
    if reason := projection_stale(instance, delta, code_versions):
        return [request(REPROJECT, (shards[0], shards[-1]), reason)]
    if stale := stale_shards(delta, shards):
        positions = sorted(shards.index(s) for s in stale)  # one run over the range covering them
        assets = (*NEW_SHARDS, "valuation_queries") if queries_stale(delta) else NEW_SHARDS
        return [
            request(
                assets,
                (shards[positions[0]], shards[positions[-1]]),
                f"{len(stale)} shard(s) without current gradients",
            )
        ]
    if reason := scores_stale(instance, delta, code_versions, shards):
        return [request(SCORES, None, reason)]
    return []


def build_automation(settings: Settings, assets: list[dg.AssetsDefinition]):
    versions = code_versions(assets)
    job = dg.define_asset_job(
        JOB,
        selection=dg.AssetSelection.assets(*ALL),
        description="The valuation graph; sensor and schedule run subsets of it.",
    )

    @dg.sensor(job=job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
    def landing_sensor(context: dg.SensorEvaluationContext, delta: DeltaStore) -> dg.SensorResult:
        """Stage new landing files and value their shards; quarantine malformed files with a reason."""
        if busy := active_run(context.instance, context.log.warning):
            return dg.SensorResult(skip_reason=f"valuation run {busy} is in progress; new files wait for it")
        known = context.instance.get_dynamic_partitions(shard_partitions.name)
        staged = stage_landing(settings, set(known))
        if staged.seeded:
            context.log.info(f"seeded the embedded corpus into {staged.folder}")
        for name, reason in staged.plan.quarantined.items():
            context.log.warning(f"quarantined {name} (see {staged.folder / '_rejected'}): {reason}")
        new = staged.new_shards
        if not new:
            plan = staged.plan
            return dg.SensorResult(
                skip_reason=f"no new batch ({len(plan.already_ingested)} file(s) already ingested, "
                f"{len(plan.quarantined)} quarantined)"
            )
        requests = [
            r.with_replaced_attrs(run_key=f"shards-{new[0]}-{new[-1]}")
            for r in stale_work(context.instance, delta, versions, [*known, *new])
        ]
        return dg.SensorResult(
            run_requests=requests, dynamic_partitions_requests=[shard_partitions.build_add_request(new)]
        )

    @dg.schedule(
        cron_schedule=settings.automation.revaluation_cron, job=job, default_status=dg.DefaultScheduleStatus.RUNNING
    )
    def revaluation_schedule(context: dg.ScheduleEvaluationContext, delta: DeltaStore):
        """Revalue everything that is stale (see `stale_work`)."""
        if busy := active_run(context.instance, context.log.warning):
            return dg.SkipReason(f"valuation run {busy} is in progress; the next tick revalues what is still stale")
        return stale_work(context.instance, delta, versions) or dg.SkipReason("nothing is stale")

    return [job], [landing_sensor], [revaluation_schedule]
