"""Valuation settings: one TOML file, one frozen dataclass, one code version per asset.

Read from `$DATAWORTH_SETTINGS`, else `$DATAWORTH_HOME/settings.toml` if present, else the defaults
below (the embedded default). Each asset's code version hashes only the sections it depends on, so
changing damping re-versions `influence_scores` and what follows, never the gradients.
"""

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from dataworth.config import CurvatureConfig, ProjectionConfig
from resources.state import PROJECT_ROOT, dataworth_home

CODE_VERSION = "1"  # bump when an asset's code changes what it writes
SETTINGS_ENV = "DATAWORTH_SETTINGS"


@dataclass(frozen=True)
class CorpusSettings:
    landing_dir: str = ""  # folder providers drop files into; "" = $DATAWORTH_HOME/landing
    seed_embedded_corpus: bool = True  # copy data/embedded_corpus into an empty landing folder
    docs_per_shard: int = 48  # documents of one batch per shard (= per Dagster partition)


@dataclass(frozen=True)
class ModelSettings:
    checkpoint_dir: str = ""  # local HF causal-LM directory (safetensors); "" = train the embedded GPT-2
    vocab_size: int = 4096  # embedded tokenizer
    n_layer: int = 2  # embedded GPT-2 shape
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    train_steps: int = 250  # embedded training
    train_batch_size: int = 16
    learning_rate: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class ShardSettings:
    seq_len: int = 128  # tokens per training sequence (never crosses a document)


@dataclass(frozen=True)
class QuerySettings:
    queries_file: str = "data/embedded_queries.jsonl"  # {"query_id", "prompt"} per line, project-relative
    max_new_tokens: int = 24  # greedy completion length; the completion tokens are the measured loss
    seed: int = 0


@dataclass(frozen=True)
class ScoreSettings:
    top_k: int = 10  # per query, sequences and documents kept
    normalize: str = "none"  # "none", "relatif" or "cosine"
    bootstrap_samples: int = 1000  # resamples of queries for the provider value interval
    block_rows: int = 4096  # training rows scored per matrix product


@dataclass(frozen=True)
class AutomationSettings:
    revaluation_cron: str = "0 3 * * *"  # when the schedule revalues whatever is stale (daily, 03:00)


@dataclass(frozen=True)
class Settings:
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    shards: ShardSettings = field(default_factory=ShardSettings)
    projection: ProjectionConfig = field(
        default_factory=lambda: ProjectionConfig(rank_in=32, rank_out=32, exclude=("lm_head",))
    )  # rank 32: +0.07 LDS over 16 (benchmarks/RESULTS.md)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    capture_batch_size: int = 16
    queries: QuerySettings = field(default_factory=QuerySettings)
    scores: ScoreSettings = field(default_factory=ScoreSettings)
    automation: AutomationSettings = field(default_factory=AutomationSettings)

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        """Nested dict (as in settings.toml) -> Settings; unknown keys are an error naming them."""
        kwargs = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if isinstance(value, dict):
                section = f.default_factory()
                unknown = set(value) - {g.name for g in fields(section)}
                if unknown:
                    raise ValueError(f"settings section [{f.name}] has unknown keys {sorted(unknown)}")
                value = replace(section, **value)
            kwargs[f.name] = value
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"settings have unknown sections/keys {sorted(unknown)}")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Settings":
        """From `path`, $DATAWORTH_SETTINGS, $DATAWORTH_HOME/settings.toml, or the defaults."""
        path = path or os.environ.get(SETTINGS_ENV) or dataworth_home() / "settings.toml"
        path = Path(path)
        if not path.exists():
            if os.environ.get(SETTINGS_ENV):
                raise FileNotFoundError(f"{SETTINGS_ENV}={path} does not exist; create it or unset the variable")
            return cls()
        with path.open("rb") as f:
            return cls.from_dict(tomllib.load(f))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def version(self, *sections: str) -> str:
        """Code version of an asset that depends on these sections (or "section.key" fields)."""
        data = self.to_dict()
        picked = {}
        for name in sections:
            section, _, key = name.partition(".")
            picked[name] = data[section][key] if key else data[section]
        digest = hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()
        return f"{CODE_VERSION}-{digest[:12]}"

    def queries_path(self) -> Path:
        return configured_path(self.queries.queries_file, "[queries] queries_file")


class UnsafePathError(ValueError):
    """A configured path leads outside the project root and DATAWORTH_HOME."""


def configured_path(value: str, setting: str) -> Path:
    """The absolute path a settings value names, refused unless inside the project root or DATAWORTH_HOME.

    Relative values are resolved against the project root, absolute ones taken as they are; symlinks
    and `..` are resolved before the check, so neither can lead outside the two roots.
    """
    roots = (PROJECT_ROOT.resolve(), dataworth_home())
    path = (PROJECT_ROOT / Path(value).expanduser()).resolve()
    if not any(path.is_relative_to(root) for root in roots):
        raise UnsafePathError(
            f"{setting} = {value!r} resolves to {path}, outside the project root {roots[0]} and DATAWORTH_HOME "
            f"{roots[1]}; move it under one of them (relative paths are resolved against the project root)"
        )
    return path
