"""Reading projected_gradients back: the blob codec on real Delta tables, and read-ahead shard readers that
give exactly what one reader gives."""

import threading

import polars as pl
import pytest
import torch

from domain.gradients import stored_gradients
from resources.codecs import binary_to_gradients, gradients_to_binary
from resources.delta import DeltaStore, run_metadata

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
