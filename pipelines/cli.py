"""`dataworth` console script: run the valuation, open the UIs, audit a valuation.

dataworth run            stage landing files (seeding the embedded corpus) and value what is stale
dataworth ui             Dagster UI on the state folder's instance (localhost)
dataworth mlflow-ui      MLflow UI on the state folder's store (localhost)
dataworth audit ID       lineage of a valuation (--json, --verify)
"""

import argparse
import os
import sys
import time
from pathlib import Path

from resources.state import PROJECT_ROOT, dagster_home, dataworth_home, mlflow_dir

DAGSTER_YAML = """telemetry:
  enabled: false
"""


def use_state_folder() -> None:
    """Point Dagster at `$DATAWORTH_HOME/dagster` (runs of the CLI and the UI share one instance)."""
    home = dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)


def plan_runs(instance, settings, versions: dict[str, str]) -> list:
    """Stage the landing folder, register its new shards as partitions, and return `stale_work`."""
    from assets.partitions import shard_partitions
    from domain.staging import stage_landing
    from pipelines.automation import stale_work
    from resources.delta import DeltaStore

    staged = stage_landing(settings, set(instance.get_dynamic_partitions(shard_partitions.name)))
    if staged.seeded:
        print(f"seeded the embedded corpus into {staged.folder}")
    for name, reason in staged.plan.quarantined.items():
        print(f"quarantined {name} (see {staged.folder / '_rejected'}): {reason}", file=sys.stderr)
    if staged.plan.already_ingested:
        print(
            f"already ingested, moved to {staged.folder / '_already_ingested'}: "
            f"{', '.join(staged.plan.already_ingested)}"
        )
    if staged.new_shards:
        instance.add_dynamic_partitions(shard_partitions.name, staged.new_shards)
        print(f"staged {len(staged.plan.batches)} batch(es): {len(staged.new_shards)} new shard(s)")
    return stale_work(instance, DeltaStore(), versions)


def run(_args) -> int:
    use_state_folder()
    import dagster as dg

    from domain.settings import Settings
    from pipelines.automation import RANGE_END, RANGE_START, REASON_TAG, active_run, code_versions
    from pipelines.definitions import defs, valuation_job

    instance = dg.DagsterInstance.get()
    if busy := active_run(instance, lambda message: print(message, file=sys.stderr)):
        print(
            f"valuation run {busy} is in progress; wait for it to end, "
            "or terminate it in the Dagster UI (dataworth ui), then run again",
            file=sys.stderr,
        )
        return 1
    requests = plan_runs(instance, Settings.load(), code_versions(defs.assets))
    if not requests:
        print("nothing is stale: the latest valuation is up to date")
    for req in requests:
        started = time.perf_counter()
        selection = ", ".join(k.path[-1] for k in req.asset_selection)
        shards = f" over shards {req.tags[RANGE_START]} .. {req.tags[RANGE_END]}" if RANGE_START in req.tags else ""
        print(f"{req.tags[REASON_TAG]}: materializing {selection}{shards}", flush=True)
        result = dg.execute_job(
            dg.reconstructable(valuation_job), instance, tags=req.tags, asset_selection=req.asset_selection
        )
        if not result.success:
            print(f"run {result.run_id} failed; open the Dagster UI (dataworth ui) to see why", file=sys.stderr)
            return 1
        print(f"run {result.run_id} succeeded in {time.perf_counter() - started:.0f} s")
    print_summary()
    return 0


def print_summary() -> None:
    from resources.delta import DeltaStore

    delta = DeltaStore()
    if delta.exists("provider_valuations"):
        from domain.artifacts import latest_row

        vid = latest_row(delta, "valuation_provenance")["valuation_id"]
        table = delta.read("provider_valuations", where={"valuation_id": vid}).sort("total_value", descending=True)
        print(f"\nvaluation {vid} (MLflow run {table['mlflow_run_id'][0]}):")
        for p, total, share, lo, hi in table.select(
            "provider_id", "total_value", "share", "ci_low", "ci_high"
        ).iter_rows():
            print(
                f"  {p:<14} total {total:+.4g}  share of positive value {share:6.1%}  "
                f"95% interval [{lo:+.3g}, {hi:+.3g}]"
            )
    print(
        f"\nState folder: {dataworth_home()}\n"
        f"Dagster UI:  cd {PROJECT_ROOT} && .venv/bin/dataworth ui          -> http://127.0.0.1:3000\n"
        f"MLflow UI:   cd {PROJECT_ROOT} && .venv/bin/dataworth mlflow-ui   -> http://127.0.0.1:5000\n"
        f"Audit:       .venv/bin/dataworth audit <valuation-id> [--verify] [--json]"
    )


def tool(name: str) -> str:
    """A console script installed beside this interpreter (works without an activated venv)."""
    return str(Path(sys.executable).parent / name)


def ui(args) -> int:
    use_state_folder()
    command = [
        tool("dagster"),
        "dev",
        "-w",
        str(PROJECT_ROOT / "workspace.yaml"),
        "-h",
        args.host,
        "-p",
        str(args.port),
    ]
    os.execvp(command[0], command)


def mlflow_ui(args) -> int:
    store = f"sqlite:///{mlflow_dir() / 'mlflow.db'}"
    command = [tool("mlflow"), "ui", "--backend-store-uri", store, "--host", args.host, "--port", str(args.port)]
    os.execvp(command[0], command)


def audit(args) -> int:
    """Print the lineage (text or JSON); with --verify exit 1 on a deviation, 2 when an upstream is gone or changed."""
    import json

    from domain.audit import AuditError, lineage, to_text, verify
    from resources.delta import DeltaStore, DeltaStoreError
    from resources.tracking import MlflowTracker

    delta, tracker = DeltaStore(), MlflowTracker()
    try:
        report = lineage(delta, tracker, args.valuation_id)
    except (AuditError, DeltaStoreError) as error:
        print(f"audit failed: {error}", file=sys.stderr)
        return 2
    failure = None
    if args.verify:
        try:
            report["verify"] = verify(delta, args.valuation_id, args.sample)
        except (AuditError, DeltaStoreError) as error:
            failure = f"valuation {args.valuation_id} cannot be reproduced: {error}"
            report["verify"] = {"passed": False, "error": str(error)}
    print(json.dumps(report, indent=2, default=str) if args.json else to_text(report))
    if failure:
        print(f"audit failed: {failure}", file=sys.stderr)
        return 2
    if not report.get("verify", {}).get("passed", True):
        deviation = report["verify"]["max_relative_deviation"]
        print(
            f"audit failed: valuation {args.valuation_id} deviates by {deviation:.3g} (relative) "
            "from its recomputation",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dataworth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="stage landing files and value whatever is stale").set_defaults(func=run)
    for name, func, port in [("ui", ui, 3000), ("mlflow-ui", mlflow_ui, 5000)]:
        sub = commands.add_parser(name, help=f"serve the {name} on localhost")
        sub.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
        sub.add_argument("--port", type=int, default=port)
        sub.set_defaults(func=func)
    sub = commands.add_parser("audit", help="print the lineage of a valuation")
    sub.add_argument("valuation_id")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_argument("--verify", action="store_true", help="recompute a sample of scores from the stored tables")
    sub.add_argument("--sample", type=int, default=4, help="queries recomputed by --verify")
    sub.set_defaults(func=audit)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
