"""Valuation queries: the query file, the completions whose loss is measured, their projected gradients.

A query file holds one JSON object per line, `{"query_id": "q0", "prompt": "...", "completion": "...",
"group": "..."}`; completion and group are optional. The completion is the measured text: its tokens'
summed NLL under the model is the query's loss (nats). A line with its own reference completion (e.g. the
continuation of a held-out document) measures that text; a line without one measures the model's greedy
completion of the prompt. A reference completion is cut, at a token boundary, to what fits in the model's
context after the prompt. `group` (e.g. the provider a held-out document came from) gives a per-group
breakdown of provider values.
"""

import hashlib
import json
from pathlib import Path

import polars as pl
import torch

from dataworth import CausalLMTask, Projection
from dataworth.errors import DataworthError
from domain.gradients import pipeline_logra
from domain.lm import QueryTooLongError, context_length, generate_completions
from domain.settings import Settings
from resources.codecs import gradients_to_binary

EXAMPLE_LINE = '{"query_id": "q0", "prompt": "...", "completion": "... (optional)", "group": "... (optional)"}'
RESERVED_GROUP = "all"  # a group name the per-group breakdown could confuse with all queries


class QueryFileError(DataworthError, ValueError):
    """The query file is missing or malformed; the message names the file, the line and the fix."""


def read_prompts(path: Path) -> list[dict]:
    """The query file's objects, in file order; a malformed line (or none at all) is a QueryFileError."""
    if not path.is_file():
        raise QueryFileError(f"query file {path} does not exist; set [queries] queries_file in the settings")
    lines, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise QueryFileError(
                f"query file {path} line {number} is not valid JSON ({error.msg}); "
                f"write one object per line like {EXAMPLE_LINE}"
            ) from None
        query_id, prompt = (row.get("query_id"), row.get("prompt")) if isinstance(row, dict) else (None, None)
        if not isinstance(query_id, str) or not query_id.strip() or not isinstance(prompt, str):
            raise QueryFileError(
                f"query file {path} line {number} needs a non-empty string query_id and a string prompt, "
                f"like {EXAMPLE_LINE}"
            )
        if query_id in seen:
            raise QueryFileError(
                f"query file {path} line {number} repeats query_id {query_id!r}; give every query its own id"
            )
        for key in ("completion", "group"):
            if key in row and row[key] is not None and not (isinstance(row[key], str) and row[key].strip()):
                raise QueryFileError(
                    f"query file {path} line {number}: {key} must be a non-empty string when given, like {EXAMPLE_LINE}"
                )
        if row.get("group") == RESERVED_GROUP:
            raise QueryFileError(f"query file {path} line {number}: group {RESERVED_GROUP!r} is reserved; rename it")
        seen.add(query_id)
        lines.append(row)
    if not lines:
        raise QueryFileError(f"query file {path} holds no query; add lines like {EXAMPLE_LINE}")
    return lines


def queries_version(settings: Settings) -> str:
    """valuation_queries' code version: the [queries] settings and the query file's bytes."""
    path = settings.queries_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
    return f"{settings.version('queries')}-{digest}"


def encode_queries(tokenizer, prompts: list[str], completions: list[str]) -> list[tuple[list[int], int]]:
    """(prompt ids + completion ids, prompt length) per query; an empty prompt starts from bos."""
    out = []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) or [tokenizer.bos_token_id]
        out.append((prompt_ids + tokenizer.encode(completion, add_special_tokens=False), len(prompt_ids)))
    return out


def fit_reference(tokenizer, prompt: str, completion: str, context: int) -> str:
    """`completion` cut at a token boundary so that prompt + completion fit in `context` tokens."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) or [tokenizer.bos_token_id]
    room = context - len(prompt_ids)
    if room < 1:
        raise QueryTooLongError(f"prompt has {len(prompt_ids)} tokens; the context ({context}) leaves no room")
    ids = tokenizer.encode(completion, add_special_tokens=False)
    return completion if len(ids) <= room else tokenizer.decode(ids[:room])


def completions_of(model, tokenizer, settings: Settings, prompts: list[dict]) -> list[str]:
    """The measured completion of each query line: its reference (cut to the context) or the greedy one."""
    greedy = [i for i, p in enumerate(prompts) if not p.get("completion")]
    completions = [p.get("completion") or "" for p in prompts]
    position = None
    try:
        for position, p in enumerate(prompts):
            if p.get("completion"):
                completions[position] = fit_reference(tokenizer, p["prompt"], p["completion"], context_length(model))
        position = None
        generated = generate_completions(
            model,
            tokenizer,
            [prompts[i]["prompt"] for i in greedy],
            max_new_tokens=settings.queries.max_new_tokens,
            seed=settings.queries.seed,
        )
    except QueryTooLongError as error:
        position = greedy[error.index] if position is None else position
        where = f"query {prompts[position]['query_id']!r} of {settings.queries_path()}"
        raise QueryTooLongError(f"{where}: {error}", position) from None
    for i, text in zip(greedy, generated):
        completions[i] = text
    return completions


def query_rows(model, tokenizer, projection: Projection, settings: Settings, prompts: list[dict]) -> pl.DataFrame:
    """valuation_queries rows (without the hash columns): prompt, measured completion (reference or greedy),
    token counts, group, the completion's loss (summed NLL, nats) and the gradient of that loss."""
    texts = [p["prompt"] for p in prompts]
    completions = completions_of(model, tokenizer, settings, prompts)
    examples = encode_queries(tokenizer, texts, completions)
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    logra = pipeline_logra(model, task, settings, projection=projection)
    gradients = logra.capture(examples, query=True)  # (Q, D)
    return pl.DataFrame(
        {
            "query_id": [p["query_id"] for p in prompts],
            "prompt": texts,
            "completion": completions,
            "reference": [bool(p.get("completion")) for p in prompts],
            "query_group": [p.get("group") for p in prompts],
            "prompt_tokens": [n for _, n in examples],
            "completion_tokens": [len(ids) - n for ids, n in examples],
            "loss": query_losses(model, task, examples).tolist(),
        },
        schema_overrides={
            "prompt_tokens": pl.Int64,
            "completion_tokens": pl.Int64,
            "query_group": pl.String,
            "loss": pl.Float64,
        },
    ).with_columns(gradient=gradients_to_binary(gradients))


@torch.no_grad()
def query_losses(model, task: CausalLMTask, examples: list[tuple[list[int], int]]) -> torch.Tensor:
    """(Q,) float64 summed NLL (nats) of each query's completion tokens, one query at a time."""
    was_training = model.training
    model.eval()
    losses = torch.tensor([float(task.query_loss(model, task.collate([e]))) for e in examples], dtype=torch.float64)
    model.train(was_training)
    return losses
