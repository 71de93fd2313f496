"""Planning ingestion batches: a landing file becomes a staged, immutable batch split into shards.

A landing file is validated whole. If any document is bad, the file is quarantined with every reason
and nothing of it is ingested. Otherwise its new documents (content not already in the corpus) are
written to `$DATAWORTH_HOME/batches/<batch_id>.parquet` with a shard id each (documents sorted by
doc_id, `docs_per_shard` per shard), the original bytes are kept beside it, and the landing file is
removed. The shard ids become Dagster partitions; `training_corpus` copies a staged shard into Delta.
A file whose bytes were already staged (same batch id) changes nothing; it is moved to
`landing/_already_ingested` with a note naming its batch.
"""

import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from domain.landing import (
    CORPUS_COLUMNS,
    LANDING_SUFFIXES,
    LandingFileError,
    batch_id_for,
    merge_into_corpus,
    quarantine,
    read_landing_file,
    validate_documents,
)
from domain.settings import Settings, configured_path
from resources.state import PROJECT_ROOT, dataworth_home, landing_dir

EMBEDDED_CORPUS = PROJECT_ROOT / "data" / "embedded_corpus"
STAGED_COLUMNS = (*CORPUS_COLUMNS, "shard_id")
MAX_REASONS = 20  # rejected documents listed in a quarantine note


@dataclass
class PlannedBatch:
    batch_id: str
    source: str  # landing file name
    shard_ids: list[str]
    documents: int
    skipped_duplicates: int


@dataclass
class Plan:
    batches: list[PlannedBatch]
    quarantined: dict[str, str]  # landing file name -> reason
    already_ingested: list[str]  # landing file names whose bytes were staged before

    @property
    def shard_ids(self) -> list[str]:
        return [s for b in self.batches for s in b.shard_ids]


def staged_dir() -> Path:
    folder = dataworth_home() / "batches"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def seed_embedded_corpus(landing: Path) -> list[str]:
    """Copy the shipped corpus into an empty landing folder when nothing was ever staged."""
    if any(landing.glob("*.*")) or any(staged_dir().glob("*.parquet")):
        return []
    for path in sorted(EMBEDDED_CORPUS.glob("*.jsonl")):
        shutil.copy2(path, landing / path.name)
    return sorted(p.name for p in EMBEDDED_CORPUS.glob("*.jsonl"))


def staged_corpus() -> pl.DataFrame:
    """doc_id and content_sha256 of every staged document (the corpus, planned or materialized)."""
    files = sorted(staged_dir().glob("*.parquet"))
    if not files:
        return pl.DataFrame(schema={"doc_id": pl.String, "content_sha256": pl.String})
    return pl.concat([pl.read_parquet(f, columns=["doc_id", "content_sha256"]) for f in files])


def assign_shards(rows: pl.DataFrame, batch_id: str, docs_per_shard: int) -> pl.DataFrame:
    """Sort by doc_id and give each run of `docs_per_shard` documents one shard id."""
    rows = rows.sort("doc_id")
    index = pl.int_range(pl.len()) // docs_per_shard
    return rows.with_columns(shard_id=pl.lit(batch_id + "-") + index.cast(pl.String).str.zfill(4))


def _rejection_note(report) -> str:
    lines = [
        f"{report.rejected.height} document(s) rejected; nothing of this file was ingested. "
        "Fix them and drop the file again:"
    ]
    for doc_id, provider, reason in (
        report.rejected.select("doc_id", "provider_id", "reason").head(MAX_REASONS).iter_rows()
    ):
        lines.append(f"- doc_id={doc_id!r} provider_id={provider!r}: {reason}")
    if report.providers_fully_rejected:
        lines.append(f"providers with every document rejected: {', '.join(report.providers_fully_rejected)}")
    return "\n".join(lines)


def _stage(path: Path, rows: pl.DataFrame, batch_id: str) -> None:
    """Write the staged parquet atomically, keep the original bytes, then remove the landing file."""
    target = staged_dir() / f"{batch_id}.parquet"
    tmp = target.with_suffix(".parquet.tmp")
    rows.select(STAGED_COLUMNS).write_parquet(tmp)
    shutil.copy2(path, staged_dir() / f"{batch_id}.source{path.suffix}")
    os.replace(tmp, target)
    path.unlink()


