"""Token shards: windows never cross documents, cover each document once, stable shard ids."""

import random

import polars as pl
import pytest
import torch

from domain.lm import train_tokenizer
from domain.sequences import (
    SequenceTooLongError,
    number_sequences,
    pad_batch,
    split_documents,
    tokenize_corpus,
)

SEQ_LEN = 16
WORDS = ["river", "stone", "valley", "cloud", "harbor", "lantern", "meadow", "copper", "ember", "fjord"]


def make_docs(batch_id: str, n_docs: int, seed: int) -> pl.DataFrame:
    """Documents of 0..60 words from two providers."""
    rng = random.Random(seed)
    return pl.DataFrame(
        {
            "doc_id": [f"{batch_id}-doc{i:03d}" for i in range(n_docs)],
            "provider_id": [f"provider{i % 2}" for i in range(n_docs)],
            "batch_id": [batch_id] * n_docs,
            "text": [" ".join(rng.choices(WORDS, k=rng.randint(0, 60))) for _ in range(n_docs)],
        }
    )


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_docs("b0", 40, seed=0)["text"], vocab_size=300)


def test_windows_stay_inside_documents_and_cover_them_once(tokenizer):
    docs = make_docs("b1", 30, seed=1)
    sequences = tokenize_corpus(docs, tokenizer, SEQ_LEN)

    assert sequences.schema["input_ids"] == pl.List(pl.Int32)
    assert sequences["n_tokens"].is_between(2, SEQ_LEN).all()
    for doc in docs.iter_rows(named=True):
        stream = tokenizer(doc["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows = sequences.filter(pl.col("doc_id") == doc["doc_id"]).sort("token_start")
        assert set(rows["provider_id"]) <= {doc["provider_id"]}
        position = 0
        for row in rows.iter_rows(named=True):
            assert row["token_start"] == position
            assert row["input_ids"] == stream[row["token_start"] : row["token_end"]]
            assert row["n_tokens"] == row["token_end"] - row["token_start"]
            position = row["token_end"]
        assert len(stream) - position < 2  # only a 1-token tail (or an empty doc's lone eos) is dropped
    split = sum(len(tokenizer(text)["input_ids"]) + 1 > SEQ_LEN for text in docs["text"])
    assert 0 < split == split_documents(sequences)


def test_empty_corpus_keeps_the_schema(tokenizer):
    sequences = tokenize_corpus(make_docs("b1", 0, seed=1), tokenizer, SEQ_LEN)
    assert sequences.height == 0
    assert {"shard_id", "seq_id", "seq_index"} <= set(number_sequences(sequences, "b-0000000000000000-0000").columns)


def test_sequences_are_numbered_in_document_order_whatever_the_input_order(tokenizer):
    sequences = tokenize_corpus(make_docs("b1", 30, seed=1), tokenizer, SEQ_LEN)
    shard = "b-0123456789abcdef-0002"
    numbered = number_sequences(sequences, shard)
    shuffled = number_sequences(sequences.sample(fraction=1.0, shuffle=True, seed=3), shard)
    assert numbered.equals(shuffled)
    assert numbered["seq_index"].to_list() == list(range(numbered.height))
    assert numbered["seq_id"][0] == f"{shard}:00000" and numbered["seq_id"].is_unique().all()
    assert numbered.select("doc_id", "token_start").equals(
        sequences.sort("doc_id", "token_start").select("doc_id", "token_start")
    )


def test_pad_batch_right_pads_and_masks_labels():
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0, seq_len=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(SequenceTooLongError, match="sequence 0 has 5 tokens"):
        pad_batch([[1, 2, 3, 4, 5]], pad_id=0, seq_len=4)
