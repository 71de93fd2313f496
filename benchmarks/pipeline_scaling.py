"""End-to-end time of the embedded valuation, per asset, as the corpus and the rank grow.

Each configuration materializes the real asset graph (in process, so the times are the assets'
own, without process start-up) in a fresh temporary DATAWORTH_HOME on a fraction of the embedded
corpus, and reads each step's duration from the Dagster event log. The embedded model's training
steps are fixed (a constant cost); everything else should grow linearly with the corpus.

    .venv/bin/python benchmarks/pipeline_scaling.py [--fractions 0.25 0.5 1.0] [--ranks 8 16 32]
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

from pipelines.automation import ALL as ASSETS  # every asset of the valuation job, in graph order

SETTINGS = """
[model]
train_steps = {steps}
[projection]
rank_in = {rank}
rank_out = {rank}
exclude = ["lm_head"]
[corpus]
seed_embedded_corpus = false
"""


def subsample_corpus(landing: Path, fraction: float) -> int:
    """Copy the first `fraction` of each embedded provider's documents into `landing`; returns documents."""
    from domain.staging import EMBEDDED_CORPUS

    total = 0
    for path in sorted(EMBEDDED_CORPUS.glob("*.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = lines[: max(1, round(len(lines) * fraction))]
        (landing / path.name).write_text("\n".join(kept) + "\n", encoding="utf-8")
        total += len(kept)
    return total


def run_once(fraction: float, rank: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        os.environ["DATAWORTH_HOME"] = home
        settings_file = Path(home) / "settings.toml"
        settings_file.write_text(SETTINGS.format(steps=steps, rank=rank))
        os.environ["DATAWORTH_SETTINGS"] = str(settings_file)
        import dagster as dg

        from domain.settings import Settings
        from domain.staging import plan_landing
        from pipelines.definitions import build_definitions
        from resources.delta import DeltaStore

        landing = Path(home) / "landing"
        landing.mkdir()
        documents = subsample_corpus(landing, fraction)
        settings = Settings.load()
        instance = dg.DagsterInstance.ephemeral()
        shards = plan_landing(landing, settings.corpus.docs_per_shard).shard_ids
        instance.add_dynamic_partitions("shards", shards)
        job = build_definitions(settings).resolve_job_def("valuation")
        result = job.execute_in_process(
            instance=instance,
            tags={"dagster/asset_partition_range_start": shards[0], "dagster/asset_partition_range_end": shards[-1]},
        )
        assert result.success
        seconds = {}  # asset -> seconds of its steps (a graph asset's capture, scoring and merge steps add up)
        for e in result.all_events:
            if e.event_type_value == "STEP_SUCCESS":
                asset = e.step_key.split(".")[0]
                seconds[asset] = seconds.get(asset, 0.0) + e.event_specific_data.duration_ms / 1000
        tokens = int(DeltaStore().read("token_shards", columns=["n_tokens"])["n_tokens"].sum())
    return {"fraction": fraction, "rank": rank, "documents": documents, "tokens": tokens, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32], help="ranks run at the middle fraction")
    parser.add_argument("--steps", type=int, default=60, help="embedded model training steps (a fixed cost)")
    args = parser.parse_args()
    runs = [run_once(f, 16, args.steps) for f in args.fractions]
    middle = args.fractions[len(args.fractions) // 2]
    runs += [run_once(middle, r, args.steps) for r in args.ranks if r != 16]
    header = "| corpus | rank | tokens | " + " | ".join(ASSETS) + " | total |"
    print(header + "\n|" + "---:|" * (header.count("|") - 1))
    for r in runs:
        cells = [f"{r['seconds'].get(a, 0):.1f}" for a in ASSETS]
        print(
            f"| {r['fraction']:.0%} ({r['documents']} docs) | {r['rank']} | {r['tokens']:,} | "
            + " | ".join(cells)
            + f" | {sum(r['seconds'].values()):.1f} |"
        )
    print(
        "\nseconds per asset step; capture tokens/s: "
        + ", ".join(
            f"{r['fraction']:.0%}/r{r['rank']}: {r['tokens'] / r['seconds']['projected_gradients']:,.0f}" for r in runs
        )
    )
    Path(tempfile.gettempdir(), "pipeline_scaling.json").write_text(json.dumps(runs))


if __name__ == "__main__":
    main()
