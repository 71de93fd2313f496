"""A tiny, real valuation setup in a temporary DATAWORTH_HOME: settings, landing files, runs.

Everything is real: the Dagster job of `build_definitions`, Delta tables, the MLflow sqlite store.
Only the sizes are small (a 1-layer GPT-2, 3 providers, a few short documents).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from domain.settings import Settings
from domain.staging import EMBEDDED_CORPUS, stage_landing
from pipelines.automation import RANGE_END, RANGE_START, stale_work
from pipelines.definitions import build_definitions
from resources.delta import DeltaStore

TINY_SETTINGS = """
capture_batch_size = 8
[corpus]
seed_embedded_corpus = false
docs_per_shard = 3
settle_seconds = 0
[model]
vocab_size = 320
n_layer = 1
n_head = 2
n_embd = 32
n_positions = 64
train_steps = 30
train_batch_size = 8
[shards]
seq_len = 32
[projection]
rank_in = 4
rank_out = 4
embedding_ranks = [16, 4]
exclude = ["lm_head"]
[queries]
queries_file = "data/embedded_queries.jsonl"
max_new_tokens = 6
[scores]
top_k = 3
bootstrap_samples = 100
"""

PROVIDERS = ("numpy", "polars", "torch")


def landing_records(provider: str, first: int, count: int, chars: int = 500) -> list[dict]:
    """`count` documents of an embedded provider, from the `first`-th, cut to `chars` characters."""
    lines = (EMBEDDED_CORPUS / f"{provider}.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines[first : first + count]]
    return [{**r, "text": r["text"][:chars]} for r in records]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@dataclass
class TinySetup:
    home: Path
    landing: Path
    settings: Settings
    instance: dg.DagsterInstance

    @property
    def delta(self) -> DeltaStore:
        return DeltaStore()

    def definitions(self) -> dg.Definitions:
        return build_definitions(Settings.load())

    def stage(self) -> list[str]:
        """Plan the landing folder and register new shards; returns the new shard ids."""
        new = stage_landing(self.settings, set(self.instance.get_dynamic_partitions("shards"))).new_shards
        self.instance.add_dynamic_partitions("shards", new)
        return new

    def run_stale(self) -> list[dg.ExecuteInProcessResult]:
        """Execute (in process) every request `stale_work` makes, like the schedule would."""
        defs = self.definitions()
        versions = {a.key.path[-1]: a.code_versions_by_key[a.key] for a in defs.assets}
        results = []
        for request in stale_work(self.instance, self.delta, versions):
            job = defs.resolve_job_def("valuation")
            results.append(
                job.execute_in_process(
                    instance=self.instance, tags=request.tags, asset_selection=request.asset_selection
                )
            )
        return results


def make_tiny_setup(
    tmp_path: Path, monkeypatch, settings_text: str = TINY_SETTINGS, docs_per_provider: int = 4
) -> TinySetup:
    home = tmp_path / "home"
    monkeypatch.setenv("DATAWORTH_HOME", str(home))
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text(settings_text)
    monkeypatch.setenv("DATAWORTH_SETTINGS", str(settings_file))
    landing = home / "landing"
    landing.mkdir(parents=True)
    for provider in PROVIDERS:
        write_jsonl(landing / f"{provider}.jsonl", landing_records(provider, 0, docs_per_provider))
    instance = dg.DagsterInstance.ephemeral()
    return TinySetup(home, landing, Settings.load(), instance)


__all__ = ["RANGE_END", "RANGE_START", "TinySetup", "landing_records", "make_tiny_setup", "write_jsonl"]
