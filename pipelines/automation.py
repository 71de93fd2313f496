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
- shards without gradients (a new batch), with gradients of another model or projection, with gradient
  statistics of another fisher than `[curvature] fisher`, whose token_shards were made with other
  `[shards]` settings (code version) or are newer than their gradients, or whose Delta data files of
  training_corpus, token_shards or the gradient tables are gone -> those shards only (one run over the
  range that covers them), and the query gradients if they are not of the current projection either;
- the valuation: a setting of hessian_factors, valuation_queries, influence_scores or
  provider_valuations changed (code version; the query file's bytes are part of valuation_queries'),
  the latest valuation read other shards or other table versions than the current ones, or a data file
  of hessian_factors or valuation_queries is gone -> hessian_factors and what follows, no gradient;
- the latest valuation has no score rows (killed between its two commits) -> influence_scores and
  provider_valuations, which complete it under the same valuation id;
- the latest valuation has no provider_valuations rows (that step failed or was killed) -> provider_valuations.
A table whose log cannot be read, or a lost data file of a table that keeps history (valuations, model
and projection rows), is not something a run can repair: `stale_work` raises the named DeltaStore error.
"""

import json
import re
from collections.abc import Callable, Sequence

import dagster as dg
import polars as pl
import psutil

from assets.partitions import shard_partitions
from domain.artifacts import checkpoint_files_hash, latest_row
from domain.settings import Settings
from domain.staging import stage_landing
from resources.delta import DeltaStore, TableDataMissing, local_path
from resources.schemas import SCHEMAS

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
    if (row["source"] == "local" or row["adapter_path"]) and checkpoint_files_hash(row) != row["checkpoint_hash"]:
        adapter = f" or the adapter files at {row['adapter_path']}" if row["adapter_path"] else ""
        return f"the checkpoint files at {row['path']}{adapter} changed"
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


PER_SHARD_TABLES = ("training_corpus", "token_shards", "projected_gradients", "projected_gradients_statistics")
WHOLE_TABLES = ("hessian_factors", "valuation_queries")  # rewritten whole by a run of SCORES
_SHARD_IN_PATH = re.compile(r"shard_id=([^/]+)/")


def damaged_tables(delta: DeltaStore) -> tuple[dict[str, str], list[str]]:
    """Data files of the latest table versions that are gone: (shard -> why, for tables a run rewrites per
    shard; [why], for tables a run rewrites whole). A lost file of another table (history), and a log that
    cannot be read, raise the DeltaStore error naming the table and the repair."""
    per_shard: dict[str, str] = {}
    whole: list[str] = []
    for table in sorted(SCHEMAS):
        if not delta.exists(table):
            continue
        missing = delta.missing_files(table)  # raises TableLogCorrupt when the log does not parse
        if not missing:
            continue
        names = [local_path(uri).rsplit(f"/{table}/", 1)[-1] for uri in missing]
        why = f"{table} lists data file(s) that are gone: {', '.join(names[:3])}"
        shards = [m[1] for name in names if (m := _SHARD_IN_PATH.search(name))]
        if table in PER_SHARD_TABLES and len(shards) == len(names):
            for shard in shards:
                per_shard.setdefault(shard, why)
        elif table in WHOLE_TABLES:
            whole.append(why)
        else:
            raise TableDataMissing(table, delta.table_path(table), ", ".join(names), delta.version(table))
    return per_shard, whole


def latest_by_partition(instance: dg.DagsterInstance, asset: str) -> dict[str, dg.EventLogRecord]:
    """The latest materialization record of each partition of `asset` in the instance."""
    latest: dict[str, dg.EventLogRecord] = {}
    cursor = None
    while True:
        page = instance.fetch_materializations(dg.AssetKey(asset), limit=1000, cursor=cursor)
        for record in page.records:
            if record.partition_key is not None:
                latest.setdefault(record.partition_key, record)
        if not page.has_more:
            return latest
        cursor = page.cursor


def resequenced_shards(instance: dg.DagsterInstance, code_versions: dict[str, str], shards: list[str]) -> list[str]:
    """Shards whose token_shards were made with other settings (code version) than the current ones, or
    re-made after their gradients (a run that died between the two)."""
    tokens = latest_by_partition(instance, "token_shards")
    gradients = latest_by_partition(instance, "projected_gradients")
    current = code_versions["token_shards"]
    stale = []
    for shard in shards:
        made = tokens.get(shard)
        if made is None:
            continue  # never sequenced in this instance: a new shard (no gradients either) or a copied state folder
        version = made.asset_materialization.tags.get("dagster/code_version")
        after = gradients.get(shard)
        if version != current or (after is not None and after.storage_id < made.storage_id):
            stale.append(shard)
    return stale


def fisher_stale_shards(delta: DeltaStore, shards: list[str], fisher: str) -> list[str]:
    """Shards whose gradient statistics were made with another fisher than `fisher` (or are missing)."""
    if not delta.exists("projected_gradients_statistics"):
        return list(shards)
    made = delta.read("projected_gradients_statistics", columns=["shard_id", "fisher"]).unique()
    other = set(made.filter(pl.col("fisher") != fisher)["shard_id"].to_list())
    current = set(made.filter(pl.col("fisher") == fisher)["shard_id"].to_list()) - other
    return [s for s in shards if s not in current]


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


def scores_missing(delta: DeltaStore) -> str | None:
    """Why the latest valuation's scores must be written (its run died between its two commits), or None."""
    vid = latest_row(delta, "valuation_provenance")["valuation_id"]
    if (
        delta.exists("influence_scores")
        and not delta.read("influence_scores", columns=["valuation_id"], where={"valuation_id": vid}).is_empty()
    ):
        return None
    return f"the latest valuation {vid} has no influence_scores rows (its run was killed between its commits)"


