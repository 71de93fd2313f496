"""The state folder: where every file the pipeline writes lives.

``DATAWORTH_HOME`` (default ``<project root>/.dataworth``) holds ``delta/<table>``,
``mlflow/``, ``dagster/`` (DAGSTER_HOME), ``landing/``, ``models/`` and ``reports/``. Each helper
returns an absolute path and creates the folder on demand.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "DATAWORTH_HOME"
DELTA_ROOT_ENV = "DATAWORTH_DELTA_ROOT"
ARTIFACT_ROOT_ENV = "DATAWORTH_ARTIFACT_ROOT"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def dataworth_home() -> Path:
    """The state folder: ``$DATAWORTH_HOME`` if set and non-empty, else ``<project root>/.dataworth``."""
    configured = os.environ.get(HOME_ENV, "").strip()
    home = Path(configured).expanduser() if configured else PROJECT_ROOT / ".dataworth"
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def _subfolder(name: str) -> Path:
    folder = dataworth_home() / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def delta_root() -> Path:
    """Folder of the Delta tables, one sub-folder per table."""
    return _subfolder("delta")


def is_uri(location: str) -> bool:
    """Whether `location` names an object store (``s3://...``) rather than a local path."""
    return "://" in location and not location.startswith("file://")


def delta_location() -> str:
    """Where the Delta tables live: ``$DATAWORTH_DELTA_ROOT`` (a folder or an ``s3://bucket/prefix`` URI)
    if set, else ``<state folder>/delta``. Checkpoints, projections and MLflow stay in the state folder."""
    configured = os.environ.get(DELTA_ROOT_ENV, "").strip()
    return configured if configured else str(delta_root())


def artifact_location() -> str | None:
    """Where a new MLflow experiment keeps its artifacts: ``$DATAWORTH_ARTIFACT_ROOT`` (e.g. an
    ``s3://bucket/prefix`` URI) if set, else None (the tracker's default beside its sqlite store)."""
    return os.environ.get(ARTIFACT_ROOT_ENV, "").strip().rstrip("/") or None


def mlflow_dir() -> Path:
    """Folder of the MLflow sqlite store (``mlflow.db``) and its ``artifacts/``."""
    return _subfolder("mlflow")


def dagster_home() -> Path:
    """DAGSTER_HOME: Dagster's instance folder (run storage, event logs, dagster.yaml)."""
    return _subfolder("dagster")


def landing_dir() -> Path:
    """Folder where providers drop new corpus files (``.jsonl`` / ``.parquet``)."""
    return _subfolder("landing")


def models_dir() -> Path:
    """Folder of tokenizer and model checkpoints."""
    return _subfolder("models")


def reports_dir() -> Path:
    """Folder of the valuation reports (``<valuation id>.html``)."""
    return _subfolder("reports")


def stored_path(path: str | Path) -> str:
    """How a path is stored in a Delta row: relative to the state folder when inside it (so the state folder
    can move), else absolute (a checkpoint the operator keeps elsewhere)."""
    path = Path(path).resolve()
    home = dataworth_home()
    return path.relative_to(home).as_posix() if path.is_relative_to(home) else str(path)


def stored_path_to_local(value: str) -> Path:
    """The absolute path a stored path names (see `stored_path`). Relative paths are under the state folder;
    absolute ones (rows written before paths were relative) are taken as they are, unless they are gone and
    their last two parts (``models/<hash>``, ``projections/<hash>``) exist in the current state folder,
    which is where a moved state folder keeps them."""
    path = Path(value)
    if not path.is_absolute():
        return dataworth_home() / path
    moved = dataworth_home() / path.parent.name / path.name
    if not path.exists() and path.parent.name in ("models", "projections") and moved.exists():
        return moved
    return path


def resolve_inside(root: Path, relative: str) -> Path:
    """Resolve ``relative`` under ``root``, refusing any path that escapes ``root``.

    Absolute paths, ``..`` components and symlinks that resolve outside ``root`` raise
    ``ValueError`` naming the path and the root. Returns the resolved absolute path
    (which need not exist).
    """
    root_resolved = Path(root).resolve()
    candidate = Path(relative)
    if not relative or candidate.is_absolute() or candidate.anchor:
        raise ValueError(f"path {relative!r} must be relative to {root_resolved}; absolute or empty paths are refused")
    if ".." in candidate.parts:
        raise ValueError(f"path {relative!r} contains '..' and could escape {root_resolved}; refused")
    resolved = (root_resolved / candidate).resolve()
    if not resolved.is_relative_to(root_resolved):
        raise ValueError(
            f"path {relative!r} resolves to {resolved}, outside {root_resolved} (through a symlink); refused"
        )
    return resolved
