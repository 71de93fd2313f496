"""Scoring throughput versus the rate at which the gradient table can simply be read.

Writes a `projected_gradients`-shaped Delta table (N rows of D float32) with our DeltaStore, then
measures, in one process and one run:
  read   rows/s of reading the table and decoding the gradient blobs into an (N, D) tensor
  score  rows/s of the same read plus streaming EK-FAC influence for Q queries (top-k, per-document
         and per-provider sums), as influence_scores does
for several table sizes (cost should be linear in N) and ranks (D = layers * rank^2).

    .venv/bin/python benchmarks/scoring_throughput.py [--quick]
"""

import argparse
import tempfile
import time

import polars as pl
import torch

from dataworth import Curvature, CurvatureConfig, CurvatureStatistics, InfluenceScorer
from dataworth.projection import GradientLayout
from resources.codecs import binary_to_gradients, gradients_to_binary
from resources.delta import DeltaStore

LAYERS = 8  # the embedded GPT-2: 2 blocks x (c_attn, c_proj, c_fc, mlp.c_proj)


def make_table(store: DeltaStore, n: int, dim: int, shards: int) -> None:
    g = torch.Generator().manual_seed(0)
    per_shard = n // shards
    for s in range(shards):
        grads = torch.randn(per_shard, dim, generator=g)
        frame = pl.DataFrame(
            {
                "shard_id": [f"s{s:03d}"] * per_shard,
                "seq_id": [f"s{s:03d}:{i:06d}" for i in range(per_shard)],
                "doc_id": [f"d{(s * per_shard + i) // 8}" for i in range(per_shard)],
                "provider_id": [f"p{s % 10}" for _ in range(per_shard)],
            }
        ).with_columns(gradient=gradients_to_binary(grads))
        store.write(
            "grads",
            frame,
            mode="overwrite",
            partition_by=["shard_id"],
            replace_where={"shard_id": f"s{s:03d}"},
            metadata={},
        )


def read_blocks(store: DeltaStore, shards: int):
    for s in range(shards):
        part = store.read("grads", columns=["gradient"], where={"shard_id": f"s{s:03d}"})
        yield binary_to_gradients(part["gradient"])


def ekfac_scorer(layout: GradientLayout, queries: torch.Tensor) -> InfluenceScorer:
    """A fitted EK-FAC from random statistics: the cost of preconditioning, not its values, matters here."""
    stats = CurvatureStatistics(layout)
    g = torch.randn(256, layout.dim)
    for b in layout.blocks:
        block = b.view(g).reshape(256, -1).double()
        stats.sums[b.name]["second_moment"] += block.T @ block
        stats.sums[b.name]["activation"] += torch.eye(b.k_in, dtype=torch.float64)
        stats.sums[b.name]["output_grad"] += torch.eye(b.k_out, dtype=torch.float64)
    stats.tokens, stats.examples = 256, 256
    return InfluenceScorer(queries, Curvature.fit(stats, "ekfac").preconditioner(CurvatureConfig()))


def measure(n: int, rank: int, n_queries: int, shards: int) -> dict:
    layout = GradientLayout.from_ranks({f"layer{i}": (rank, rank) for i in range(LAYERS)})
    with tempfile.TemporaryDirectory() as root:
        store = DeltaStore(root=root)
        make_table(store, n, layout.dim, shards)
        scorer = ekfac_scorer(layout, torch.randn(n_queries, layout.dim))
        meta = store.read("grads", columns=["doc_id", "provider_id"])
        docs = torch.tensor(meta["doc_id"].cast(pl.Categorical).to_physical().cast(pl.Int64).to_numpy())
        providers = torch.tensor(meta["provider_id"].cast(pl.Categorical).to_physical().cast(pl.Int64).to_numpy())
        started = time.perf_counter()
        rows = sum(b.shape[0] for b in read_blocks(store, shards))
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        scorer.stream(read_blocks(store, shards), top_k=10, groups={"doc": docs, "provider": providers})
        score_s = time.perf_counter() - started
    return {
        "rows": rows,
        "rank": rank,
        "dim": layout.dim,
        "read_rows_s": rows / read_s,
        "score_rows_s": rows / score_s,
        "ratio": read_s and score_s / read_s,
        "table_mb": rows * layout.dim * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    sizes = [2_000, 4_000] if args.quick else [10_000, 20_000, 40_000]
    ranks = [8] if args.quick else [8, 16, 32]
    measure(1_000, ranks[0], args.queries, shards=2)  # warm-up: imports, kernels, Delta log cache
    print(
        f"| rows | rank/side | D | table MiB | read rows/s | score rows/s ({args.queries} queries) | score time / read time |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rank in ranks:
        for n in sizes if rank == 16 or args.quick else sizes[-1:]:
            r = measure(n, rank, args.queries, shards=10)
            print(
                f"| {r['rows']} | {r['rank']} | {r['dim']} | {r['table_mb']:.0f} | {r['read_rows_s']:,.0f} | "
                f"{r['score_rows_s']:,.0f} | {r['ratio']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
