"""The model checkpoint and projection a valuation uses, found through their Delta tables.

Their rows store the folder's path relative to the state folder (`resources.state.stored_path`), so a
moved state folder still reads, or, with `$DATAWORTH_MODELS_ROOT` on object storage, the URI the folder was
published to (`resources.folders`); `latest_row` hands back an absolute local path (fetching a published
folder once).

`model_checkpoint` and `gradient_projection` keep one row per checkpoint / projection, replaced when it
is materialized again (the newest row is current); the files live under `$DATAWORTH_HOME/models/<hash>`
and `.../projections/<hash>`.
Loading re-hashes the files, so a checkpoint or projection changed behind our back is refused.
A checkpoint row's `adapter_path` names the LoRA adapter applied on the model ("" for none); its
`checkpoint_hash` then covers the base and the adapter files (`domain.lm.combined_hash`).
"""

import shutil
from pathlib import Path

import polars as pl

from dataworth import MismatchError, Projection
from domain.lm import load_checkpoint, model_files_hash, save_checkpoint
from resources.delta import DeltaStore
from resources.folders import local_folder
from resources.state import dataworth_home, models_dir

PATH_TABLES = ("model_checkpoint", "gradient_projection")  # their `path` is stored relative to the state folder
PATH_COLUMNS = ("path", "adapter_path")  # stored with `stored_path`; "" (no adapter) stays ""


def projections_dir() -> Path:
    folder = dataworth_home() / "projections"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def store_checkpoint(model, tokenizer, run_id: str) -> tuple[Path, str]:
    """Save under `models/<hash>` (atomically, through a staging folder); returns (path, checkpoint hash)."""
    staging = models_dir() / f".staging-{run_id}"
    digest = save_checkpoint(model, tokenizer, staging)
    path = models_dir() / digest[:16]
    if path.exists():
        shutil.rmtree(staging)
    else:
        staging.rename(path)
    return path, digest


def latest_row(delta: DeltaStore, table: str, version: int | None = None) -> dict:
    """The newest row of a one-row-per-materialization table (by `created_at`); the `path` of a checkpoint or
    projection row comes back as a local absolute path (see `resources.folders.local_folder`)."""
    frame = delta.read(table, version=version)
    if frame.height == 0:
        raise LookupError(f"table {table!r} is empty; materialize the {table} asset first")
    row = frame.sort("created_at").row(-1, named=True)
    if table == "model_checkpoint":
        row.setdefault("adapter_path", "")  # rows written before adapters were recorded
    for column in PATH_COLUMNS:
        if table in PATH_TABLES and row.get(column):
            row[column] = str(local_folder(row[column]))
    return row


def record_checkpoint(delta: DeltaStore, row: pl.DataFrame, metadata: dict[str, str]) -> int:
    """Replace the checkpoint's row of `model_checkpoint` by `row` (one row per checkpoint). A table written
    before the `adapter_path` column existed is rewritten whole, its rows given adapter_path = ""."""
    digest = row["checkpoint_hash"][0]
    if delta.exists("model_checkpoint"):
        old = delta.read("model_checkpoint")
        if "adapter_path" not in old.columns:
            kept = old.filter(pl.col("checkpoint_hash") != digest).with_columns(adapter_path=pl.lit(""))
            frame = pl.concat([kept.select(row.columns).cast(row.schema), row])
            return delta.write("model_checkpoint", frame, mode="overwrite", metadata=metadata)
    return delta.replace("model_checkpoint", row, {"checkpoint_hash": digest}, metadata=metadata)


def checkpoint_files_hash(row: dict) -> str:
    """The hash of a `model_checkpoint` row's files as they are on disk now (base and adapter)."""
    return model_files_hash(row["path"], row.get("adapter_path") or None)


def load_model(delta: DeltaStore, version: int | None = None):
    """(model, tokenizer, row) of the current checkpoint, with its adapter applied when the row names one,
    its bytes verified against the row's hash."""
    row = latest_row(delta, "model_checkpoint", version)
    model, tokenizer, digest = load_checkpoint(row["path"], row["adapter_path"] or None)
    if digest != row["checkpoint_hash"]:
        adapter = f" with adapter {row['adapter_path']}" if row["adapter_path"] else ""
        raise MismatchError(
            f"checkpoint {row['path']}{adapter} hashes to {digest[:12]} but model_checkpoint recorded "
            f"{row['checkpoint_hash'][:12]}: it changed on disk; re-materialize model_checkpoint"
        )
    return model, tokenizer, row


def load_projection(
    delta: DeltaStore, model_hash: str | None = None, version: int | None = None
) -> tuple[Projection, dict]:
    """The current projection, verified; refuses one made for another model than `model_hash`."""
    row = latest_row(delta, "gradient_projection", version)
    projection = Projection.load(row["path"])
    if projection.content_hash() != row["projection_hash"]:
        raise MismatchError(f"projection at {row['path']} does not match gradient_projection's recorded hash")
    if model_hash is not None and row["model_hash"] != model_hash:
        raise MismatchError(
            f"projection {row['projection_hash'][:12]} was made for model {row['model_hash'][:12]}, not for the "
            f"current model {model_hash[:12]}; re-materialize gradient_projection"
        )
    return projection, row


def require_single(frame: pl.DataFrame, column: str, expected: str, what: str) -> None:
    """Refuse to mix rows made with different projections or models."""
    found = frame[column].unique().to_list()
    if found and found != [expected]:
        raise MismatchError(
            f"{what} were made with {column} {sorted(x[:12] for x in found)} but the current one is "
            f"{expected[:12]}; re-materialize the stale partitions before scoring"
        )
