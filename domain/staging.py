"""Planning ingestion batches: a landing file becomes a staged, immutable batch split into shards.

A landing file is validated whole. If any document is bad, the file is quarantined with every reason
and nothing of it is ingested. Otherwise its new documents (content not already in the corpus) are
written to `$DATAWORTH_HOME/batches/<batch_id>.parquet` with a shard id each (documents sorted by
doc_id, `docs_per_shard` per shard), the original bytes are kept beside it, and the landing file is
removed. The shard ids become Dagster partitions; `training_corpus` copies a staged shard into Delta.
A file whose bytes were already staged (same batch id) changes nothing; it is moved to
`landing/_already_ingested` with a note naming its batch. So is a file whose every text is already in the
corpus (the first provider to deliver a text is credited with it): the note names, per document, the doc_id
and provider that hold the text. Repeated texts in a file that also brings new ones are named in
`batches/<batch_id>.duplicates.txt` and in the plan's notes.

A file is taken only once it is complete: unchanged (size and modification time) for `settle_seconds`,
judged by its modification time or by an earlier look recorded in `$DATAWORTH_HOME/landing_seen.json`
(which also covers a writer whose clock runs ahead). Until then it waits in the landing folder. Entries
that are never taken (subfolders, names starting with `_`) are listed in the plan with what to do;
symbolic links are quarantined without being followed; dot files are in progress and left alone.
"""

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from domain.settings import Settings, checked_landing_dir
from resources.state import PROJECT_ROOT, dataworth_home, landing_dir

EMBEDDED_CORPUS = PROJECT_ROOT / "data" / "embedded_corpus"
STAGED_COLUMNS = (*CORPUS_COLUMNS, "shard_id")
MAX_REASONS = 20  # rejected documents listed in a quarantine note
OUR_FOLDERS = ("_rejected", "_already_ingested")


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
    already_ingested: dict[str, str]  # landing file name -> note (its bytes or every text of it were staged before)
    notes: dict[str, str] = field(default_factory=dict)  # staged file name -> note on texts already in the corpus
    waiting: dict[str, str] = field(default_factory=dict)  # file name -> why it is not taken yet (still written?)
    skipped: dict[str, str] = field(default_factory=dict)  # entry never taken (subfolder, `_name`) -> what to do

    @property
    def shard_ids(self) -> list[str]:
        return [s for b in self.batches for s in b.shard_ids]

    def report(self) -> list[str]:
        """One line per landing entry this pass did not simply stage, for logs, sensor ticks and the CLI."""
        lines = [f"quarantined {name} (see _rejected/): {reason}" for name, reason in self.quarantined.items()]
        lines += [f"already ingested, moved to _already_ingested/: {n}: {r}" for n, r in self.already_ingested.items()]
        lines += [f"staged {name}, but: {note}" for name, note in self.notes.items()]
        lines += [f"waiting for {name}: {why}" for name, why in self.waiting.items()]
        lines += [f"left alone {name}: {why}" for name, why in self.skipped.items()]
        return lines


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
    """doc_id, provider_id and content_sha256 of every staged document (the corpus, planned or materialized),
    in staging order (oldest batch first), so the first holder of a text comes first."""
    files = sorted(staged_dir().glob("*.parquet"), key=lambda f: (f.stat().st_mtime_ns, f.name))
    if not files:
        return pl.DataFrame(schema={"doc_id": pl.String, "provider_id": pl.String, "content_sha256": pl.String})
    return pl.concat([pl.read_parquet(f, columns=["doc_id", "provider_id", "content_sha256"]) for f in files])


