"""Training sequences: documents cut into windows of tokens, numbered within their shard.

A sequence never crosses a document boundary: each document's token stream (its tokens
followed by one eos token) is cut into windows of at most ``seq_len`` tokens. Documents are
assigned to shards when their batch is staged (``domain.staging``); a shard's sequences are
numbered in (doc_id, token_start) order.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch
from transformers import PreTrainedTokenizerBase

from dataworth.errors import DataworthError

MIN_SEQUENCE_TOKENS = 2  # one next-token prediction needs two tokens

SEQUENCE_SCHEMA = {
    "doc_id": pl.String,
    "provider_id": pl.String,
    "batch_id": pl.String,
    "token_start": pl.Int64,
    "token_end": pl.Int64,
    "n_tokens": pl.Int64,
    "input_ids": pl.List(pl.Int32),
}


class SequenceTooLongError(DataworthError, ValueError):
    """A sequence handed to ``pad_batch`` is longer than ``seq_len``."""


def tokenize_corpus(docs: pl.DataFrame, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> pl.DataFrame:
    """Tokenize documents into training sequences of at most ``seq_len`` tokens.

    ``docs`` has columns doc_id, provider_id, batch_id, text. Each document becomes
    ``tokens(text) + [eos]``, cut into consecutive windows ``[token_start, token_end)``;
    a last window shorter than 2 tokens is dropped. Returns one row per window with
    columns doc_id, provider_id, batch_id, token_start, token_end, n_tokens and
    input_ids (list[int32], length n_tokens).
    """
    if seq_len < MIN_SEQUENCE_TOKENS:
        raise ValueError(f"seq_len must be at least {MIN_SEQUENCE_TOKENS}, got {seq_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; documents need one as a terminator")
    texts = docs["text"].to_list()
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    rows: dict[str, list] = {name: [] for name in SEQUENCE_SCHEMA}
    for doc, ids in zip(docs.select("doc_id", "provider_id", "batch_id").iter_rows(), token_ids):
        ids = [*ids, tokenizer.eos_token_id]
        for start in range(0, len(ids), seq_len):
            window = ids[start : start + seq_len]
            if len(window) < MIN_SEQUENCE_TOKENS:
                continue
            for name, value in zip(
                SEQUENCE_SCHEMA,
                (*doc, start, start + len(window), len(window), window),
            ):
                rows[name].append(value)
    return pl.DataFrame(rows, schema=SEQUENCE_SCHEMA)


def number_sequences(sequences: pl.DataFrame, shard_id: str) -> pl.DataFrame:
    """One shard's sequences in (doc_id, token_start) order with shard_id, seq_index (0..) and
    seq_id ``"{shard_id}:{seq_index:05d}"``."""
    return (
        sequences.sort("doc_id", "token_start")
        .with_columns(shard_id=pl.lit(shard_id), seq_index=pl.int_range(pl.len(), dtype=pl.Int64))
        .with_columns(seq_id=pl.col("shard_id") + ":" + pl.col("seq_index").cast(pl.String).str.zfill(5))
    )


def split_documents(sequences: pl.DataFrame) -> int:
    """Number of documents longer than one sequence (split into several windows)."""
    return sequences.group_by("doc_id").len().filter(pl.col("len") > 1).height


def pad_batch(input_ids_lists: Sequence[Sequence[int]], pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Right-pad sequences to ``seq_len``.

    Returns input_ids, attention_mask and labels, each a [batch, seq_len] int64 tensor;
    padding has attention_mask 0 and label -100 (ignored by the loss).
    """
    batch = len(input_ids_lists)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq_len), dtype=torch.long)
    for row, ids in enumerate(input_ids_lists):
        if len(ids) > seq_len:
            raise SequenceTooLongError(f"sequence {row} has {len(ids)} tokens, more than seq_len={seq_len}")
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
