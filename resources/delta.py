"""DeltaStore: our Delta Lake reader/writer, a Dagster resource (not dagster-deltalake).

Tables live in ``<root>/<name>``. Every write is one Delta commit carrying the caller's
commit metadata (Dagster run id, code version, upstream table versions as JSON), stored
under the ``dataworth.`` prefix in the commit info and read back by ``commit_metadata``.

Secrets never reach the log: metadata keys containing ``password``, ``token``, ``secret``
or ``key`` (case-insensitive, anywhere in the key, so ``api_key`` and ``keyring`` alike)
are dropped with a warning naming the key, never the value.

Concurrency: writers in several processes may append to, or replace different
partitions of, the same table at once, including the very first write that creates it.
A commit that loses a race (``CommitFailedError``) is re-run from scratch, a bounded
number of times. The resource holds only the root path, never an open ``DeltaTable``
(tables are opened per call), and pickles into spawned processes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

import dagster as dg
import polars as pl
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, SchemaMismatchError
from deltalake.exceptions import TableNotFoundError as _DeltaTableNotFound
from pydantic import Field

from resources.state import delta_location, is_uri, resolve_inside

logger = logging.getLogger(__name__)

S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ALLOW_HTTP",
)
METADATA_PREFIX = "dataworth."
WRITE_ID_KEY = "dataworth_write_id"  # unique per write; finds our commit among concurrent ones
SECRET_KEY_WORDS = ("password", "token", "secret", "key")
MAX_WRITE_ATTEMPTS = 8
RETRY_BASE_DELAY_S = 0.05
RETRY_MAX_DELAY_S = 2.0
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class DeltaStoreError(Exception):
    """Base class of the errors DeltaStore raises on purpose."""


class TableNotFoundError(DeltaStoreError, LookupError):
    """The Delta table has never been written."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path
        super().__init__(
            f"Delta table {name!r} does not exist at {path}. Materialize the asset that writes it "
            f"first, or check that DATAWORTH_HOME points at the right state folder."
        )


class TableVersionMissing(DeltaStoreError, LookupError):
    """The requested version was never committed, or its files were vacuumed."""

    def __init__(self, name: str, version: int, latest: int | None, reason: str):
        self.name, self.version, self.latest = name, version, latest
        super().__init__(
            f"version {version} of Delta table {name!r} cannot be read: {reason}. "
            f"The latest version is {latest}; read that one (version=None), or re-materialize "
            f"the asset at the code/data of version {version} if you need it back."
        )


class TableDataMissing(DeltaStoreError, FileNotFoundError):
    """A data file of the latest version is gone: deleted behind our back."""

    def __init__(self, name: str, path: str, error: Exception | str, version: int | None = None):
        self.name, self.path, self.version = name, path, version
        at = f" (version {version})" if version is not None else ""
        super().__init__(
            f"Delta table {name!r} at {path}{at} lists a data file that is gone ({error}); it was deleted outside "
            f"dataworth. Re-materialize the asset {name!r} (its affected partitions) to write the rows again, or "
            f"bring the file back from a backup; to go back to an older version whose files are all there, "
            f"restore it with Delta time travel (deltalake: DeltaTable({path!r}).restore(<version>))."
        )


class TableLogCorrupt(DeltaStoreError, RuntimeError):
    """A commit file of the table's log cannot be parsed (truncated by a crash or a full disk?)."""

    def __init__(self, name: str, path: str, commit_file: str, error: Exception):
        self.name, self.path, self.commit_file = name, path, commit_file
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        super().__init__(
            f"Delta table {name!r} at {path} cannot be read: its commit file {commit_file} is damaged ({detail}); "
            f"a crash or a full disk may have cut it short. If it is the last commit, move it out of _delta_log "
            f"(the table then reads as the version before it, and nothing committed is lost but that write), then "
            f"re-materialize the asset {name!r}; otherwise restore _delta_log from a backup."
        )


