"""Scoring's read of `projected_gradients`: read-ahead shard readers, on local disk and on S3.

A projected_gradients table of SHARDS shards (float32 blobs, as the pipeline stores them) is scored against
QUERIES query gradients the way `score_valuation` does it (`stored_gradients` + one matrix product per
block), with 1, 2 and 4 readers (`[deployment] shard_readers`). Also: decoding the blobs through Arrow's
values buffer (today) against joining Python byte strings (before). Ratios are within this run.
S3 is moto's server on this machine (started here when moto[server] is installed): no network latency, so
it shows the overlap, not what a real bucket gains.

    .venv/bin/python benchmarks/shard_readers.py [--rows 4000] [--dim 2048] [--output PATH]
"""

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import torch

from domain.gradients import stored_gradients
from resources.codecs import binary_to_gradients, gradients_to_binary
from resources.delta import DeltaStore, run_metadata

SHARDS = 16
QUERIES = 64
READERS = (1, 2, 4)


def write_table(store: DeltaStore, rows: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for index in range(SHARDS):
        gradients = torch.randn(rows, dim, generator=generator)
        frame = pl.DataFrame(
            {
                "shard_id": f"s-{index:04d}",
                "seq_id": [f"{index:04d}-{i:06d}" for i in range(rows)],
                "gradient": gradients_to_binary(gradients),
            }
        )
        store.write("projected_gradients", frame, partition_by=["shard_id"], metadata=run_metadata("b", "v", {}))


def score_seconds(store: DeltaStore, readers: int, queries: torch.Tensor) -> float:
    started = time.perf_counter()
    total = 0.0
    shards = [f"s-{i:04d}" for i in range(SHARDS)]
    for _, _, gradients in stored_gradients(store, shards, None, readers):
        for block in gradients.split(4096):
            total += float((block @ queries).sum())
    return time.perf_counter() - started


def joined_decode(column: pl.Series) -> torch.Tensor:
    """The decoder before: one Python byte string per row, joined."""
    joined = b"".join(column.to_list())
    return torch.from_numpy(np.frombuffer(joined, dtype="<f4").reshape(len(column), -1).copy())


def moto_bucket(folder: Path):
    """(server process, s3:// root) of a moto server on a free port, with the AWS_* variables set."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=(folder / "moto.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_ALLOW_HTTP="true",
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            return server, "s3://bench/delta"
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000, help="rows per shard")
    parser.add_argument("--dim", type=int, default=2048, help="projected gradient width D")
    parser.add_argument("--output", type=Path, help="append the Markdown table to this file")
    args = parser.parse_args()
    queries = torch.randn(args.dim, QUERIES)
    lines = [
        f"## Shard readers ({datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__})",
        "",
        f"`.venv/bin/python benchmarks/shard_readers.py --rows {args.rows} --dim {args.dim}`: {SHARDS} shards x "
        f"{args.rows} rows x D {args.dim} float32 ({SHARDS * args.rows * args.dim * 4 / 2**20:.0f} MiB), scored "
        f"against {QUERIES} queries. Seconds are the best of 2; ratios are to 1 reader in the same store.",
        "",
        "| store | readers | seconds | speed-up over 1 reader |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        stores = [("local disk", DeltaStore(root=str(Path(tmp) / "delta")))]
        server = None
        try:
            import moto.server  # noqa: F401

            server, root = moto_bucket(Path(tmp))
            stores.append(("S3 (moto, this machine)", DeltaStore(root=root)))
        except ImportError:
            print("moto[server] is not installed: local disk only")
        try:
            for name, store in stores:
                write_table(store, args.rows, args.dim)
                seconds = {r: min(score_seconds(store, r, queries) for _ in range(2)) for r in READERS}
                for readers in READERS:
                    ratio = seconds[1] / seconds[readers]
                    lines.append(f"| {name} | {readers} | {seconds[readers]:.2f} | {ratio:.2f}x |")
                    print(lines[-1], flush=True)
            column = stores[0][1].read("projected_gradients", where={"shard_id": "s-0000"})["gradient"]
            arrow = min(timed(binary_to_gradients, column) for _ in range(5))
            joined = min(timed(joined_decode, column) for _ in range(5))
            lines += [
                "",
                f"Decoding one shard's blobs: Arrow's values buffer {joined / arrow:.1f}x faster than joining.",
            ]
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with args.output.open("a") as f:
            f.write("\n" + text)


def timed(function, argument) -> float:
    started = time.perf_counter()
    function(argument)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
