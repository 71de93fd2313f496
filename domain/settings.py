"""Valuation settings: one TOML file, one frozen dataclass, one code version per asset.

Read from `$DATAWORTH_SETTINGS`, else `$DATAWORTH_HOME/settings.toml` if present, else the defaults
below (the embedded default). Each asset's code version hashes only the sections it depends on, so
changing damping re-versions `influence_scores` and what follows, never the gradients.
"""

import difflib
import hashlib
import json
import os
import re
import tomllib
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from dataworth.config import (
    CURVATURES,
    DAMPING_MODES,
    FISHERS,
    PROJECTION_INITS,
    SHARED_WEIGHTS,
    CurvatureConfig,
    ProjectionConfig,
)
from dataworth.errors import ConfigError
from dataworth.scoring import NORMALIZATIONS
from resources.codecs import GRADIENT_DTYPES
from resources.state import PROJECT_ROOT, dataworth_home

CODE_VERSION = "1"  # bump when an asset's code changes what it writes
SETTINGS_ENV = "DATAWORTH_SETTINGS"


@dataclass(frozen=True)
class CorpusSettings:
    landing_dir: str = ""  # folder providers drop files into; "" = $DATAWORTH_HOME/landing
    seed_embedded_corpus: bool = True  # copy data/embedded_corpus into an empty landing folder
    docs_per_shard: int = 48  # documents of one batch per shard (= per Dagster partition)
    settle_seconds: float = 10.0  # a landing file is taken once unchanged this long (see domain/staging.py)


@dataclass(frozen=True)
class ModelSettings:
    checkpoint_dir: str = ""  # local HF causal-LM directory (safetensors); "" = train the embedded GPT-2
    adapter_dir: str = ""  # local PEFT LoRA adapter folder (save_pretrained) applied on the base; "" = none
    vocab_size: int = 4096  # embedded tokenizer
    n_layer: int = 2  # embedded GPT-2 shape
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    tie_embeddings: bool = False  # untied, lm_head is valued too (a tied lm_head is never tracked)
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
class DeploymentSettings:
    executor: str = "multiprocess"  # where steps run: "multiprocess" (this machine), "ray" or "k8s" (a cluster)
    max_concurrent: int = 2  # steps at once (multiprocess)
    ray_address: str = "http://127.0.0.1:8265"  # the Ray cluster's job-submission (dashboard) address
    gpus_per_model_step: float = 0  # GPUs each step that runs the model requests (training, capture, queries)
    cpus_per_step: float = 1  # CPUs every step requests on Ray or k8s
    gpu_steps_at_once: int = 0  # pool: at most this many GPU steps run at once (0 = no limit)
    memory_per_model_step: str = "8Gi"  # memory each model step requests and may use on k8s (a k8s quantity)
    k8s_secret: str = "dataworth-s3"  # k8s Secret whose keys every step pod gets as env vars (S3 credentials)
    k8s_namespace: str = ""  # namespace of the step pods; "" = the run launcher's (the Helm release's)
    k8s_image: str = ""  # image of the step pods; "" = the image of the user-code deployment
    # gradient shards that scoring and the EK-FAC pass read ahead in threads (that many more shards in memory)
    shard_readers: int = 2
    # steps that capture a run's shards at once, each a contiguous group (projected_gradients; GPU steps)
    capture_workers: int = 1
    # steps that score contiguous groups of shards at once (influence_scores), merged exactly by one more step
    scoring_workers: int = 1