def provider_rows_missing(delta: DeltaStore) -> str | None:
    """Why the latest valuation's provider values must be written, or None."""
    vid = latest_row(delta, "valuation_provenance")["valuation_id"]
    if (
        delta.exists("provider_valuations")
        and not delta.read("provider_valuations", columns=["valuation_id"], where={"valuation_id": vid}).is_empty()
    ):
        return None
    return f"the latest valuation {vid} has no provider_valuations rows (that step failed or was killed)"


def stale_work(
    instance: dg.DagsterInstance,
    delta: DeltaStore,
    code_versions: dict[str, str],
    shards: list[str] | None = None,
    settings: Settings | None = None,
) -> list[dg.RunRequest]:
    """The run (at most one) that brings every stale asset up to date, recomputing no fresh gradient.

    `shards` defaults to the instance's partitions (the sensor passes them with the ones it adds);
    `settings` (for the fisher of the stored statistics) to `Settings.load()`."""
    shards = instance.get_dynamic_partitions(shard_partitions.name) if shards is None else shards
    if not shards:
        return []
    settings = settings or Settings.load()
    damaged, damaged_whole = damaged_tables(delta)
    if reason := model_stale(instance, delta, code_versions):
        return [request(ALL, (shards[0], shards[-1]), reason)]
    if reason := projection_stale(instance, delta, code_versions):
        return [request(REPROJECT, (shards[0], shards[-1]), reason)]
    without = set(stale_shards(delta, shards))
    fisher = set(fisher_stale_shards(delta, shards, settings.curvature.fisher)) - without
    resequenced = set(resequenced_shards(instance, code_versions, shards))
    reasons = [
        (without, "shard(s) without current gradients"),
        (fisher, f"shard(s) with gradient statistics of another fisher than {settings.curvature.fisher!r}"),
        (resequenced, "shard(s) whose token_shards are of other [shards] settings or newer than their gradients"),
        (set(damaged), "shard(s) with lost data files (" + "; ".join(sorted(set(damaged.values()))) + ")"),
    ]
    if stale := [s for s in shards if any(s in group for group, _ in reasons)]:
        positions = sorted(shards.index(s) for s in stale)  # one run over the range covering them
        assets = (*NEW_SHARDS, "valuation_queries") if queries_stale(delta) else NEW_SHARDS
        why = "; ".join(f"{len(group)} {text}" for group, text in reasons if group)
        return [request(assets, (shards[positions[0]], shards[positions[-1]]), why)]
    if damaged_whole:
        return [request(SCORES, None, "; ".join(damaged_whole))]
    if reason := scores_stale(instance, delta, code_versions, shards):
        return [request(SCORES, None, reason)]
    if reason := scores_missing(delta):  # the same inputs: the same valuation id, completed
        return [request(("influence_scores", "provider_valuations"), None, reason)]
    if reason := provider_rows_missing(delta):
        return [request(("provider_valuations",), None, reason)]
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
        new = staged.new_shards
        plan = staged.plan
        notes = plan.report()
        for note in notes:
            context.log.info(note)
        counts = (
            f"{len(plan.already_ingested)} file(s) already ingested, {len(plan.quarantined)} quarantined, "
            f"{len(plan.waiting)} still settling, {len(plan.skipped)} entr(ies) left alone"
        )
        details = "".join(f"\n- {note}" for note in notes)
        if not new:
            return dg.SensorResult(skip_reason=f"no new batch in {staged.folder} ({counts}){details}")
        requests = [
            r.with_replaced_attrs(run_key=f"shards-{new[0]}-{new[-1]}")
            for r in stale_work(context.instance, delta, versions, [*known, *new], settings=settings)
        ]
        partitions = [shard_partitions.build_add_request(new)]
        if not requests:
            return dg.SensorResult(
                skip_reason=f"added {len(new)} shard(s), but nothing is stale ({counts}){details}",
                dynamic_partitions_requests=partitions,
            )
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=partitions)

    @dg.schedule(
        cron_schedule=settings.automation.revaluation_cron, job=job, default_status=dg.DefaultScheduleStatus.RUNNING
    )
    def revaluation_schedule(context: dg.ScheduleEvaluationContext, delta: DeltaStore):
        """Revalue everything that is stale (see `stale_work`)."""
        if busy := active_run(context.instance, context.log.warning):
            return dg.SkipReason(f"valuation run {busy} is in progress; the next tick revalues what is still stale")
        return stale_work(context.instance, delta, versions, settings=settings) or dg.SkipReason("nothing is stale")

    return [job], [landing_sensor], [revaluation_schedule]
