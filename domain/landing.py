"""Corpus ingestion: landing files -> validated, de-duplicated ``training_corpus`` rows.

Pure functions over polars frames, no Dagster. The flow for one landing file is
``read_landing_file`` -> ``validate_documents`` -> ``merge_into_corpus``; a file that
cannot be read at all is moved aside with ``quarantine``.

Decisions: ``doc_id`` is unique across the whole corpus (not per provider); text is
stored exactly as given (no stripping or normalisation), so ``content_sha256`` is the
SHA-256 of the text's UTF-8 bytes as delivered.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

REQUIRED_COLUMNS = ("provider_id", "doc_id", "text", "license")
OPTIONAL_COLUMNS = ("source_uri",)
LANDING_COLUMNS = ("provider_id", "doc_id", "text", "source_uri", "license")
CORPUS_COLUMNS = ("provider_id", "doc_id", "text", "source_uri", "license", "content_sha256", "ingested_at", "batch_id")
LANDING_SUFFIXES = (".jsonl", ".parquet")
_HASH_CHUNK_BYTES = 1 << 20
COMPRESSED = {  # leading bytes of compressed files sent under a plain name, and how to unpack them
    b"\x1f\x8b": ("gzip-compressed", "gunzip"),
    b"BZh": ("bzip2-compressed", "bunzip2"),
    b"\xfd7zXZ\x00": ("xz-compressed", "unxz"),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", "unzstd"),
    b"PK\x03\x04": ("a zip archive", "unzip"),
}


class LandingFileError(ValueError):
    """A landing file cannot be ingested at all; the message names the file, the problem and the fix."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"landing file {self.path}: {reason}")


@dataclass
class MergeReport:
    """Outcome of merging one batch into the corpus.

    ``rejected`` has the landing columns plus ``reason``; ``providers_fully_rejected``
    names providers that sent documents of which none was accepted for a rejection
    (providers whose documents were all duplicates are not listed). ``duplicates`` says, per
    skipped document, who holds its text: ``(doc_id, provider_id, held_by_doc_id, held_by_provider)``
    (the holder's provider is None when the corpus given did not carry provider_id).
    """

    appended: int
    skipped_duplicates: int
    rejected: pl.DataFrame
    providers_fully_rejected: list[str]
    duplicates: list[tuple[str, str, str, str | None]] = field(default_factory=list)


def batch_id_for(path: str | Path) -> str:
    """``"b-"`` + the first 16 hex chars of the SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return "b-" + digest.hexdigest()[:16]


def _check_columns(path: Path, columns: list[str], where: str) -> None:
    unknown = sorted(set(columns) - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    allowed = f"required {list(REQUIRED_COLUMNS)}, optional {list(OPTIONAL_COLUMNS)}"
    if missing:
        raise LandingFileError(path, f"{where} lacks required field(s) {missing}; every document needs {allowed}")
    if unknown:
        raise LandingFileError(path, f"{where} has unknown field(s) {unknown}; remove them (allowed: {allowed})")


def _lone_surrogate(value: str) -> str | None:
    """The first lone surrogate of a string (a JSON escape like \\ud800 that is no character), as \\uXXXX."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"\\u{ord(value[error.start]):04x}"
    return None


