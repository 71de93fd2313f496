"""MlflowTracker: experiment tracking through an explicit ``MlflowClient``, a Dagster resource.

No mlflow global state is used (no ``mlflow.start_run``), so runs never leak between
calls, threads or processes. The store is the resource's `tracking_uri`, else ``$MLFLOW_TRACKING_URI`` (a
tracking server or database that a cluster's workers share), else ``sqlite:///<DATAWORTH_HOME>/mlflow/mlflow.db``;
for any sqlite store the experiment's artifacts go to ``<folder of the db>/artifacts/<experiment>``,
set explicitly so nothing lands in the working directory; with ``$DATAWORTH_ARTIFACT_ROOT`` (e.g.
``s3://bucket/prefix``, credentials from the ``AWS_*`` variables) a new experiment's artifacts go to
``<root>/<experiment>`` instead (an existing experiment keeps the location it was created with).
Creating the store and the experiment is serialized with a lock file next to the db (POSIX ``flock``), because
mlflow's schema migration is not safe when several processes run it at once.
mlflow is imported on first use: it costs seconds, and every Dagster step process pays it.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from resources.state import artifact_location, mlflow_dir, resolve_inside

SQLITE_PREFIX = "sqlite:///"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
MAX_PARAMS_PER_BATCH = 100  # mlflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view, where runs do not show.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingError(Exception):
    """The tracking store or experiment cannot be used as configured."""


def _as_text(value: Any) -> str:
    """Param/tag value as text: strings unchanged, anything else as sorted JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


class TrackedRun:
    """One open MLflow run; every method logs to it at once."""

    def __init__(self, client, run_id: str):
        self._client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics (floats) at ``step`` (0 when None)."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        entries = [Metric(key, float(value), now_ms, step or 0) for key, value in metrics.items()]
        for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=entries[start : start + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy the file or folder at ``path`` into the run's artifacts (under ``artifact_path``)."""
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, fig, name: str) -> None:
        """Save a matplotlib figure as artifact ``name`` (``.png``, ``.svg``, ...)."""
        self._client.log_figure(self.run_id, fig, name)

    def log_dict(self, d: dict, name: str) -> None:
        """Save ``d`` as artifact ``name`` (``.json`` or ``.yaml``)."""
        self._client.log_dict(self.run_id, d, name)


