"""The Dagster code location: every asset, check, job, sensor and schedule, built from the settings.

`dagster dev -w workspace.yaml` serves `defs`. Steps run in spawned processes (deltalake cannot be
used after a fork); each reloads this module, so the settings come from the same file.
"""

import warnings

import dagster as dg

from assets import corpus, gradients, quality, valuation
from assets.common import shard_partitions
from pipelines.revaluation import build_automation
from pipelines.settings import Settings
from resources.delta import DeltaStore
from resources.tracking import MlflowTracker

warnings.filterwarnings("ignore", category=dg.BetaWarning)  # backfill_policy is beta; we rely on it deliberately

EXECUTOR = dg.multiprocess_executor.configured({"max_concurrent": 2, "start_method": {"spawn": {}}})


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.load()
    training_corpus, model_checkpoint, token_shards = corpus.build(settings)
    gradient_projection, projected_gradients, hessian_factors = gradients.build(settings, token_shards, model_checkpoint)
    valuation_assets = valuation.build(settings, model_checkpoint, gradient_projection, projected_gradients, hessian_factors)
    assets = [training_corpus, model_checkpoint, token_shards, gradient_projection, projected_gradients, hessian_factors, *valuation_assets]
    jobs, sensors, schedules = build_automation(settings, assets)
    valuation_queries = valuation_assets[0]
    quality_asset = quality.build(settings, model_checkpoint, token_shards, valuation_queries)  # on demand only
    return dg.Definitions(
        assets=[*assets, quality_asset],
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources={"delta": DeltaStore(), "mlflow": MlflowTracker()},
        executor=EXECUTOR,
    )


defs = build_definitions()


def valuation_job() -> dg.JobDefinition:
    """The whole graph as one job, for `dagster.reconstructable` (multiprocess runs outside the UI)."""
    return defs.resolve_job_def("valuation")


__all__ = ["build_definitions", "defs", "shard_partitions", "valuation_job"]
