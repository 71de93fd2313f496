"""How `projected_gradients` should be stored for scoring: bytes on disk and read+decode speed.

Three layouts of the same N x D gradients, each a Delta table written with our DeltaStore in shards:
  blob32   one little-endian float32 binary blob per row (what the pipeline stores today)
  array32  a float32 list column of length D (Delta has no fixed-size array type; read back as Array)
  blob16   one bfloat16 blob per row (half the bytes; decoded to float32 for scoring): `gradient_dtype = "bfloat16"`
For each size it reports table bytes, seconds to read every shard into an (N, D) float32 tensor,
the ratio to blob32 (measured in the same run), and for blob16 the error it adds to influence
scores (relative error and Spearman of a query's scores against float32).

    .venv/bin/python benchmarks/gradient_store.py [--sizes 8000 32000 64000] [--dim 2048] [--output PATH]
"""

import argparse
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import torch

from domain.quality import spearman
from resources.codecs import binary_to_gradients, gradients_to_binary
from resources.delta import DeltaStore

SHARDS = 8
QUERIES = 16


ENCODE = {
    "blob32": lambda g: gradients_to_binary(g),
    "array32": lambda g: pl.Series(g.numpy(), dtype=pl.Array(pl.Float32, g.shape[1])).cast(pl.List(pl.Float32)),
    "blob16": lambda g: gradients_to_binary(g, "bfloat16"),
}
DECODE = {
    "blob32": binary_to_gradients,
    "array32": lambda c: torch.from_numpy(c.list.to_array(len(c[0])).to_numpy().copy()),
    "blob16": lambda c: binary_to_gradients(c, "bfloat16"),
}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(n: int, dim: int, root: Path) -> list[dict]:
    g = torch.Generator().manual_seed(n)
    per_shard = n // SHARDS
    shards = [torch.randn(per_shard, dim, generator=g) for _ in range(SHARDS)]
    queries = torch.randn(dim, QUERIES, generator=g)
    exact = torch.cat(shards) @ queries  # (N, Q) float32 scores
    rows = []
    for layout in ENCODE:
        store = DeltaStore(root=str(root / f"{layout}-{n}"))
        for s, grads in enumerate(shards):
            frame = pl.DataFrame({"shard_id": [f"s{s:03d}"] * per_shard}).with_columns(gradient=ENCODE[layout](grads))
            store.replace_shard("grads", f"s{s:03d}", frame, metadata={})
        started = time.perf_counter()
        parts = [
            DECODE[layout](store.read("grads", columns=["gradient"], where={"shard_id": f"s{s:03d}"})["gradient"])
            for s in range(SHARDS)
        ]
        seconds = time.perf_counter() - started
        scores = torch.cat(parts) @ queries
        error = ((scores - exact).norm() / exact.norm()).item()
        rank = float(np.mean([spearman(scores[:, q].numpy(), exact[:, q].numpy()) for q in range(QUERIES)]))
        rows.append(
            {
                "n": n,
                "layout": layout,
                "mib": folder_bytes(root / f"{layout}-{n}") / 2**20,
                "read_s": seconds,
                "score_rel_error": error,
                "score_spearman": rank,
            }
        )
    base = next(r for r in rows if r["layout"] == "blob32")
    for r in rows:
        r["read_vs_blob32"] = r["read_s"] / base["read_s"]
        r["bytes_vs_blob32"] = r["mib"] / base["mib"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| N | layout | MiB | read s | read / blob32 | bytes / blob32 | score rel. error | score Spearman |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['layout']} | {r['mib']:.1f} | {r['read_s']:.2f} | {r['read_vs_blob32']:.2f} | "
            f"{r['bytes_vs_blob32']:.2f} | {r['score_rel_error']:.1e} | {r['score_spearman']:.5f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8000, 32000, 64000])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for n in args.sizes for r in measure(n, args.dim, Path(tmp))]
    text = table(rows)
    print(text)
    if args.output:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        sizes = " ".join(map(str, args.sizes))
        header = (
            f"Command: `python benchmarks/gradient_store.py --sizes {sizes} --dim {args.dim}` "
            f"({stamp}, {time.perf_counter() - started:.0f} s, {platform.machine()} {platform.system()}, "
            f"torch {torch.__version__}, polars {pl.__version__}).\n\n"
        )
        args.output.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