@dataclass(frozen=True)
class Settings:
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    shards: ShardSettings = field(default_factory=ShardSettings)
    # rank 32: +0.07 LDS over 16; lm_head's vocabulary side at rank 1024: 1.02-1.10x Kronfluence's full-gradient
    # EK-FAC on three benchmarks; the token embedding at 1024 (vocabulary) x 16: provider identification 0.90
    # instead of 0.70, LDS unchanged (benchmarks/RESULTS.md). A tied lm_head is valued through its output use and
    # the tied embedding through its input use, as separate layers; position embeddings are left out (pipeline)
    projection: ProjectionConfig = field(
        default_factory=lambda: ProjectionConfig(
            rank_in=32,
            rank_out=32,
            ranks={"lm_head": (16, 1024)},
            embeddings=True,
            embedding_ranks=(1024, 16),
            shared_weights="module_use",
        )
    )
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    capture_batch_size: int = 16
    checkpoint_blocks: bool = False  # capture under activation checkpointing: memory only, same gradients
    # how projected_gradients stores each gradient: "float32", or "bfloat16" (half the bytes, 1.7e-3 relative score
    # error; benchmarks/RESULTS_store.md) for stores at scale. New shards use it; it makes nothing stale.
    gradient_dtype: str = "float32"
    queries: QuerySettings = field(default_factory=QuerySettings)
    scores: ScoreSettings = field(default_factory=ScoreSettings)
    automation: AutomationSettings = field(default_factory=AutomationSettings)
    deployment: DeploymentSettings = field(default_factory=DeploymentSettings)

    @classmethod
    def from_dict(cls, data: dict, source: str = "settings") -> "Settings":
        """Nested dict (as in settings.toml) -> Settings, every key, type, range and choice checked.

        Any problem raises one `SettingsError` line: `<source>: [section] key = value: problem; fix`."""
        if not isinstance(data, dict):
            raise SettingsError(f"{source}: must be a table of sections, got {data!r}")
        kwargs = {}
        for name, value in data.items():
            spec = _FIELDS.get(name)
            if spec is None:
                raise SettingsError(f"{source}: {_unknown(None, name, value, list(_FIELDS))}")
            default = spec.default_factory() if spec.default_factory is not MISSING else None
            if is_dataclass(default):
                if not isinstance(value, dict):
                    raise SettingsError(f"{source}: {name} = {value!r}: must be a [{name}] section; write it as one")
                kwargs[name] = _section(source, name, default, value)
            else:
                kwargs[name] = _value(source, None, name, value, _HINTS[name])
        settings = cls(**kwargs)
        if problem := _cross_check(settings):
            raise SettingsError(f"{source}: {problem}")
        return settings

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Settings":
        """From `path`, $DATAWORTH_SETTINGS, $DATAWORTH_HOME/settings.toml, or the defaults; validated whole."""
        path = path or os.environ.get(SETTINGS_ENV) or dataworth_home() / "settings.toml"
        path = Path(path)
        if not path.exists():
            if os.environ.get(SETTINGS_ENV):
                raise SettingsError(
                    f"settings file {SETTINGS_ENV}={path} does not exist; create it or unset the variable"
                )
            return cls()
        source = f"settings file {path}"
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as error:
            raise SettingsError(f"{source}: is not valid TOML ({error}); fix the syntax (https://toml.io)") from None
        except (OSError, UnicodeDecodeError) as error:
            raise SettingsError(f"{source}: cannot be read ({error}); make it a readable UTF-8 file") from None
        settings = cls.from_dict(data, source)
        try:  # the path settings, resolved as they will be used
            if settings.corpus.landing_dir:
                checked_landing_dir(settings.corpus.landing_dir)
            if settings.model.checkpoint_dir:
                operator_path(settings.model.checkpoint_dir, "[model] checkpoint_dir")
            if settings.model.adapter_dir:
                operator_path(settings.model.adapter_dir, "[model] adapter_dir")
            settings.queries_path()
        except UnsafePathError as error:
            raise SettingsError(f"{source}: {error}") from None
        return settings

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
        return operator_path(self.queries.queries_file, "[queries] queries_file")


class SettingsError(ConfigError):
    """A settings file is invalid: one line naming the file, the key, the value and the fix."""


class UnsafePathError(ValueError):
    """A configured path leads outside the project root and DATAWORTH_HOME, or onto a folder of ours."""


