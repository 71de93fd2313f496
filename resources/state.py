"""The state folder: where every file the pipeline writes lives.

``DATAWORTH_HOME`` (default ``<project root>/.dataworth``) holds ``delta/<table>``,
``mlflow/``, ``dagster/`` (DAGSTER_HOME), ``landing/`` and ``models/``. Each helper
returns an absolute path and creates the folder on demand.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "DATAWORTH_HOME"
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
