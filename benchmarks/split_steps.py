"""Capture and scoring split over workers (`[deployment] capture_workers`, `scoring_workers`): wall time.

On a valued state folder (the quick start's), re-materializes `projected_gradients` (every shard, one run)
and `influence_scores` with the multiprocess executor, once per worker count, and reports each run's wall
time and its steps' summed time. The rows are the same whatever the split (tests/test_pipeline.py); this
measures what the split costs or gains on this machine. Ratios are within this run.

    DATAWORTH_HOME=<valued state folder> .venv/bin/python benchmarks/split_steps.py [--workers 1 2] [--output PATH]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import torch

from domain.settings import Settings
from pipelines.cli import use_state_folder
from resources.state import dataworth_home

ASSETS = ("projected_gradients", "influence_scores")


def timed_run(instance: dg.DagsterInstance, shards: list[str]) -> tuple[float, dict[str, float]]:
    """(wall seconds, asset -> summed seconds of its steps) of one run of ASSETS over every shard."""
    from pipelines.definitions import valuation_job

    tags = {"dagster/asset_partition_range_start": shards[0], "dagster/asset_partition_range_end": shards[-1]}
    started = time.perf_counter()
    result = dg.execute_job(
        dg.reconstructable(valuation_job), instance, tags=tags, asset_selection=[dg.AssetKey(a) for a in ASSETS]
    )
    wall = time.perf_counter() - started
    if not result.success:
        raise RuntimeError(f"run {result.run_id} failed")
    steps: dict[str, float] = {}
    for event in result.all_events:
        if event.event_type_value == "STEP_SUCCESS":
            asset = event.step_key.split(".")[0]
            steps[asset] = steps.get(asset, 0.0) + event.event_specific_data.duration_ms / 1000
    return wall, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--output", type=Path, help="append the Markdown table to this file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one count, in this process
    args = parser.parse_args()
    use_state_folder()  # the state folder's Dagster instance, as `dataworth run` uses it
    if args.one:  # the job must be built from the settings its step processes load: one count per process
        instance = dg.DagsterInstance.get()
        wall, steps = timed_run(instance, sorted(instance.get_dynamic_partitions("shards")))
        print(json.dumps({"wall": wall, "steps": steps}))
        return
    current = Path(os.environ.get("DATAWORTH_SETTINGS") or dataworth_home() / "settings.toml")
    text = current.read_text() if current.exists() else ""
    if "[deployment]" in text:
        parser.error(f"{current} has a [deployment] section; run on settings without one")
    rows, folder = [], Path(tempfile.mkdtemp())
    for workers in args.workers:
        path = folder / f"settings-{workers}.toml"
        path.write_text(f"{text}\n[deployment]\ncapture_workers = {workers}\nscoring_workers = {workers}\n")
        env = {**os.environ, "DATAWORTH_SETTINGS": str(path)}
        done = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{workers} worker(s): {done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((workers, result["wall"], result["steps"]))
        print(f"workers {workers}: run {result['wall']:.1f} s, steps {result['steps']}", flush=True)
    shards = len(dg.DagsterInstance.get().get_dynamic_partitions("shards"))
    first = rows[0][1]
    lines = [
        f"## Capture and scoring split over workers ({datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__})",
        "",
        f"`DATAWORTH_HOME=<quick start state> .venv/bin/python benchmarks/split_steps.py --workers "
        f"{' '.join(map(str, args.workers))}`: {shards} shards; one run of projected_gradients and "
        f"influence_scores per worker count, multiprocess executor (`max_concurrent` "
        f"{Settings.load(path).deployment.max_concurrent}). Step seconds are summed over the asset's steps.",
        "",
        "| workers (capture = scoring) | run seconds | speed-up | projected_gradients steps (s) | influence_scores steps (s) |",
        "|---|---|---|---|---|",
        *(
            f"| {w} | {wall:.1f} | {first / wall:.2f}x | {s.get('projected_gradients', 0):.1f} | "
            f"{s.get('influence_scores', 0):.1f} |"
            for w, wall, s in rows
        ),
    ]
    print("\n".join(lines))
    if args.output:
        with args.output.open("a") as out:
            out.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
