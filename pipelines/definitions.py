"""The Dagster code location: every asset, check, job, sensor and schedule, built from the settings.

`dagster dev -w workspace.yaml` serves `defs`. Steps run where `[deployment]` says (pipelines/executors.py),
each in a process that reloads this module, so the settings come from the same file.
"""

import warnings

import dagster as dg

from assets import corpus, gradients, quality, valuation
from domain.settings import Settings
from pipelines.automation import build_automation
from pipelines.executors import build_executor
from resources.delta import DeltaStore
from resources.tracking import MlflowTracker

warnings.filterwarnings("ignore", category=dg.BetaWarning)  # backfill_policy is beta; we rely on it deliberately


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """Assets (valuation_quality on demand only), the valuation job, its sensor and schedule."""
    settings = settings or Settings.load()
    assets = [*corpus.build(settings), *gradients.build(settings), *valuation.build(settings)]
    jobs, sensors, schedules = build_automation(settings, assets)
    return dg.Definitions(
        assets=[*assets, quality.build(settings)],
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources={"delta": DeltaStore(), "mlflow": MlflowTracker()},
        executor=build_executor(settings.deployment),
    )


defs = build_definitions()


def valuation_job() -> dg.JobDefinition:
    """The whole graph as one job, for `dagster.reconstructable` (multiprocess runs outside the UI)."""
    return defs.resolve_job_def("valuation")
