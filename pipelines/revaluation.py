"""Revaluation: a sensor on the landing folder and a schedule that revalues what is stale.

- `landing_sensor`: stages new landing files (pipelines.batches), adds their shards as partitions and
  runs the graph for those shards only (plus the unpartitioned assets downstream of them). On a
  fresh state folder it seeds the embedded corpus and runs the whole graph.
- `revaluation_schedule` (daily by default): finds stale work with `stale_work` and requests it.
A shard is stale when it has no gradients yet or its gradients were made with another model or
projection than the current ones; scores are stale when an upstream table or a score setting changed
since the last valuation (compared through the assets' code versions).
"""

import dagster as dg

from assets.common import shard_partitions
from pipelines.batches import plan_landing, seed_embedded_corpus
from pipelines.home import landing_dir, resolve_inside, PROJECT_ROOT
from pipelines.settings import Settings
from resources.delta import DeltaStore

JOB = "valuation"
ALL = ("training_corpus", "model_checkpoint", "token_shards", "gradient_projection", "projected_gradients",
       "hessian_factors", "valuation_queries", "influence_scores", "provider_valuations")
SCORES = ("hessian_factors", "valuation_queries", "influence_scores", "provider_valuations")
NEW_SHARDS = tuple(a for a in ALL if a not in ("model_checkpoint", "gradient_projection", "valuation_queries"))
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def landing_folder(settings: Settings):
    if not settings.corpus.landing_dir:
        return landing_dir()
    folder = resolve_inside(PROJECT_ROOT, settings.corpus.landing_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def contiguous_ranges(keys: list[str], ordered: list[str]) -> list[tuple[str, str]]:
    """Group `keys` into runs that are contiguous in the partition order `ordered`."""
    position = {k: i for i, k in enumerate(ordered)}
    ranges, current = [], []
    for key in sorted(keys, key=position.__getitem__):
        if current and position[key] != position[current[-1]] + 1:
            ranges.append((current[0], current[-1]))
            current = []
        current.append(key)
    if current:
        ranges.append((current[0], current[-1]))
    return ranges


def request(assets: tuple[str, ...], shard_range: tuple[str, str] | None = None, run_key: str | None = None) -> dg.RunRequest:
    """A run of `assets` of the valuation job, over a contiguous range of shards when given."""
    tags = {RANGE_START: shard_range[0], RANGE_END: shard_range[1]} if shard_range else {}
    return dg.RunRequest(run_key=run_key, asset_selection=[dg.AssetKey(a) for a in assets], tags=tags)


def has_materialization(instance: dg.DagsterInstance, asset: str) -> bool:
    return instance.get_latest_materialization_event(dg.AssetKey(asset)) is not None


def stale_shards(delta: DeltaStore, shards: list[str]) -> list[str]:
    """Shards with no gradients, or gradients of another model or projection than the current."""
    from pipelines.artifacts import latest_row  # noqa: PLC0415 - keeps the sensor import light

    if not delta.exists("projected_gradients") or not delta.exists("gradient_projection"):
        return list(shards)
    current = latest_row(delta, "gradient_projection")
    done = delta.read("projected_gradients", columns=["shard_id", "projection_hash", "model_hash"]).unique()
    fresh = done.filter((done["projection_hash"] == current["projection_hash"]) & (done["model_hash"] == current["model_hash"]))
    return [s for s in shards if s not in set(fresh["shard_id"].to_list())]


def scores_stale(instance: dg.DagsterInstance, code_versions: dict[str, str]) -> bool:
    """Whether a score-level asset's last materialization used other settings than the current."""
    for asset in ("hessian_factors", "valuation_queries", "influence_scores", "provider_valuations"):
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        if event is None or event.asset_materialization.tags.get("dagster/code_version") != code_versions[asset]:
            return True
    return False


def stale_work(instance: dg.DagsterInstance, delta: DeltaStore, code_versions: dict[str, str]) -> list[dg.RunRequest]:
    """Run requests that bring every stale asset up to date, recomputing no fresh gradient."""
    shards = instance.get_dynamic_partitions(shard_partitions.name)
    if not shards:
        return []
    if not has_materialization(instance, "model_checkpoint") or not has_materialization(instance, "gradient_projection"):
        return [request(ALL, (shards[0], shards[-1]))]
    stale = stale_shards(delta, shards)
    if stale:
        return [request(NEW_SHARDS, r) for r in contiguous_ranges(stale, shards)]
    if scores_stale(instance, code_versions):
        return [request(SCORES)]
    return []


def build_automation(settings: Settings, assets: list[dg.AssetsDefinition]):
    by_name = {a.key.path[-1]: a for a in assets}
    code_versions = {name: a.code_versions_by_key[a.key] for name, a in by_name.items()}
    job = dg.define_asset_job(JOB, selection=dg.AssetSelection.all(), description="The valuation graph; sensor and schedule run subsets of it.")

    @dg.sensor(job=job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
    def landing_sensor(context: dg.SensorEvaluationContext, delta: DeltaStore) -> dg.SensorResult:
        """Stage new landing files and value their shards; quarantine malformed files with a reason."""
        folder = landing_folder(settings)
        if settings.corpus.seed_embedded_corpus and seed_embedded_corpus(folder):
            context.log.info(f"seeded the embedded corpus into {folder}")
        plan = plan_landing(folder, settings.corpus.docs_per_shard)
        for name, reason in plan.quarantined.items():
            context.log.warning(f"quarantined {name}: {reason}")
        known = set(context.instance.get_dynamic_partitions(shard_partitions.name))
        new = [s for s in plan.shard_ids if s not in known]
        if not new:
            return dg.SensorResult(skip_reason=f"no new batch ({len(plan.already_ingested)} file(s) already ingested)")
        shards = [*context.instance.get_dynamic_partitions(shard_partitions.name), *new]
        if not has_materialization(context.instance, "model_checkpoint"):
            requests = [request(ALL, (shards[0], shards[-1]), run_key=f"all-{shards[-1]}")]
        else:
            requests = [request(NEW_SHARDS, (new[0], new[-1]), run_key=f"new-{new[0]}-{new[-1]}")]
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=[shard_partitions.build_add_request(new)])

    @dg.schedule(cron_schedule=settings.automation.revaluation_cron, job=job, default_status=dg.DefaultScheduleStatus.RUNNING)
    def revaluation_schedule(context: dg.ScheduleEvaluationContext, delta: DeltaStore):
        """Revalue everything that is stale (see `stale_work`)."""
        requests = stale_work(context.instance, delta, code_versions)
        return requests or dg.SkipReason("nothing is stale")

    return [job], [landing_sensor], [revaluation_schedule]