class MlflowTracker(dg.ConfigurableResource):
    """Opens MLflow runs in one experiment of one tracking store."""

    tracking_uri: str = Field(
        default="",
        description="MLflow tracking URI; empty means $MLFLOW_TRACKING_URI, else the state folder's sqlite store.",
    )
    experiment: str = Field(default="dataworth", description="MLflow experiment that receives the runs.")

    def __reduce__(self):  # Dagster resources do not unpickle by default; workers get a fresh one
        return functools.partial(MlflowTracker, tracking_uri=self.tracking_uri, experiment=self.experiment), ()

    def resolved_tracking_uri(self) -> str:
        """The tracking URI in use."""
        configured = self.tracking_uri or os.environ.get(TRACKING_URI_ENV, "").strip()
        return configured or f"{SQLITE_PREFIX}{mlflow_dir() / 'mlflow.db'}"

    def _sqlite_path(self) -> Path | None:
        uri = self.resolved_tracking_uri()
        return Path(uri.removeprefix(SQLITE_PREFIX)).resolve() if uri.startswith(SQLITE_PREFIX) else None

    @contextmanager
    def _store_lock(self) -> Iterator[None]:
        """Hold the store's lock file (sqlite stores only) while the store or experiment is created."""
        db = self._sqlite_path()
        if db is None:
            yield
            return
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.parent / f"{db.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _client(self):
        from mlflow import MlflowClient

        with self._store_lock():
            return MlflowClient(tracking_uri=self.resolved_tracking_uri())  # creates/migrates the store

    def _experiment_id(self, client) -> str:
        """Id of the active experiment, created (with its artifact location) when missing."""
        from mlflow.exceptions import MlflowException

        with self._store_lock():
            existing = client.get_experiment_by_name(self.experiment)
            if existing is None:
                db, root = self._sqlite_path(), artifact_location()
                if root:
                    artifacts = f"{root}/{self.experiment}"
                else:
                    artifacts = resolve_inside(db.parent / "artifacts", self.experiment).as_uri() if db else None
                try:
                    return client.create_experiment(
                        self.experiment, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                    )
                except MlflowException:  # a tracking server got it created by another client first
                    existing = client.get_experiment_by_name(self.experiment)
                    if existing is None:
                        raise
        if existing.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {self.experiment!r} in {self.resolved_tracking_uri()} is deleted; "
                f"restore it (`mlflow experiments restore`) or configure another experiment name"
            )
        if EXPERIMENT_KIND_TAG not in existing.tags:  # made before the tag was set: show it as model development
            client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return existing.experiment_id

    @contextmanager
    def run(
        self,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        replaces: str | None = None,
    ) -> Iterator[TrackedRun]:
        """Open a run, log ``params`` and ``tags`` (non-strings as JSON), yield it, then close it.

        The run ends FINISHED, or FAILED if the block raises (the exception propagates). With ``replaces``
        (a key of ``tags``, e.g. ``"valuation_id"``), once the run has FINISHED every other run of the
        experiment with the same value of that tag is deleted: materializing the same valuation again
        leaves one run, not two with the same name (a failed attempt deletes nothing).
        """
        from mlflow.entities import Param

        client = self._client()
        experiment_id = self._experiment_id(client)
        text_tags = {key: _as_text(value) for key, value in (tags or {}).items()}
        run_id = client.create_run(experiment_id, run_name=run_name, tags=text_tags).info.run_id
        try:
            entries = [Param(key, _as_text(value)) for key, value in (params or {}).items()]
            for start in range(0, len(entries), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=entries[start : start + MAX_PARAMS_PER_BATCH])
            yield TrackedRun(client, run_id)
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        if replaces is not None:
            for old in self._runs_tagged(client, experiment_id, replaces, text_tags[replaces]):
                if old != run_id:
                    client.delete_run(old)

    @staticmethod
    def _runs_tagged(client, experiment_id: str, key: str, value: str) -> list[str]:
        """Ids of the active runs of the experiment whose tag ``key`` equals ``value``."""
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        found, token = [], None
        while True:
            page = client.search_runs(
                [experiment_id], filter_string=f"tags.`{key}` = '{quoted}'", max_results=1000, page_token=token
            )
            found += [run.info.run_id for run in page]
            token = page.token
            if not token:
                return found

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy the file at ``path`` into the artifacts of the (finished) run ``run_id``."""
        self._client().log_artifact(run_id, str(path), artifact_path)

    def runs_tagged(self, key: str, value: str) -> list[str]:
        """Ids of the active runs of this experiment whose tag ``key`` equals ``value``."""
        client = self._client()
        return self._runs_tagged(client, self._experiment_id(client), key, value)

    def experiment_tags(self) -> dict[str, str]:
        """The experiment's tags (``mlflow.*`` included)."""
        client = self._client()
        return dict(client.get_experiment(self._experiment_id(client)).tags)

    def get_run(self, run_id: str) -> dict[str, Any]:
        """Audit view of a run.

        Returns run_id, run_name, experiment_id, status, params (str), metrics (last value
        per key), tags (user tags; ``mlflow.*`` system tags left out) and artifacts (sorted
        file paths relative to the run's artifact root).
        """
        client = self._client()
        run = client.get_run(run_id)
        return {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
            "artifacts": sorted(_artifact_files(client, run_id)),
        }


def _artifact_files(client, run_id: str, folder: str | None = None) -> Iterator[str]:
    for info in client.list_artifacts(run_id, folder):
        if info.is_dir:
            yield from _artifact_files(client, run_id, info.path)
        else:
            yield info.path