def _read_jsonl(path: Path) -> pl.DataFrame:
    raw = path.read_bytes()
    for magic, (kind, tool) in COMPRESSED.items():
        if raw.startswith(magic):
            raise LandingFileError(
                path,
                f"is {kind} (its first bytes say so), not plain JSON Lines; unpack it ({tool}) and drop the "
                f"resulting .jsonl file",
            )
    try:
        content = raw.decode("utf-8-sig")  # tolerates a byte-order mark
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise LandingFileError(
            path, f"line {line} is not valid UTF-8 (byte {error.start}); re-export the file as UTF-8"
        ) from None
    rows = []
    for number, line in enumerate(content.split("\n"), start=1):  # not splitlines: text may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise LandingFileError(
                path, f"line {number} is not valid JSON ({error.msg}); write one complete JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise LandingFileError(
                path, f"line {number} is a JSON {type(row).__name__}, not an object; write one object per line"
            )
        _check_columns(path, list(row), f"line {number}")
        for key, value in row.items():
            if value is not None and not isinstance(value, str):
                raise LandingFileError(
                    path, f"line {number}: field {key!r} is a {type(value).__name__}; every field must be a string"
                )
            if value is not None and (surrogate := _lone_surrogate(value)):
                raise LandingFileError(
                    path,
                    f"line {number}: field {key!r} holds an escaped lone surrogate ({surrogate}), half of a UTF-16 "
                    "pair and no Unicode character; re-export the file from the original text (as UTF-8)",
                )
        rows.append(row)
    return pl.DataFrame(rows, schema={c: pl.String for c in LANDING_COLUMNS if any(c in r for r in rows)})


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as error:  # corrupt file, invalid UTF-8 strings
        raise LandingFileError(
            path, f"cannot be read as Parquet ({error}); re-export it as valid UTF-8 Parquet"
        ) from None
    _check_columns(path, frame.columns, "the file")
    for name, dtype in frame.schema.items():
        if dtype == pl.Null:
            frame = frame.with_columns(pl.col(name).cast(pl.String))
        elif dtype != pl.String:
            raise LandingFileError(path, f"column {name!r} has type {dtype}; every column must be a string column")
    return frame


def read_landing_file(path: str | Path) -> pl.DataFrame:
    """Read a ``.jsonl`` or ``.parquet`` landing file into string columns ``LANDING_COLUMNS``.

    Required fields: provider_id, doc_id, text, license; optional: source_uri, which
    defaults to ``landing:<file name>`` when absent, null or empty. Values may be null
    (``validate_documents`` rejects such rows); anything structurally wrong raises
    ``LandingFileError``.
    """
    path = Path(path)
    if path.suffix not in LANDING_SUFFIXES:
        raise LandingFileError(
            path, f"unknown extension {path.suffix!r}; landing files must be one of {LANDING_SUFFIXES}"
        )
    frame = _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path)
    if frame.height == 0:
        raise LandingFileError(path, "contains no documents; remove the empty file")
    default_uri = pl.lit(f"landing:{path.name}")
    if "source_uri" not in frame.columns:
        frame = frame.with_columns(source_uri=default_uri)
    uri = pl.col("source_uri")
    return frame.with_columns(source_uri=pl.when(uri.is_null() | (uri == "")).then(default_uri).otherwise(uri)).select(
        LANDING_COLUMNS
    )


def content_sha256(text: pl.Expr) -> pl.Expr:
    """Hex SHA-256 (64 chars) of the UTF-8 bytes of each string."""
    return text.map_elements(lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest(), return_dtype=pl.String)