def shard_groups(shards: list[str], parts: int) -> list[list[str]]:
    """`parts` contiguous groups of the sorted shards, for that many workers: sizes differ by at most one,
    and trailing groups are empty when there are fewer shards than parts."""
    ordered = sorted(shards)
    size, extra = divmod(len(ordered), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [ordered[bounds[i] : bounds[i + 1]] for i in range(parts)]


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


def _duplicates_note(report) -> str:
    """Who is credited with each text of the file that the corpus already holds, and why."""
    lines = [
        f"{len(report.duplicates)} document(s) hold a text already in the corpus; the first provider to deliver "
        "a text is credited with it, so these add nothing (send new texts, or ask for the credit to be moved):"
    ]
    for doc_id, provider, held_doc, held_provider in report.duplicates[:MAX_REASONS]:
        lines.append(
            f"- doc_id={doc_id!r} provider_id={provider!r}: its text is already in the corpus as doc_id "
            f"{held_doc!r} of provider {held_provider!r}"
        )
    if len(report.duplicates) > MAX_REASONS:
        lines.append(f"- ... and {len(report.duplicates) - MAX_REASONS} more")
    return "\n".join(lines)


def _stage(path: Path, rows: pl.DataFrame, batch_id: str, note: str | None = None) -> None:
    """Write the staged parquet atomically, keep the original bytes (and the note on repeated texts), then
    remove the landing file."""
    target = staged_dir() / f"{batch_id}.parquet"
    tmp = target.with_suffix(".parquet.tmp")
    rows.select(STAGED_COLUMNS).write_parquet(tmp)
    shutil.copy2(path, staged_dir() / f"{batch_id}.source{path.suffix}")
    if note:
        (staged_dir() / f"{batch_id}.duplicates.txt").write_text(note + "\n", encoding="utf-8")
    os.replace(tmp, target)
    path.unlink()


SEEN_FILE = "landing_seen.json"


class Settling:
    """Which landing files are complete: unchanged (size, mtime) for `settle_seconds`, by their mtime or by
    an earlier look recorded in `$DATAWORTH_HOME/landing_seen.json`."""

    def __init__(self, settle_seconds: float, clock: Callable[[], float]):
        self.settle, self.clock = settle_seconds, clock
        self.path = dataworth_home() / SEEN_FILE
        try:
            self.seen = json.loads(self.path.read_text()) if settle_seconds > 0 and self.path.exists() else {}
        except (OSError, ValueError):
            self.seen = {}  # a torn write of this cache only costs one more look
        self.now = clock()
        self.looked: dict[str, list] = {}

    def why_waiting(self, path: Path) -> str | None:
        if self.settle <= 0:
            return None
        stat = path.stat()
        key, state = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        earlier = self.seen.get(key)
        first_seen = earlier[2] if earlier and earlier[:2] == state else self.now
        age = max(self.now - stat.st_mtime_ns / 1e9, self.now - first_seen)  # by its mtime, or by our looks
        if age >= self.settle:
            return None
        self.looked[key] = [*state, first_seen]
        return (
            f"changed {max(age, 0):.0f} s ago (size {stat.st_size} bytes); a landing file is taken once unchanged "
            f"for {self.settle:g} s ([corpus] settle_seconds). Still writing it? Write it as .{path.name} and "
            "rename it when complete"
        )

    def save(self) -> None:
        if self.settle <= 0 or self.looked == self.seen:
            return
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.looked, sort_keys=True))
        os.replace(tmp, self.path)


def _skip_reason(path: Path) -> str | None:
    """Why a landing entry that is no regular file (or is named `_...`) is not read, or None to read it."""
    if path.name.startswith("."):
        return None
    if path.is_dir() and not path.is_symlink():
        if path.name in OUR_FOLDERS:
            return None
        return (
            "is a subfolder; only files directly in the landing folder are read: move its files into "
            f"{path.parent} itself"
        )
    if path.name.startswith("_"):
        return "names starting with a leading '_' are reserved and never read; rename it without the '_' to send it"
    if not (path.is_file() or path.is_symlink()):
        return "is not a regular file (a device, socket or pipe); send a .jsonl or .parquet file"
    return None


def _entries(landing: Path) -> list[Path]:
    return sorted(landing.iterdir(), key=lambda p: p.name)