# --- validation --------------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in fields(Settings)}
_HINTS = typing.get_type_hints(Settings)
_AT_LEAST_1 = (1, None)
RULES: dict[str, tuple] = {  # "section.key" -> (minimum, exclusive minimum) or a tuple of choices
    "corpus.docs_per_shard": _AT_LEAST_1,
    "corpus.settle_seconds": (0, None),
    **{f"model.{k}": _AT_LEAST_1 for k in ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions")},
    "model.train_steps": _AT_LEAST_1,
    "model.train_batch_size": _AT_LEAST_1,
    "model.learning_rate": (None, 0),
    "model.seed": (0, None),
    "shards.seq_len": (2, None),
    "projection.rank_in": _AT_LEAST_1,
    "projection.rank_out": _AT_LEAST_1,
    "projection.init": PROJECTION_INITS,
    "projection.shared_weights": SHARED_WEIGHTS,
    "projection.seed": (0, None),
    "curvature.kind": CURVATURES,
    "curvature.fisher": FISHERS,
    "curvature.damping": (None, 0),
    "curvature.damping_mode": DAMPING_MODES,
    "capture_batch_size": _AT_LEAST_1,
    "gradient_dtype": tuple(GRADIENT_DTYPES),
    "queries.max_new_tokens": _AT_LEAST_1,
    "queries.seed": (0, None),
    "scores.top_k": _AT_LEAST_1,
    "scores.normalize": NORMALIZATIONS,
    "scores.bootstrap_samples": _AT_LEAST_1,
    "scores.block_rows": _AT_LEAST_1,
    "deployment.executor": ("multiprocess", "ray", "k8s"),
    "deployment.gpus_per_model_step": (0, None),
    "deployment.cpus_per_step": (0, None),
    "deployment.shard_readers": _AT_LEAST_1,
    "deployment.capture_workers": _AT_LEAST_1,
    "deployment.scoring_workers": _AT_LEAST_1,
}
K8S_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")  # "8Gi", "512Mi", "0.5"
K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # a Secret's or namespace's name (RFC 1123 label)


def _key(section: str | None, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _unknown(section: str | None, key: str, value, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    what = "key" if section or not isinstance(value, dict) else "section"
    where = f"[{section}] {key}" if section else (f"[{key}]" if what == "section" else key)
    return f"{where}: unknown {what}; {hint}(known: {', '.join(sorted(known))})"


def _section(source: str, name: str, default, values: dict):
    """The section `default` with the keys of `values` checked and set: a key left out keeps its default."""
    cls = type(default)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in hints:
            raise SettingsError(f"{source}: {_unknown(name, key, value, known)}")
        checked[key] = _value(source, name, key, value, hints[key])
    try:
        return replace(default, **checked)
    except (ConfigError, TypeError, ValueError) as error:  # the engine's own checks, should ours miss one
        raise SettingsError(f"{source}: [{name}] {error}") from None


def _is_rank_pair(value) -> bool:
    """[k_in, k_out]: two integers >= 1."""
    pair = isinstance(value, list | tuple) and len(value) == 2
    return pair and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)


def _value(source: str, section: str | None, key: str, value, hint):
    """`value` checked against the field's type and rule; converted (lists to tuples, ints to floats)."""

    given = value

    def fail(problem: str):
        raise SettingsError(f"{source}: {_key(section, key)} = {given!r}: {problem}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            fail("must be true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("must be an integer (write it without quotes)")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail("must be a number (write it without quotes)")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            fail('must be a string (write it in quotes: "...")')
    elif hint == tuple[int, int] | None:  # embedding_ranks: [k_in, k_out] (TOML has no None: leave the key out)
        if not _is_rank_pair(value):
            fail("must be [rank_in, rank_out], two integers >= 1")
        value = tuple(value)
    elif origin is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            fail('must be a list of strings, like ["lm_head"]')
        value = tuple(value)
    elif origin is dict:
        if not isinstance(value, dict):
            fail('must be a table, like { "*.mlp.*" = ... }')
        item = args[1]
        for name, v in value.items():
            if typing.get_origin(item) is tuple:  # ranks: glob -> [k_in, k_out]
                if not _is_rank_pair(v):
                    fail(f"entry {name!r} must be [rank_in, rank_out], two integers >= 1")
            elif isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                fail(f"entry {name!r} must be a number > 0")
    if section == "deployment" and key == "memory_per_model_step" and not K8S_QUANTITY.fullmatch(value):
        fail('must be a Kubernetes quantity, like "8Gi" or "512Mi"')
    if section == "deployment" and key in ("k8s_secret", "k8s_namespace") and value:
        if len(value) > 63 or not K8S_NAME.fullmatch(value):
            fail("must be a Kubernetes name: lower-case letters, digits and '-', at most 63 characters")
    if section == "automation" and key == "revaluation_cron" and (problem := cron_problem(value)):
        fail(problem)
    if section == "queries" and key == "queries_file" and not value.strip():
        fail("must name a query file")
    rule = RULES.get(f"{section}.{key}" if section else key)
    if rule is None:
        return value
    if isinstance(rule[0], str):
        if value not in rule:
            fail(f"must be one of {rule}")
    elif rule[0] is not None and value < rule[0]:
        fail(f"must be >= {rule[0]}")
    elif rule[1] is not None and not value > rule[1]:
        fail(f"must be > {rule[1]}")
    return value


def _cross_check(settings: "Settings") -> str | None:
    """Problems between fields: the embedded GPT-2's shape, sequences longer than its context."""
    m = settings.model
    if not m.checkpoint_dir:
        if m.n_embd % m.n_head:
            return f"[model] n_embd = {m.n_embd}: must be a multiple of [model] n_head = {m.n_head}"
        if settings.shards.seq_len > m.n_positions:
            return (
                f"[shards] seq_len = {settings.shards.seq_len}: must be <= [model] n_positions = {m.n_positions} "
                "(the embedded model's context); lower seq_len or raise n_positions"
            )
    d = settings.deployment
    if d.executor == "k8s" and d.gpus_per_model_step != int(d.gpus_per_model_step):
        return (
            f"[deployment] gpus_per_model_step = {d.gpus_per_model_step}: must be a whole number with "
            'executor = "k8s" (Kubernetes schedules whole GPUs)'
        )
    return None


_CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
_CRON_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)
_CRON_HELP = "5 fields: minute hour day-of-month month day-of-week, like '0 3 * * *', or @hourly, @daily, ..."


def _cron_number(text: str, name: str, low: int, high: int, names: dict) -> tuple[int | None, str | None]:
    number = names.get(text.lower()) if text.lower() in names else (int(text) if text.isdigit() else None)
    if number is None:
        return None, f"{name} {text!r} is not a number; a cron string has {_CRON_HELP}"
    if not low <= number <= high:
        return None, f"{name} {number} is out of range {low}-{high}"
    return number, None


def cron_problem(cron: str) -> str | None:
    """What is wrong with a cron string (as Dagster's schedules read it), or None when it is valid."""
    text = cron.strip()
    if text.lower() in _CRON_ALIASES:
        return None
    parts = text.split()
    if len(parts) != 5:
        return f"has {len(parts)} field(s); a cron string has {_CRON_HELP}"
    single = []
    for part, (name, low, high, names) in zip(parts, _CRON_FIELDS):
        values = []
        for item in part.split(","):
            if (item == "?" and name.startswith("day")) or (item == "L" and name == "day of month"):
                continue
            if name == "day of week" and (match := re.fullmatch(r"(\w+)#(\d+)", item)):
                if (problem := _cron_number(match[1], name, 0, 6, names)[1]) or not 1 <= int(match[2]) <= 5:
                    return problem or f"{name} {item!r}: the week number after # must be 1-5"
                continue
            base, slash, step = item.partition("/")
            if slash and not (step.isdigit() and int(step) >= 1):
                return f"{name} {item!r}: the step after / must be a whole number >= 1"
            if base == "*":
                continue
            for bound in base.split("-", 1):
                number, problem = _cron_number(bound, name, low, high, names)
                if problem:
                    return problem
                values.append(number)
        single.append(values if len(values) == 1 and "-" not in part and "/" not in part else None)
    if single[3] == [2] and single[2] and single[2][0] in (30, 31):
        return f"day {single[2][0]} of February never comes"
    return None


LANDING_CODE_FOLDERS = (
    "assets", "benchmarks", "data", "dataworth", "deployments", "docs", "domain", "examples", "pipelines",
    "resources", "tests",
)  # fmt: skip
STATE_SUBFOLDERS = ("delta", "mlflow", "dagster", "batches", "models", "projections", "reports")


def checked_landing_dir(value: str) -> Path:
    """The folder `[corpus] landing_dir` names, refused when staging would move files of ours out of it:
    the state folder itself or one of its own subfolders, a folder holding the state folder or the
    project, the project root, or a code folder of the project (or any folder inside those)."""
    setting = "[corpus] landing_dir"
    folder = configured_path(value, setting)
    home, root = dataworth_home(), PROJECT_ROOT.resolve()
    code = [root / name for name in LANDING_CODE_FOLDERS] + [
        p for p in root.glob(".*") if p.is_dir() and p.resolve() != home
    ]
    if folder == home:
        problem = f"is the state folder {home}"
    elif home.is_relative_to(folder) or root.is_relative_to(folder):
        problem = f"holds the state folder {home} or the project {root}"
    elif any(folder.is_relative_to(home / name) for name in STATE_SUBFOLDERS):
        problem = f"lies inside a folder the pipeline writes ({home}/{{{','.join(STATE_SUBFOLDERS)}}})"
    elif any(folder.is_relative_to(p) for p in code):
        problem = f"lies inside a code or data folder of the project {root}"
    else:
        return folder
    raise UnsafePathError(
        f"{setting} = {value!r} resolves to {folder}, which {problem}: staging moves every file it finds there "
        f"(settings, scripts) into _rejected/; point it at a folder of its own, such as {home / 'landing'}"
    )


def operator_path(value: str, setting: str) -> Path:
    """The absolute local path an operator's read-only input names: anywhere (a Hugging Face cache, /models).

    The operator's settings are trusted. The landing folder is the exception (`checked_landing_dir`):
    staging moves files out of it, so it stays under the roots. Relative values are resolved against the
    project root, `~` expanded, symlinks resolved."""
    if "://" in value:
        raise UnsafePathError(f"{setting} = {value!r} is a URI; give a local directory (copy the files there first)")
    return (PROJECT_ROOT / Path(value).expanduser()).resolve()


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
