"""The quality benchmark's data and base model, built from the embedded corpus, deterministic by seed.

Per provider (documents shuffled by seed): `query_docs` held-out documents give queries (their first
sequence, the first `prompt_tokens` tokens as prompt), the next documents give `train_per_provider`
training sequences, and the rest pre-train the base GPT-2 (cached under benchmarks/.cache/).
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from domain.lm import (
    TinyGPT2Config,
    load_checkpoint,
    save_checkpoint,
    train_tiny_gpt2,
    train_tokenizer,
)
from domain.sequences import tokenize_corpus

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "embedded_corpus"
CACHE = Path(__file__).resolve().parent / ".cache"
MODEL = TinyGPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64)
SEQ_LEN = 64
VOCAB = 2000
PRETRAIN = {"steps": 600, "batch_size": 16, "lr": 3e-3}


@dataclass
class Benchmark:
    """Token-id examples and provider ids: train (N lists), queries (Q (ids, n_prompt) pairs)."""

    providers: list[str]
    train: list[list[int]]
    train_providers: list[int]
    queries: list[tuple[list[int], int]]
    query_providers: list[int]
    pretrain: list[list[int]]


def load_documents() -> pl.DataFrame:
    rows = [
        json.loads(line)
        for path in sorted(CORPUS.glob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    return pl.DataFrame(rows).select("doc_id", "provider_id", "text").with_columns(batch_id=pl.lit("b0"))


def split_documents(docs: pl.DataFrame, seed: int, query_docs: int) -> tuple[pl.DataFrame, pl.DataFrame, list[str]]:
    """(query documents, other documents, the other doc ids in shuffled order); the shuffled order
    later decides which of the others give training sequences and which pre-train."""
    rng = random.Random(seed)
    parts = {"query": [], "rest": []}
    for provider in sorted(docs["provider_id"].unique().to_list()):
        ids = sorted(docs.filter(pl.col("provider_id") == provider)["doc_id"].to_list())
        rng.shuffle(ids)
        parts["query"] += ids[:query_docs]
        parts["rest"] += ids[query_docs:]
    query, rest = (docs.filter(pl.col("doc_id").is_in(parts[k])).sort("doc_id") for k in ("query", "rest"))
    return query, rest, parts["rest"]


def build(seed: int = 0, train_per_provider: int = 30, query_docs: int = 2, prompt_tokens: int = 16, log=print):
    """(Benchmark, base model, tokenizer); the tokenizer and base model are cached by their settings."""
    docs = load_documents()
    query_docs_df, rest_docs, order = split_documents(docs, seed, query_docs)
    rank = {doc: i for i, doc in enumerate(order)}
    key = f"base-s{seed}-t{train_per_provider}-q{query_docs}-v{VOCAB}-e{MODEL.n_embd}-l{MODEL.n_layer}-{PRETRAIN['steps']}"
    folder = CACHE / key
    if (folder / "config.json").exists():
        model, tokenizer, _ = load_checkpoint(folder)
    else:
        tokenizer = train_tokenizer(rest_docs["text"].to_list(), vocab_size=VOCAB)
        model = None
    rest = tokenize_corpus(rest_docs, tokenizer, SEQ_LEN).with_columns(order=pl.col("doc_id").replace_strict(rank))
    rest = rest.sort("order", "token_start")
    providers = sorted(docs["provider_id"].unique().to_list())
    train, train_providers, pretrain_docs = [], [], set()
    for p, provider in enumerate(providers):
        rows = rest.filter(pl.col("provider_id") == provider)
        taken = 0
        for doc, group in rows.group_by("doc_id", maintain_order=True):
            if taken >= train_per_provider:
                pretrain_docs.add(doc[0])
                continue
            ids = group["input_ids"].to_list()[: train_per_provider - taken]
            train += [list(x) for x in ids]
            train_providers += [p] * len(ids)
            taken += len(ids)
    pretrain = [list(x) for x in rest.filter(pl.col("doc_id").is_in(sorted(pretrain_docs)))["input_ids"].to_list()]
    queries, query_providers = [], []
    q = tokenize_corpus(query_docs_df, tokenizer, SEQ_LEN).filter(
        pl.col("token_start") == 0, pl.col("n_tokens") > prompt_tokens + 8
    )
    for row in q.iter_rows(named=True):
        queries.append((list(row["input_ids"]), prompt_tokens))
        query_providers.append(providers.index(row["provider_id"]))
    if model is None:
        log(f"pre-training the base model on {len(pretrain)} sequences ({PRETRAIN['steps']} steps)")
        model = train_tiny_gpt2(
            pretrain,
            tokenizer,
            MODEL,
            steps=PRETRAIN["steps"],
            batch_size=PRETRAIN["batch_size"],
            lr=PRETRAIN["lr"],
            seed=seed,
        )
        save_checkpoint(model, tokenizer, folder)
        model, tokenizer, _ = load_checkpoint(folder)
    return Benchmark(providers, train, train_providers, queries, query_providers, pretrain), model, tokenizer
