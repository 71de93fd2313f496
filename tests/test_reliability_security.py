"""Security basics: safetensors only, configured paths stay inside their roots, landing data never
becomes a path, the UIs bind to localhost."""

import os
import pickle
import re

import dagster as dg
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from domain.lm import CheckpointError, load_checkpoint, save_checkpoint, train_tokenizer
from domain.settings import Settings, UnsafePathError, configured_path, operator_path
from domain.staging import landing_folder, plan_landing
from pipelines import cli
from resources.state import PROJECT_ROOT
from tests.pipeline_harness import TinySetup, make_tiny_setup, write_jsonl
from tests.reliability_support import changed, failure, run

SOURCE_DIRS = (
    "dataworth",
    "domain",
    "pipelines",
    "assets",
    "resources",
    "examples",
    "benchmarks",
    "data",
    "deployments",
)
UNSAFE_LOADING = re.compile(
    r"torch\.load\(|pickle\.loads?\(|cloudpickle|dill\.|joblib\.load|allow_pickle\s*=\s*True|"
    r"weights_only\s*=\s*False|trust_remote_code\s*=\s*True|use_safetensors\s*=\s*False|(?<![\w.])(eval|exec)\("
)


class PickleBomb:
    """Unpickling it creates `path`: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# --- weights ---------------------------------------------------------------------------------------


def test_no_unsafe_deserialization_in_the_code_base():
    hits = []
    for folder in SOURCE_DIRS:
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if UNSAFE_LOADING.search(line):
                    hits.append(f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}")
    assert hits == []


def test_weights_load_only_from_safetensors_and_a_pickle_is_never_unpickled(tmp_path):
    tokenizer = train_tokenizer(["the quick fox jumps over the lazy dog"] * 4, vocab_size=280)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=16))
    directory = tmp_path / "checkpoint"
    digest = save_checkpoint(model, tokenizer, directory)
    sentinel = tmp_path / "pickle-was-loaded"
    with open(directory / "pytorch_model.bin", "wb") as handle:  # beside the safetensors, as in many HF repos
        pickle.dump({"transformer.wte.weight": PickleBomb(sentinel)}, handle)
    loaded, _, loaded_digest = load_checkpoint(directory)
    assert loaded_digest == digest and torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\), which are refused"):
        load_checkpoint(directory)
    assert not sentinel.exists()


# --- configured paths ------------------------------------------------------------------------------


def test_landing_dir_resolves_inside_the_project_root_or_home(home, tmp_path):
    assert configured_path("incoming", "[corpus] landing_dir") == PROJECT_ROOT / "incoming"
    inside_home = home / "models" / "mine"
    assert configured_path(str(inside_home), "[corpus] landing_dir") == inside_home
    assert configured_path(str(PROJECT_ROOT / "data"), "[corpus] landing_dir") == PROJECT_ROOT / "data"
    (home / "escape").symlink_to(tmp_path)  # a symlink inside home that leads out of it
    outside = [
        "/etc/passwd",
        "../outside",
        "data/../../outside",
        "~/.ssh",
        str(tmp_path / "elsewhere"),
        str(home / "escape" / "x"),
    ]
    for value in outside:
        with pytest.raises(
            UnsafePathError,
            match=r"\[corpus\] landing_dir = .* outside the project root .* and DATAWORTH_HOME .*; "
            r"move it under one of them",
        ):
            configured_path(value, "[corpus] landing_dir")


def test_landing_dir_keeps_the_root_rule_and_operator_inputs_may_be_anywhere(home, tmp_path):
    settings = Settings()
    with pytest.raises(UnsafePathError, match=r"\[corpus\] landing_dir = '/etc'"):
        landing_folder(changed(settings, corpus={"landing_dir": "/etc"}))
    assert landing_folder(changed(settings, corpus={"landing_dir": str(home / "incoming")})).is_dir()
    outside = tmp_path / "operator" / "queries.jsonl"  # the operator's read-only inputs may live anywhere
    assert changed(settings, queries={"queries_file": str(outside)}).queries_path() == outside
    setup = TinySetup(home, home / "landing", settings, dg.DagsterInstance.ephemeral())
    # the operator's model directory may be anywhere: it is read (and found empty), not refused
    result = run(setup, "model_checkpoint", settings=changed(settings, model={"checkpoint_dir": str(tmp_path)}))
    assert "UnsafePathError" not in failure(result) and f"{tmp_path} has no config.json" in failure(result)
    with pytest.raises(UnsafePathError, match=r"\[model\] checkpoint_dir = 's3://b/m' is a URI"):
        operator_path("s3://b/m", "[model] checkpoint_dir")


def test_landing_file_names_and_doc_ids_never_become_paths(tmp_path, monkeypatch):
    setup = make_tiny_setup(tmp_path, monkeypatch, docs_per_provider=1)
    hostile = ["../../escaped", "/etc/passwd-copy", "a/../../../b", "..", "shard_id=x/../../y"]
    rows = [
        {"provider_id": "../provider", "doc_id": d, "text": f"text {i}", "license": "MIT"}
        for i, d in enumerate(hostile)
    ]
    write_jsonl(setup.landing / "hostile.jsonl", rows)
    before = set(tmp_path.parent.iterdir())
    shards = setup.stage()
    assert run(setup, "training_corpus", shards=shards).success
    corpus = setup.delta.read("training_corpus")
    assert set(hostile) <= set(corpus["doc_id"])  # stored as data, verbatim
    assert set(tmp_path.parent.iterdir()) == before  # nothing written next to the test folder
    names = [p.name for p in tmp_path.rglob("*")]
    assert not [n for n in names if "escaped" in n or "passwd" in n or n in ("b", "y")]
    staged = sorted(p.name for p in (setup.home / "batches").iterdir())
    assert all(re.fullmatch(r"b-[0-9a-f]{16}\.(parquet|source\.jsonl)", n) for n in staged)


def test_landing_symlink_to_a_file_outside_is_quarantined(home, tmp_path):
    landing = home / "landing"
    landing.mkdir(parents=True)
    secret = tmp_path / "secret.jsonl"
    write_jsonl(secret, [{"provider_id": "p", "doc_id": "d", "text": "private", "license": "MIT"}])
    (landing / "innocent.jsonl").symlink_to(secret)
    plan = plan_landing(landing, 3)
    assert plan.batches == [] and plan.quarantined["innocent.jsonl"].startswith(f"is a symbolic link to {secret}")
    assert not list((home / "batches").glob("*.parquet"))  # its content was never read into the corpus


# --- UIs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ui"], ["-h", "127.0.0.1", "-p", "3000"]),
        (["mlflow-ui"], ["--host", "127.0.0.1", "--port", "5000"]),
        (["ui", "--host", "0.0.0.0"], ["-h", "0.0.0.0"]),  # exposing it takes an explicit flag
    ],
)
def test_uis_bind_to_localhost_unless_told_otherwise(home, monkeypatch, argv, expected):
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))  # restored after the test
    commands = []
    monkeypatch.setattr(cli, "run_process_group", lambda command, cwd=None: commands.append(command) or 0)
    cli.main(argv)
    (command,) = commands
    assert any(command[i : i + len(expected)] == expected for i in range(len(command)))
