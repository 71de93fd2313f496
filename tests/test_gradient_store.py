"""Reading projected_gradients back: the blob codec (float32 and bfloat16) on real Delta tables, a float32
table that gains bfloat16 shards, the schema's per-dtype blob checks, and read-ahead shard readers that give
exactly what one reader gives."""

import threading

import polars as pl
import pytest
import torch

from domain.gradients import stored_gradients
from resources.codecs import binary_to_gradients, frame_gradients, gradients_to_binary
from resources.delta import DeltaStore, run_metadata
from resources.schemas import validate

META = run_metadata("run", "v1", {})


@pytest.fixture
def gradient_table(tmp_path):
    """A projected_gradients table of 5 shards (3..7 rows each, D = 6), rows written out of seq_id order."""
    store = DeltaStore(root=str(tmp_path / "delta"))
    generator = torch.Generator().manual_seed(0)
    written = {}
    for index in range(5):
        shard, rows = f"s-{index:04d}", 3 + index
        gradients = torch.randn(rows, 6, generator=generator)
        seq_ids = [f"{shard}-{i:03d}" for i in range(rows)]
        frame = pl.DataFrame({"shard_id": shard, "seq_id": seq_ids, "gradient": gradients_to_binary(gradients)})
        store.write("projected_gradients", frame.reverse(), partition_by=["shard_id"], metadata=META)
        written[shard] = (seq_ids, gradients)
    return store, written


def test_blobs_decode_exactly_from_slices_chunks_and_delta(gradient_table):
    store, written = gradient_table
    gradients = torch.randn(9, 5)
    column = gradients_to_binary(gradients)
    assert torch.equal(binary_to_gradients(column), gradients)
    assert torch.equal(binary_to_gradients(column[2:7]), gradients[2:7])  # an offset into the buffers
    chunked = pl.concat([column[:4], column[4:]], rechunk=False)
    assert chunked.n_chunks() == 2 and torch.equal(binary_to_gradients(chunked), gradients)
    table = store.read("projected_gradients").sort("shard_id", "seq_id")
    expected = torch.cat([written[shard][1] for shard in sorted(written)])
    assert torch.equal(binary_to_gradients(table["gradient"]), expected)
    assert binary_to_gradients(column[:0]).shape == (0, 0)


def test_blobs_of_different_widths_or_missing_are_refused():
    with pytest.raises(ValueError, match=r"must all be D float32 values; found \[8, 12\] bytes"):
        binary_to_gradients(pl.Series([bytes(8), bytes(12)], dtype=pl.Binary))
    with pytest.raises(ValueError, match="must all be D float32 values"):
        binary_to_gradients(pl.Series([bytes(6), bytes(6)], dtype=pl.Binary))
    with pytest.raises(ValueError, match="1 of 2 gradient blobs are null"):
        binary_to_gradients(pl.Series([bytes(8), None], dtype=pl.Binary))


@pytest.mark.parametrize("readers", [2, 3, 8])
def test_read_ahead_gives_what_one_reader_gives(gradient_table, readers):
    store, written = gradient_table
    shards = ["s-0003", "s-0000", "s-0004", "s-0001", "s-0002"]
    one = list(stored_gradients(store, shards, store.version("projected_gradients")))
    ahead = list(stored_gradients(store, shards, store.version("projected_gradients"), readers=readers))
    assert [shard for shard, _, _ in one] == sorted(shards) == [shard for shard, _, _ in ahead]
    for (shard, seq_ids, gradients), (_, seq_ids_ahead, gradients_ahead) in zip(one, ahead):
        assert seq_ids == seq_ids_ahead == written[shard][0]  # sorted by seq_id
        assert torch.equal(gradients, written[shard][1]) and torch.equal(gradients_ahead, gradients)


def test_a_reader_stopped_early_leaves_no_thread_behind(gradient_table):
    store, _ = gradient_table
    reading = stored_gradients(store, [f"s-{i:04d}" for i in range(5)], None, readers=2)
    shard, _, _ = next(reading)
    assert shard == "s-0000"
    reading.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("shard-reader")]