def plan_landing(
    landing: Path,
    docs_per_shard: int,
    now: datetime | None = None,
    settle_seconds: float = 0,
    clock: Callable[[], float] = time.time,
) -> Plan:
    """Stage every complete landing file (sorted by name); move bad ones to `landing/_rejected` and repeated
    ones to `landing/_already_ingested`, each with a reason; list the files still settling and the entries
    that are never read."""
    now = now or datetime.now(UTC)
    rejected_dir = landing / "_rejected"
    plan = Plan([], {}, {})
    settling = Settling(settle_seconds, clock)
    known = staged_corpus()
    for path in _entries(landing):
        if path.name.startswith(".") or (path.is_dir() and not path.is_symlink() and path.name in OUR_FOLDERS):
            continue
        if skip := _skip_reason(path):
            plan.skipped[path.name + ("/" if path.is_dir() else "")] = skip
            continue
        if path.is_symlink():  # it could make us read a file outside the landing folder
            target = os.readlink(path)
            gone = "" if path.exists() else " (which does not exist)"
            reason = f"is a symbolic link to {target}{gone}; copy the file itself into the landing folder"
        elif path.suffix not in LANDING_SUFFIXES:
            reason = f"unknown format {path.suffix!r}; send JSON Lines (.jsonl) or Parquet (.parquet)"
        else:
            reason = None
        if reason:
            quarantine(path, reason, rejected_dir)
            plan.quarantined[path.name] = reason
            continue
        if waiting := settling.why_waiting(path):
            plan.waiting[path.name] = waiting
            continue
        batch_id = batch_id_for(path)
        if (staged_dir() / f"{batch_id}.parquet").exists():  # set aside, so later ticks do not hash it again
            note = f"its bytes were already ingested as batch {batch_id}; nothing to do"
            quarantine(path, note, landing / "_already_ingested")
            plan.already_ingested[path.name] = note
            continue
        try:
            raw = read_landing_file(path)
            accepted, invalid = validate_documents(raw, ingested_at=now, batch_id=batch_id)
            rows, report = merge_into_corpus(known, accepted, validation_rejected=invalid)
        except LandingFileError as error:
            quarantine(path, str(error), rejected_dir)
            plan.quarantined[path.name] = str(error)
            continue
        except (ValueError, UnicodeError, pl.exceptions.PolarsError) as error:  # one poison file stops no other
            reason = f"cannot be read ({type(error).__name__}: {error}); re-export it as UTF-8 JSON Lines or Parquet"
            quarantine(path, reason, rejected_dir)
            plan.quarantined[path.name] = reason
            continue
        if report.rejected.height:
            note = _rejection_note(report)
            quarantine(path, note, rejected_dir)
            plan.quarantined[path.name] = note
            continue
        if rows.height == 0:  # every text is already in the corpus: say who holds each
            note = "nothing of this file was ingested: " + _duplicates_note(report)
            quarantine(path, note, landing / "_already_ingested")
            plan.already_ingested[path.name] = note
            continue
        note = _duplicates_note(report) if report.duplicates else None
        rows = assign_shards(rows, batch_id, docs_per_shard)
        _stage(path, rows, batch_id, note)
        if note:
            plan.notes[path.name] = note
        known = pl.concat([known, rows.select("doc_id", "provider_id", "content_sha256")])
        shard_ids = rows["shard_id"].unique(maintain_order=True).to_list()
        plan.batches.append(PlannedBatch(batch_id, path.name, shard_ids, rows.height, report.skipped_duplicates))
    settling.save()
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
    """The landing folder: `[corpus] landing_dir`, else `$DATAWORTH_HOME/landing`; refused when it is a
    folder of ours (see `checked_landing_dir`)."""
    if not settings.corpus.landing_dir:
        return landing_dir()
    folder = checked_landing_dir(settings.corpus.landing_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stage_landing(settings: Settings, known_shards: set[str], wait: bool = False) -> Staged:
    """Seed the embedded corpus if configured and nothing was staged, stage every complete landing file, and
    list the staged shards not in `known_shards`: the plan's, then any that a crash left staged.

    `wait` (the CLI): when files are still settling, look again once they could be complete."""
    folder = landing_folder(settings)
    seeded = seed_embedded_corpus(folder) if settings.corpus.seed_embedded_corpus else []
    c = settings.corpus
    plan = plan_landing(folder, c.docs_per_shard, settle_seconds=c.settle_seconds)
    if wait and plan.waiting:
        time.sleep(c.settle_seconds + 0.1)
        later = plan_landing(folder, c.docs_per_shard, settle_seconds=c.settle_seconds)
        plan = Plan(
            plan.batches + later.batches,
            plan.quarantined | later.quarantined,
            plan.already_ingested | later.already_ingested,
            plan.notes | later.notes,
            later.waiting,
            later.skipped,
        )
    staged = [
        s
        for f in sorted(staged_dir().glob("*.parquet"))
        for s in pl.read_parquet(f, columns=["shard_id"])["shard_id"].unique(maintain_order=True)
    ]
    new = [s for s in dict.fromkeys([*plan.shard_ids, *staged]) if s not in known_shards]
    return Staged(folder, plan, seeded, new)
