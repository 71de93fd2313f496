"""Valuation queries: the query file, the completions whose loss is measured, their projected gradients.

A query file holds one JSON object per line, `{"query_id": "q0", "prompt": "..."}`. The model's greedy
completion of each prompt is the measured text: its tokens' summed NLL is the query's loss.
"""

import hashlib
import json
from pathlib import Path

import polars as pl

from dataworth import CausalLMTask, LoGra, Projection
from dataworth.errors import DataworthError
from domain.lm import QueryTooLongError, generate_completions
from domain.settings import Settings
from resources.codecs import gradients_to_binary

EXAMPLE_LINE = '{"query_id": "q0", "prompt": "..."}'


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


def query_rows(model, tokenizer, projection: Projection, settings: Settings, prompts: list[dict]) -> pl.DataFrame:
    """valuation_queries rows (without the hash columns): prompt, greedy completion, token counts, gradient."""
    texts = [p["prompt"] for p in prompts]
    try:
        completions = generate_completions(
            model, tokenizer, texts, max_new_tokens=settings.queries.max_new_tokens, seed=settings.queries.seed
        )
    except QueryTooLongError as error:
        where = f"query {prompts[error.index]['query_id']!r} of {settings.queries_path()}"
        raise QueryTooLongError(f"{where}: {error}", error.index) from None
    examples = encode_queries(tokenizer, texts, completions)
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    logra = LoGra(model, task, projection=projection, batch_size=settings.capture_batch_size)
    gradients = logra.capture(examples, query=True)  # (Q, D)
    return pl.DataFrame(
        {
            "query_id": [p["query_id"] for p in prompts],
            "prompt": texts,
            "completion": completions,
            "prompt_tokens": [n for _, n in examples],
            "completion_tokens": [len(ids) - n for ids, n in examples],
        },
        schema_overrides={"prompt_tokens": pl.Int64, "completion_tokens": pl.Int64},
    ).with_columns(gradient=gradients_to_binary(gradients))
