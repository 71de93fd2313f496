"""`dataworth` console script: run the valuation, open the UIs, audit a valuation.

dataworth run            stage landing files (seeding the embedded corpus) and value what is stale
dataworth ui             Dagster UI on the state folder's instance (localhost)
dataworth mlflow-ui      MLflow UI on the tracking store: $MLFLOW_TRACKING_URI, else the state folder's (localhost)
dataworth audit ID       lineage of a valuation (--json, --verify)
"""

import argparse
import os
import sys
import time
from pathlib import Path

from resources.state import PROJECT_ROOT, dagster_home, dataworth_home

# Dagster waits 180 s by default for a code server to load the definitions; the first start on a busy
# 2-core machine (cold imports of torch, transformers, mlflow) can take longer, and `dagster dev` then exits.
CODE_SERVER_STARTUP_TIMEOUT_S = 600
DAGSTER_YAML = f"""telemetry:
  enabled: false
code_servers:
  local_startup_timeout: {CODE_SERVER_STARTUP_TIMEOUT_S}
"""


def use_state_folder() -> None:
    """Point Dagster at `$DATAWORTH_HOME/dagster` (runs of the CLI and the UI share one instance).

    Writes its dagster.yaml on first use; one written by an older version gets the code-server startup
    timeout added (a timeout the user set is kept, as is every other key).
    """
    import yaml

    home = dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
        return
    text = config.read_text()
    current = yaml.safe_load(text) or {}
    if not isinstance(current, dict):
        return  # not ours to fix: Dagster reports a malformed dagster.yaml itself
    servers = current.get("code_servers")
    if servers is None:  # append, keeping the user's comments and layout
        block = f"code_servers:\n  local_startup_timeout: {CODE_SERVER_STARTUP_TIMEOUT_S}\n"
        config.write_text(text + ("" if text.endswith("\n") or not text else "\n") + block)
    elif isinstance(servers, dict) and "local_startup_timeout" not in servers:
        servers["local_startup_timeout"] = CODE_SERVER_STARTUP_TIMEOUT_S
        config.write_text(yaml.safe_dump(current, sort_keys=False))


def plan_runs(instance, settings, versions: dict[str, str]) -> list:
    """Stage the landing folder, register its new shards as partitions, and return `stale_work`."""
    from assets.partitions import shard_partitions
    from domain.staging import stage_landing
    from pipelines.automation import stale_work
    from resources.delta import DeltaStore

    staged = stage_landing(settings, set(instance.get_dynamic_partitions(shard_partitions.name)), wait=True)
    if staged.seeded:
        print(f"seeded the embedded corpus into {staged.folder}")
    for line in staged.plan.report():  # every landing entry not simply staged, and why (folder: staged.folder)
        print(line, file=sys.stderr if line.startswith("quarantined") else sys.stdout)
    if staged.new_shards:
        instance.add_dynamic_partitions(shard_partitions.name, staged.new_shards)
        print(f"staged {len(staged.plan.batches)} batch(es): {len(staged.new_shards)} new shard(s)")
    return stale_work(instance, DeltaStore(), versions, settings=settings)


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
        from domain.valuation import summary_lines

        vid = latest_row(delta, "valuation_provenance")["valuation_id"]
        table = delta.read("provider_valuations", where={"valuation_id": vid})
        if "verdict" in table.columns:  # a valuation written before the nats unit has no verdict: skip it
            print(f"\nvaluation {vid} (MLflow run {table['mlflow_run_id'][0]}):")
            print("\n".join(summary_lines(table)))
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
    """`dagster dev` on the state folder's instance, stopped with everything it started on Ctrl-C or SIGTERM."""
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
    return run_process_group(command, cwd=PROJECT_ROOT)


def run_process_group(command: list[str], cwd: Path | None = None, grace_s: float = 60.0) -> int:
    """Run `command` in its own process group until it exits; return its exit code.

    The first SIGINT, SIGTERM or SIGHUP is forwarded as SIGINT to the command alone (`dagster dev` then stops
    its webserver, daemon and code servers in order). If the command has not exited `grace_s` later, or a
    second signal arrives, the whole group gets SIGTERM, and SIGKILL 10 s after that. Whatever is left of the
    group once the command has exited (a code server, a run worker) gets SIGTERM, then SIGKILL: nothing started
    here outlives this function.
    """
    import signal
    import subprocess

    deadline: list[float] = []  # when to escalate; set by the first signal
    child: list[subprocess.Popen] = []

    def forward(signum, _frame) -> None:
        if not deadline:
            name = signal.Signals(signum).name
            print(f"\n{name}: stopping {Path(command[0]).name} (again to stop at once)...", file=sys.stderr)
            deadline.append(time.monotonic() + grace_s)
            if child:
                _signal_group(child[0].pid, signal.SIGINT, leader_only=True)
        else:
            deadline[0] = min(deadline[0], time.monotonic())

    # Handlers go in before the spawn: a signal handled here is reset to its default in the child, whereas an
    # ignored one (SIGINT in a background job of a script) would stay ignored and `dagster dev` deaf to it.
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        child.append(subprocess.Popen(command, cwd=cwd, start_new_session=True))
        if deadline:  # a signal arrived while spawning
            _signal_group(child[0].pid, signal.SIGINT, leader_only=True)
        escalation = [signal.SIGTERM, signal.SIGKILL]
        while child[0].poll() is None:
            if deadline and time.monotonic() >= deadline[0] and escalation:
                _signal_group(child[0].pid, escalation.pop(0))
                deadline[0] = time.monotonic() + 10
            time.sleep(0.2)
    finally:
        if child:
            _end_group(child[0].pid)
            if child[0].poll() is None:
                child[0].kill()
                child[0].wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = child[0].returncode
    return code if code >= 0 else 128 - code


def _signal_group(pgid: int, signum: int, leader_only: bool = False) -> None:
    try:
        os.kill(pgid, signum) if leader_only else os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list:
    import psutil

    members = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _end_group(pgid: int, wait_s: float = 10.0) -> None:
    """SIGTERM the group's live members, then SIGKILL those still alive after `wait_s`."""
    import psutil

    members = _group_members(pgid)
    if not members:
        return
    print(f"stopping {len(members)} leftover process(es): {'; '.join(map(_describe, members))}", file=sys.stderr)
    for process in members:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(members, timeout=wait_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=wait_s)


def _describe(process) -> str:
    try:
        return " ".join(process.cmdline())[:100] or process.name()
    except Exception:
        return str(process.pid)


def mlflow_ui(args) -> int:
    from resources.tracking import MlflowTracker

    store = MlflowTracker().resolved_tracking_uri()
    command = [tool("mlflow"), "ui", "--backend-store-uri", store, "--host", args.host, "--port", str(args.port)]
    return run_process_group(command)


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
    sub.add_argument("--sample", type=at_least_one, default=4, help="queries recomputed by --verify (>= 1)")
    sub.set_defaults(func=audit)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:  # a settings problem is the operator's to fix: one line, no traceback
        from domain.settings import SettingsError

        if not isinstance(error, SettingsError):
            raise
        print(f"dataworth: {error}", file=sys.stderr)
        return 2


def at_least_one(text: str) -> int:
    """argparse type of --sample: a whole number >= 1 (0 would verify nothing and pass)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