def damaged_commit_file(path: str) -> str:
    """The commit file of the table at `path` that does not parse (the newest one when all parse)."""
    log = Path(path) / "_delta_log"
    commits = sorted((p for p in log.glob("*.json") if p.stem.isdigit()), key=lambda p: int(p.stem), reverse=True)
    for commit in commits:
        try:
            for line in commit.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    json.loads(line)
        except (ValueError, OSError):
            return str(commit)
    checkpoint = log / "_last_checkpoint"
    if checkpoint.exists():
        return f"{checkpoint} or the checkpoint it names"
    return str(commits[0]) if commits else str(log)


def local_path(uri: str) -> str:
    """A local file path for a Delta file URI (``file:///...`` or a plain path)."""
    return unquote(urlparse(uri).path) if uri.startswith("file:") else uri


class TableSchemaMismatch(DeltaStoreError, ValueError):
    """A frame's columns or types do not fit the existing table."""


class WriteConflictError(DeltaStoreError, RuntimeError):
    """Concurrent writers kept winning the commit race; the write was given up."""


def clean_commit_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Return ``metadata`` without secret-looking keys (see module docstring).

    Keys and values must be strings (encode structured values with ``json.dumps``);
    anything else raises ``TypeError`` naming the key.
    """
    cleaned = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"commit metadata {key!r} must map str to str, got {type(value).__name__}; "
                f"encode structured values with json.dumps"
            )
        if any(word in key.lower() for word in SECRET_KEY_WORDS):
            logger.warning("dropped commit metadata key %r: it looks like a secret", key)
            continue
        cleaned[key] = value
    return cleaned


def run_metadata(run_id: str, code_version: str, upstream_versions: dict[str, int | None]) -> dict[str, str]:
    """The commit metadata every asset write carries: run id, code version, upstream versions (JSON)."""
    return {
        "dagster_run_id": run_id,
        "code_version": code_version,
        "upstream_versions": json.dumps(upstream_versions, sort_keys=True),
    }


def _matches(where: Mapping[str, str | Sequence[str]]) -> pl.Expr:
    """Rows whose every column equals its value (a string) or is one of its values (a sequence)."""
    conditions = []
    for column, value in where.items():
        if isinstance(value, str):
            conditions.append(pl.col(column) == value)
        else:
            conditions.append(pl.col(column).is_in(list(value)))
    return pl.all_horizontal(conditions)


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _replace_predicate(df: pl.DataFrame, replace_where: dict[str, str]) -> str:
    """SQL predicate selecting the replaced rows; every row of ``df`` must match it."""
    if not replace_where:
        raise ValueError("replace_where must name at least one column")
    missing = [column for column in replace_where if column not in df.columns]
    if missing:
        raise ValueError(f"replace_where columns {missing} are not columns of the frame {df.columns}")
    matches = pl.all_horizontal(pl.col(c).cast(pl.String) == v for c, v in replace_where.items())
    outside = df.filter(~matches).height
    if outside:
        raise ValueError(
            f"{outside} of {df.height} rows do not match replace_where={replace_where}; "
            f"write each partition with its own call"
        )
    return " AND ".join(f'"{column}" = {_sql_literal(value)}' for column, value in replace_where.items())


def _write_once(path: str, df: pl.DataFrame, options: dict, write_id: str, storage: dict[str, str]) -> int:
    """One write attempt; returns the version it committed (others may have committed since)."""
    if DeltaTable.is_deltatable(path, storage_options=storage):
        try:
            table = DeltaTable(path, storage_options=storage)
        except DeltaError as error:
            raise TableLogCorrupt(Path(path).name, path, damaged_commit_file(path), error) from None
        write_deltalake(table, df, **options)
        return table.version()
    write_deltalake(path, df, storage_options=storage, **options)  # creates it, unless a concurrent writer just did
    for commit in DeltaTable(path, storage_options=storage).history():
        if commit.get(WRITE_ID_KEY) == write_id:
            return int(commit["version"])
    raise AssertionError(f"the commit {write_id} just written to {path} is missing from its history")


class DeltaStore(dg.ConfigurableResource):
    """Reads and writes the project's Delta tables under ``root``."""

    root: str = Field(default="", description="Folder of the Delta tables; empty means <DATAWORTH_HOME>/delta.")

    def __reduce__(self):  # Dagster resources do not unpickle by default; workers get a fresh one
        return functools.partial(DeltaStore, root=self.root), ()

    def _root(self) -> Path | str:
        """The local folder of the tables, or an object-store URI (``s3://bucket/prefix``) kept as text."""
        root = self.root or delta_location()
        return root.rstrip("/") if is_uri(root) else Path(root).expanduser().resolve()

    def storage_options(self) -> dict[str, str]:
        """deltalake's storage options: none locally; on S3 the AWS_* variables of this process and
        conditional put, so concurrent writers are safe without the unsafe-rename escape hatch."""
        if not isinstance(self._root(), str):
            return {}
        return {**{k: os.environ[k] for k in S3_ENV if os.environ.get(k)}, "conditional_put": "etag"}

    def table_path(self, name: str) -> str:
        """Path (or URI) of table ``name`` (a plain name: letters, digits, ``_ . -``)."""
        if not _TABLE_NAME.match(name):
            raise ValueError(f"table name {name!r} must be a plain name (letters, digits, '_', '.', '-')")
        root = self._root()
        return f"{root}/{name}" if isinstance(root, str) else str(resolve_inside(root, name))

    def exists(self, name: str) -> bool:
        """Whether table ``name`` has at least one commit."""
        return DeltaTable.is_deltatable(self.table_path(name), storage_options=self.storage_options())

    def version(self, name: str) -> int | None:
        """Latest committed version of table ``name``, or None if it does not exist."""
        try:
            return self._latest(name).version()
        except TableNotFoundError:
            return None

    def _latest(self, name: str) -> DeltaTable:
        """The latest version of the table; TableNotFoundError, or TableLogCorrupt naming the damaged commit."""
        path = self.table_path(name)
        try:
            return DeltaTable(path, storage_options=self.storage_options())
        except _DeltaTableNotFound:
            raise TableNotFoundError(name, path) from None
        except DeltaError as error:  # a commit file that does not parse: a Rust backtrace otherwise
            raise TableLogCorrupt(name, path, damaged_commit_file(path), error) from None

    def missing_files(self, name: str, version: int | None = None) -> list[str]:
        """Data files that ``version`` (latest when None) of table ``name`` lists but that are gone."""
        table = self._open(name, version)
        if isinstance(self._root(), str):  # object stores: a missing file surfaces when it is read
            return []
        return [uri for uri in table.file_uris() if not os.path.exists(local_path(uri))]

    def _open(self, name: str, version: int | None = None) -> DeltaTable:
        """The table at ``version`` (latest when None), or a named error saying what to do."""
        path = self.table_path(name)
        table = self._latest(name)
        latest = table.version()
        if version is None or version == latest:
            return table
        if not 0 <= version < latest:
            raise TableVersionMissing(name, version, latest, "it was never committed")
        try:
            return DeltaTable(path, version=version, storage_options=self.storage_options())
        except DeltaError as error:  # the log files of old versions were cleaned up
            raise TableVersionMissing(name, version, latest, f"its log was cleaned up ({error})") from error

    def read(
        self,
        name: str,
        version: int | None = None,
        columns: list[str] | None = None,
        where: Mapping[str, str | Sequence[str]] | None = None,
    ) -> pl.DataFrame:
        """Rows of table ``name`` at ``version`` (latest when None).

        ``columns`` selects columns; ``where`` keeps the rows whose every named column equals the
        given string, or is one of the given strings (``{"shard_id": shards, "kind": "top_document"}``),
        pushed down to the scan. Values are data, never parsed as SQL.
        """
        table = self._open(name, version)
        frame = pl.scan_delta(table, storage_options=self.storage_options() or None)
        if where:
            frame = frame.filter(_matches(where))
        if columns is not None:
            frame = frame.select(columns)
        try:
            return frame.collect()
        except FileNotFoundError as error:
            if table.version() == self.version(name):
                raise TableDataMissing(name, table.table_uri, error, table.version()) from error
            raise TableVersionMissing(
                name, table.version(), self.version(name), f"its data files were vacuumed ({error})"
            ) from error

    def write(
        self,
        name: str,
        df: pl.DataFrame,
        *,
        mode: Literal["append", "overwrite"] = "append",
        partition_by: list[str] | None = None,
        replace_where: dict[str, str] | None = None,
        add_columns: bool = False,
        metadata: dict[str, str],
    ) -> int:
        """Commit ``df`` to table ``name`` (created if missing); returns the new version.

        - ``mode="append"`` adds the rows.
        - ``mode="overwrite"`` with ``replace_where={"shard_id": "s-0003"}`` atomically
          replaces exactly the rows matching every ``column = value`` pair (all rows of
          ``df`` must match); re-running it leaves one copy, other rows are untouched.
        - ``mode="overwrite"`` without ``replace_where`` replaces the whole table, schema
          included; it is then partitioned by ``partition_by`` (unpartitioned when None).

        Otherwise ``partition_by`` applies when the table is created; later writes must
        name the same columns or None. ``add_columns=True`` lets ``df`` bring columns the table
        lacks (older rows read them as null); otherwise the frame must fit the table's schema.
        ``metadata`` is the commit metadata (see ``run_metadata``); secret-looking keys are dropped.
        """
        if mode not in ("append", "overwrite"):
            raise ValueError(f"mode must be 'append' or 'overwrite', got {mode!r}")
        if replace_where is not None and mode != "overwrite":
            raise ValueError("replace_where replaces rows, so it needs mode='overwrite'")
        predicate = _replace_predicate(df, replace_where) if replace_where is not None else None
        custom = {METADATA_PREFIX + k: v for k, v in clean_commit_metadata(metadata).items()}
        path = self.table_path(name)
        write_id = uuid.uuid4().hex
        whole_table = mode == "overwrite" and predicate is None
        options = {
            "mode": mode,
            "partition_by": (partition_by or []) if whole_table else partition_by,
            "predicate": predicate,
            "schema_mode": "overwrite" if whole_table else "merge" if add_columns else None,
            "commit_properties": CommitProperties(custom_metadata={**custom, WRITE_ID_KEY: write_id}),
        }
        attempt = 0
        while True:
            attempt += 1
            try:
                return _write_once(path, df, options, write_id, self.storage_options())
            except CommitFailedError as error:
                if attempt >= MAX_WRITE_ATTEMPTS:
                    raise WriteConflictError(
                        f"gave up writing Delta table {name!r} after {attempt} commit conflicts "
                        f"with concurrent writers (last: {error}); retry the run"
                    ) from error
                logger.info("commit conflict on Delta table %r (attempt %d), retrying: %s", name, attempt, error)
                delay = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2**attempt)
                time.sleep(delay * (0.5 + random.random()))
            except SchemaMismatchError as error:
                raise TableSchemaMismatch(
                    f"the frame does not fit Delta table {name!r} at {path}: {error}. Frame schema: "
                    f"{dict(df.schema)}. Fix the writer, or overwrite the whole table deliberately."
                ) from error

    def replace(self, name: str, df: pl.DataFrame, where: dict[str, str], *, metadata: dict[str, str]) -> int:
        """Atomically replace the rows matching ``where`` (every row of ``df`` must match it) by ``df``."""
        return self.write(name, df, mode="overwrite", replace_where=where, metadata=metadata)

    def replace_shard(
        self, name: str, shard_id: str, df: pl.DataFrame, *, add_columns: bool = False, metadata: dict[str, str]
    ) -> int:
        """Atomically replace shard ``shard_id`` of a table partitioned by ``shard_id`` (see ``write``)."""
        return self.write(
            name,
            df,
            mode="overwrite",
            partition_by=["shard_id"],
            replace_where={"shard_id": shard_id},
            add_columns=add_columns,
            metadata=metadata,
        )

    def commit_metadata(self, name: str, version: int) -> dict[str, str]:
        """The caller's commit metadata of ``version`` of table ``name``, prefix removed."""
        table = self._open(name)
        latest = table.version()
        if not 0 <= version <= latest:
            raise TableVersionMissing(name, version, latest, "it was never committed")
        for commit in table.history():
            if int(commit["version"]) == version:
                return {k.removeprefix(METADATA_PREFIX): v for k, v in commit.items() if k.startswith(METADATA_PREFIX)}
        raise TableVersionMissing(name, version, latest, "its commit log entry was cleaned up")