def validate_documents(df: pl.DataFrame, *, ingested_at: datetime, batch_id: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split landing rows into (accepted, rejected).

    Rejected: text null/empty/whitespace-only, provider_id, doc_id or license null or
    empty. ``rejected`` keeps the landing columns plus ``reason`` (all failures, ``"; "``
    separated). ``accepted`` has the ``training_corpus`` columns: content_sha256 added,
    ``ingested_at`` (tz-aware, stored as UTC microseconds) and ``batch_id`` (``b-`` + 16 hex).
    """
    if ingested_at.tzinfo is None:
        raise ValueError("ingested_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
    reasons = [
        (pl.col("text").is_null() | (pl.col("text").str.strip_chars() == ""), "text is empty or whitespace only"),
        *[
            (pl.col(c).is_null() | (pl.col(c).str.strip_chars() == ""), f"{c} is missing")
            for c in ("provider_id", "doc_id", "license")
        ],
    ]
    reason = pl.concat_str(
        [pl.when(failed).then(pl.lit(message)) for failed, message in reasons], separator="; ", ignore_nulls=True
    )
    checked = df.with_columns(reason=pl.when(pl.any_horizontal(f for f, _ in reasons)).then(reason))
    accepted = checked.filter(pl.col("reason").is_null()).with_columns(
        content_sha256=content_sha256(pl.col("text")),
        ingested_at=pl.lit(ingested_at.astimezone(UTC)).cast(pl.Datetime("us", "UTC")),
        batch_id=pl.lit(batch_id),
    )
    return accepted.select(CORPUS_COLUMNS), checked.filter(pl.col("reason").is_not_null())


def merge_into_corpus(
    existing_df: pl.DataFrame | None,
    new_df: pl.DataFrame,
    *,
    validation_rejected: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, MergeReport]:
    """Decide which validated rows to append to the corpus, in file order.

    A row whose content hash is already in the corpus (or earlier in the batch) is
    skipped and counted. A row whose doc_id already exists (in the corpus or earlier
    in the batch) with different text is rejected. ``validation_rejected`` (from
    ``validate_documents``) joins the report so a provider rejected there is named too.
    """
    seen_hashes: dict[str, tuple[str, str | None]] = {}  # content hash -> (doc_id, provider_id) credited with it
    seen_doc_ids: set[str] = set()
    if existing_df is not None:
        providers = (
            existing_df["provider_id"].to_list()
            if "provider_id" in existing_df.columns
            else [None] * existing_df.height
        )
        for held_doc, held_provider, held_digest in zip(
            existing_df["doc_id"].to_list(), providers, existing_df["content_sha256"].to_list()
        ):
            seen_hashes.setdefault(held_digest, (held_doc, held_provider))
        seen_doc_ids.update(existing_df["doc_id"].to_list())
    keep, rejected_reason, skipped, duplicates = [], [], 0, []
    for doc_id, provider, digest in new_df.select("doc_id", "provider_id", "content_sha256").iter_rows():
        if digest in seen_hashes:
            keep.append(False)
            rejected_reason.append(None)
            skipped += 1
            duplicates.append((doc_id, provider, *seen_hashes[digest]))
        elif doc_id in seen_doc_ids:
            keep.append(False)
            rejected_reason.append(
                f"doc_id {doc_id} already exists with different text; give the new version a new doc_id"
            )
        else:
            keep.append(True)
            rejected_reason.append(None)
            seen_hashes[digest] = (doc_id, provider)
            seen_doc_ids.add(doc_id)
    decided = new_df.with_columns(
        keep=pl.Series(keep, dtype=pl.Boolean), reason=pl.Series(rejected_reason, dtype=pl.String)
    )
    to_append = decided.filter("keep").select(CORPUS_COLUMNS)
    rejected = decided.filter(pl.col("reason").is_not_null()).select(*LANDING_COLUMNS, "reason")
    if validation_rejected is not None:
        rejected = pl.concat([validation_rejected.select(*LANDING_COLUMNS, "reason"), rejected])
    accepted_providers = set(decided.filter(pl.col("reason").is_null())["provider_id"].to_list())  # kept or duplicate
    fully_rejected = sorted(set(rejected["provider_id"].drop_nulls().to_list()) - accepted_providers)
    report = MergeReport(
        appended=to_append.height,
        skipped_duplicates=skipped,
        rejected=rejected,
        providers_fully_rejected=fully_rejected,
        duplicates=duplicates,
    )
    return to_append, report


def quarantine(path: str | Path, reason: str, rejected_dir: str | Path) -> Path:
    """Move ``path`` into ``rejected_dir`` and write ``<name>.reason.txt`` next to it.

    Nothing is deleted or overwritten: if the name is taken, ``<stem>.1<suffix>``,
    ``<stem>.2<suffix>``, ... is used. Returns the quarantined file's path.
    """
    path, rejected_dir = Path(path), Path(rejected_dir)
    if not (path.is_file() or path.is_symlink()):  # a symbolic link, even a broken one, is moved as a link
        raise FileNotFoundError(f"cannot quarantine {path}: it is not a file")
    rejected_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(0, 10_000):
        name = path.name if attempt == 0 else f"{path.stem}.{attempt}{path.suffix}"
        target = rejected_dir / name
        if target.exists():
            continue
        try:
            with open(rejected_dir / f"{name}.reason.txt", "x", encoding="utf-8") as note:  # claims the name
                note.write(reason.rstrip("\n") + "\n")
        except FileExistsError:
            continue
        shutil.move(path, target)
        return target
    raise FileExistsError(f"no free name for {path.name} in {rejected_dir}; clean up old quarantined files")
