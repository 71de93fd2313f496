"""Landing files an outside red team broke (issue 12): each is staged, waits, or is set aside with a note.

Planning runs on a temporary state folder, without the pipeline; the sensor test evaluates the real
`landing_sensor` on a tiny setup. Nothing may be lost: a file that is not staged stays in the landing
folder or moves aside with a note saying why and what to do.
"""

import gzip
import json
import os
import re
import time

import dagster as dg
import pytest

from domain.settings import Settings, UnsafePathError
from domain.staging import landing_folder, plan_landing, stage_landing, staged_dir
from resources.delta import DeltaStore
from resources.state import PROJECT_ROOT
from tests.pipeline_harness import make_tiny_setup
from tests.reliability_support import changed


def doc(doc_id: str, provider: str = "newco", text: str | None = None) -> dict:
    return {"provider_id": provider, "doc_id": doc_id, "text": text or f"a document about {doc_id}", "license": "MIT"}


def write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def landing(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DATAWORTH_SETTINGS", raising=False)
    folder = tmp_path / "home" / "landing"
    folder.mkdir(parents=True)
    return folder


def test_escaped_lone_surrogate_is_quarantined_and_later_files_are_staged(landing):
    line = '{"provider_id": "p", "doc_id": "s1", "text": "half an emoji \\ud800 here", "license": "MIT"}\n'
    (landing / "a-poison.jsonl").write_text(line, encoding="utf-8")
    write(landing / "b-good.jsonl", [doc("g1")])
    plan = plan_landing(landing, 3)
    assert [b.source for b in plan.batches] == ["b-good.jsonl"]  # the poison file stops nothing
    reason = plan.quarantined["a-poison.jsonl"]
    assert re.search(r"line 1: field 'text' holds an escaped lone surrogate \(\\ud800\).*re-export", reason), reason
    assert (landing / "_rejected" / "a-poison.jsonl").is_file()
    assert "lone surrogate" in (landing / "_rejected" / "a-poison.jsonl.reason.txt").read_text()


def test_text_already_in_the_corpus_under_another_provider_is_reported(landing):
    write(landing / "first.jsonl", [doc("a1", provider="alpha", text="shared text")])
    assert len(plan_landing(landing, 3).batches) == 1
    write(landing / "second.jsonl", [doc("b1", provider="beta", text="shared text")])
    plan = plan_landing(landing, 3)
    assert plan.batches == [] and not (landing / "second.jsonl").exists()
    note = plan.already_ingested["second.jsonl"]
    assert "doc_id='b1' provider_id='beta': its text is already in the corpus as doc_id 'a1' of provider 'alpha'" in (
        note
    )
    assert "credited" in note and "nothing of this file was ingested" in note
    moved = landing / "_already_ingested" / "second.jsonl"
    assert moved.is_file() and note.strip() in (landing / "_already_ingested" / "second.jsonl.reason.txt").read_text()

    # a file with one new and one repeated text: the new one is staged, the repeat named in the plan and beside it
    write(landing / "third.jsonl", [doc("c1", provider="gamma", text="shared text"), doc("c2", provider="gamma")])
    plan = plan_landing(landing, 3)
    (batch,) = plan.batches
    assert batch.documents == 1 and batch.skipped_duplicates == 1
    assert "doc_id='c1' provider_id='gamma'" in plan.notes["third.jsonl"] and "'alpha'" in plan.notes["third.jsonl"]
    assert "'alpha'" in (staged_dir() / f"{batch.batch_id}.duplicates.txt").read_text()


def test_file_still_being_written_waits_until_it_is_complete(landing):
    settings = changed(Settings(), corpus={"seed_embedded_corpus": False, "settle_seconds": 5})
    path = landing / "growing.jsonl"
    write(path, [doc("w1")])
    staged = stage_landing(settings, set())
    assert staged.new_shards == [] and "growing.jsonl" in staged.plan.waiting and path.exists()
    with path.open("a", encoding="utf-8") as handle:  # the writer adds its second line after the tick
        handle.write(json.dumps(doc("w2")) + "\n")
    assert stage_landing(settings, set()).plan.waiting and path.exists()
    old = time.time() - 6  # the writer is done: unchanged for longer than settle_seconds
    os.utime(path, (old, old))
    staged = stage_landing(settings, set())
    assert [b.documents for b in staged.plan.batches] == [2] and not path.exists()  # taken whole


def test_file_with_a_future_mtime_is_taken_once_unchanged_across_two_looks(landing):
    path = landing / "skewed.jsonl"
    write(path, [doc("f1")])
    future = time.time() + 3600  # a writer's clock ahead of ours
    os.utime(path, (future, future))
    first = plan_landing(landing, 3, settle_seconds=5)
    assert first.batches == [] and "skewed.jsonl" in first.waiting
    later = plan_landing(landing, 3, settle_seconds=5, clock=lambda: time.time() + 6)
    assert [b.source for b in later.batches] == ["skewed.jsonl"]


@pytest.mark.parametrize(
    "value",
    [
        "<home>",
        "<home>/delta",
        "<home>/batches",
        "<root>",
        "<root>/domain",
        "<root>/data/embedded_corpus",
        "<root>/.git",
    ],
)
def test_landing_dir_on_the_state_folder_or_the_project_is_refused(landing, value):
    home = landing.parent
    settings = changed(
        Settings(), corpus={"landing_dir": value.replace("<home>", str(home)).replace("<root>", str(PROJECT_ROOT))}
    )
    with pytest.raises(UnsafePathError, match=r"\[corpus\] landing_dir = .* (is|holds|lies inside) .*; point it at"):
        landing_folder(settings)
    assert landing_folder(changed(Settings(), corpus={"landing_dir": str(home / "incoming")})).is_dir()


def test_gzip_file_named_jsonl_is_quarantined_naming_gzip(landing):
    (landing / "docs.jsonl").write_bytes(gzip.compress((json.dumps(doc("z1")) + "\n").encode()))
    plan = plan_landing(landing, 3)
    reason = plan.quarantined["docs.jsonl"]
    assert re.search(r"is gzip-compressed.*gunzip", reason) and "UTF-8" not in reason


def test_entries_the_landing_scan_does_not_take_are_reported(landing):
    (landing / "gone.jsonl").symlink_to(landing / "nowhere.jsonl")  # a broken symbolic link
    (landing / "sub").mkdir()
    write(landing / "sub" / "x.jsonl", [doc("x1")])
    write(landing / "_draft.jsonl", [doc("d1")])
    (landing / "_rejected").mkdir()
    (landing / ".writing.jsonl").write_text("")  # dot files: the documented way to write in place
    plan = plan_landing(landing, 3)
    assert (
        plan.quarantined["gone.jsonl"].startswith("is a symbolic link to")
        and "does not exist" in (plan.quarantined["gone.jsonl"])
    )
    assert (landing / "_rejected" / "gone.jsonl").is_symlink() and not (landing / "gone.jsonl").is_symlink()
    assert "subfolder" in plan.skipped["sub/"] and "move its files into" in plan.skipped["sub/"]
    assert "leading '_'" in plan.skipped["_draft.jsonl"] and "rename" in plan.skipped["_draft.jsonl"]
    assert set(plan.skipped) == {"sub/", "_draft.jsonl"}  # _rejected and dot files are ours / in progress
    assert (landing / "sub" / "x.jsonl").is_file() and (landing / "_draft.jsonl").is_file()


def test_sensor_tick_says_why_it_requested_no_run(tmp_path, monkeypatch):
    setup = make_tiny_setup(tmp_path, monkeypatch, docs_per_provider=1)
    setup.stage()
    (setup.landing / "sub").mkdir()
    write(setup.landing / "_draft.jsonl", [doc("d1")])
    (setup.landing / "packed.jsonl").write_bytes(gzip.compress(b"{}\n"))
    with dg.build_sensor_context(instance=setup.instance, resources={"delta": DeltaStore()}) as context:
        result = setup.definitions().resolve_sensor_def("landing_sensor")(context)
    assert not result.run_requests
    reason = result.skip_reason.skip_message
    assert "packed.jsonl" in reason and "gzip" in reason, reason
    assert "_draft.jsonl" in reason and "sub/" in reason, reason