def plan_landing(landing: Path, docs_per_shard: int, now: datetime | None = None) -> Plan:
    """Stage every landing file (sorted by name); move bad ones to `landing/_rejected` and repeated
    ones to `landing/_already_ingested`, each with a reason."""
    now = now or datetime.now(UTC)
    rejected_dir = landing / "_rejected"
    plan = Plan([], {}, [])
    known = staged_corpus()
    for path in sorted(p for p in landing.iterdir() if p.is_file() and not p.name.startswith((".", "_"))):
        if path.is_symlink():  # it could make us read a file outside the landing folder
            reason = f"is a symbolic link to {os.readlink(path)}; copy the file itself into the landing folder"
        elif path.suffix not in LANDING_SUFFIXES:
            reason = f"unknown format {path.suffix!r}; send JSON Lines (.jsonl) or Parquet (.parquet)"
        else:
            reason = None
        if reason:
            quarantine(path, reason, rejected_dir)
            plan.quarantined[path.name] = reason
            continue
        batch_id = batch_id_for(path)
        if (staged_dir() / f"{batch_id}.parquet").exists():  # set aside, so later ticks do not hash it again
            quarantine(
                path,
                f"its bytes were already ingested as batch {batch_id}; nothing to do",
                landing / "_already_ingested",
            )
            plan.already_ingested.append(path.name)
            continue
        try:
            raw = read_landing_file(path)
        except LandingFileError as error:
            quarantine(path, str(error), rejected_dir)
            plan.quarantined[path.name] = str(error)
            continue
        accepted, invalid = validate_documents(raw, ingested_at=now, batch_id=batch_id)
        rows, report = merge_into_corpus(known, accepted, validation_rejected=invalid)
        if report.rejected.height:
            note = _rejection_note(report)
            quarantine(path, note, rejected_dir)
            plan.quarantined[path.name] = note
            continue
        rows = assign_shards(rows, batch_id, docs_per_shard)
        _stage(path, rows, batch_id)
        known = pl.concat([known, rows.select("doc_id", "content_sha256")])
        shard_ids = rows["shard_id"].unique(maintain_order=True).to_list()
        plan.batches.append(PlannedBatch(batch_id, path.name, shard_ids, rows.height, report.skipped_duplicates))
    return plan


def read_staged_shard(shard_id: str) -> pl.DataFrame:
    """The staged documents of one shard (training_corpus columns plus shard_id)."""
    batch_id = shard_id.rsplit("-", 1)[0]
    path = staged_dir() / f"{batch_id}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"shard {shard_id!r}: its staged batch {path} is missing; re-drop the batch's file")
    return pl.read_parquet(path).filter(pl.col("shard_id") == shard_id)


@dataclass
class Staged:
    """What one pass over the landing folder did."""

    folder: Path  # the landing folder
    plan: Plan
    seeded: list[str]  # embedded corpus files copied into an empty landing folder
    new_shards: list[str]  # staged shards that are no partition yet, in order


def landing_folder(settings: Settings) -> Path:
    """The landing folder: `[corpus] landing_dir`, else `$DATAWORTH_HOME/landing`."""
    if not settings.corpus.landing_dir:
        return landing_dir()
    folder = configured_path(settings.corpus.landing_dir, "[corpus] landing_dir")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stage_landing(settings: Settings, known_shards: set[str]) -> Staged:
    """Seed the embedded corpus if configured and nothing was staged, stage every landing file, and list
    the staged shards not in `known_shards`: the plan's, then any that a crash left staged."""
    folder = landing_folder(settings)
    seeded = seed_embedded_corpus(folder) if settings.corpus.seed_embedded_corpus else []
    plan = plan_landing(folder, settings.corpus.docs_per_shard)
    staged = [
        s
        for f in sorted(staged_dir().glob("*.parquet"))
        for s in pl.read_parquet(f, columns=["shard_id"])["shard_id"].unique(maintain_order=True)
    ]
    new = [s for s in dict.fromkeys([*plan.shard_ids, *staged]) if s not in known_shards]
    return Staged(folder, plan, seeded, new)