def gradient_rows(shard: str, gradients: torch.Tensor, dtype: str | None) -> pl.DataFrame:
    """projected_gradients rows as the capture writes them (`dtype` None: a row from before gradient_dtype)."""
    n = gradients.shape[0]
    frame = pl.DataFrame(
        {
            "shard_id": shard,
            "seq_id": [f"{shard}-{i:03d}" for i in range(n)],
            "doc_id": "d",
            "provider_id": "p",
            "n_tokens": pl.Series([4] * n, dtype=pl.Int64),
            "gradient": gradients_to_binary(gradients, dtype or "float32"),
        }
    )
    if dtype is not None:
        frame = frame.with_columns(gradient_dtype=pl.lit(dtype))
    return frame.with_columns(projection_hash=pl.lit("a" * 64), model_hash=pl.lit("b" * 64))


def test_bfloat16_blobs_are_half_the_bytes_and_round_like_torch():
    gradients = torch.randn(5, 8) * 1e3
    column = gradients_to_binary(gradients, "bfloat16")
    assert column.bin.size().to_list() == [16] * 5
    assert torch.equal(binary_to_gradients(column, "bfloat16"), gradients.to(torch.bfloat16).float())


def test_a_float32_table_gains_bfloat16_shards_and_reads_both(tmp_path):
    store = DeltaStore(root=str(tmp_path / "delta"))
    old, new = torch.randn(3, 8), torch.randn(4, 8)
    shard_old, shard_new = "b-0000000000000000-0000", "b-0000000000000000-0001"
    store.write("projected_gradients", gradient_rows(shard_old, old, None), partition_by=["shard_id"], metadata=META)
    with pytest.raises(Exception, match="does not fit Delta table"):  # a new column needs add_columns
        store.replace_shard("projected_gradients", shard_new, gradient_rows(shard_new, new, "bfloat16"), metadata=META)
    store.replace_shard(
        "projected_gradients", shard_new, gradient_rows(shard_new, new, "bfloat16"), add_columns=True, metadata=META
    )
    table = store.read("projected_gradients").sort("shard_id", "seq_id")
    assert table["gradient_dtype"].to_list() == [None] * 3 + ["bfloat16"] * 4  # old rows: null = float32
    expected = torch.cat([old, new.to(torch.bfloat16).float()])
    assert torch.equal(frame_gradients(table), expected)
    assert torch.equal(frame_gradients(table.reverse()), expected.flip(0))  # row order kept across dtypes
    read = {shard: g for shard, _, g in stored_gradients(store, [shard_old, shard_new], None, readers=2)}
    assert torch.equal(read[shard_old], old) and torch.equal(read[shard_new], new.to(torch.bfloat16).float())
    assert validate("projected_gradients", table) == []
    assert validate("projected_gradients", gradient_rows(shard_old, old, None)) == []  # a table without the column


def test_the_schema_checks_blobs_by_their_dtype():
    good = gradient_rows("b-0000000000000000-0000", torch.randn(3, 8), "bfloat16")
    bad = torch.randn(3, 8)
    bad[1, 2] = float("inf")
    failures = validate("projected_gradients", gradient_rows("b-0000000000000000-0000", bad, "bfloat16"))
    assert any("finite_blob" in f and "[1]" in f for f in failures), failures
    short = good.with_columns(gradient=pl.Series([bytes(16), bytes(16), bytes(15)], dtype=pl.Binary))
    assert any("same_length" in f for f in validate("projected_gradients", short))
    unknown = good.with_columns(gradient_dtype=pl.lit("float16"))
    assert any("gradient_dtype" in f for f in validate("projected_gradients", unknown))
    # a float32 blob read as bfloat16 would not be whole values of another width: each row keeps its own width
    mixed = pl.concat([good, gradient_rows("b-0000000000000000-0000", torch.randn(2, 8), "float32")])
    assert validate("projected_gradients", mixed.with_columns(seq_id=pl.format("s{}", pl.int_range(5)))) == []
