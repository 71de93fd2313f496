"""`dataworth audit <valuation-id>`: where a valuation came from, and whether it still reproduces.

The lineage comes from the valuation's provenance record (`valuation_provenance`), the commit
metadata of every upstream Delta table at the recorded version, and the MLflow run. `--verify`
re-reads those exact versions (Delta time travel), recomputes the provider x query sums of a sample
of queries from the stored gradients and factors, and reports the largest deviation.

Exit status: 0 ok; 1 the recomputation deviates beyond TOLERANCE; 2 the valuation is unknown, or an
upstream version is gone (vacuumed, log cleaned up) or changed (checkpoint or projection files).
`--json` prints the same report for machines (with `verify.error` when it could not run).
"""

import json

import polars as pl

from dataworth import CurvatureConfig, MismatchError, Projection
from domain.artifacts import checkpoint_files_hash, latest_row
from domain.scoring import score_valuation
from resources.delta import DeltaStore, DeltaStoreError, TableVersionMissing
from resources.tracking import MlflowTracker

TOLERANCE = 1e-4  # relative deviation above which --verify fails


class AuditError(Exception):
    """The valuation cannot be audited or does not reproduce; the message says what is wrong."""


def provenance_of(delta: DeltaStore, vid: str) -> dict:
    if not delta.exists("valuation_provenance"):
        raise AuditError("no valuation was ever recorded in this state folder (table valuation_provenance is missing)")
    rows = delta.read("valuation_provenance", where={"valuation_id": vid})
    if rows.height == 0:
        known = delta.read("valuation_provenance").sort("created_at")["valuation_id"].to_list()
        raise AuditError(f"unknown valuation id {vid!r}; the latest are {known[-5:]}")
    row = rows.sort("created_at").row(-1, named=True)
    return {**row, "provenance": json.loads(row["provenance"])}


def lineage(delta: DeltaStore, tracker: MlflowTracker, vid: str) -> dict:
    """Everything a person needs to trace valuation `vid`; data a vacuum removed is listed under `unavailable`."""
    record = provenance_of(delta, vid)
    prov = record["provenance"]
    versions = prov["tables"]
    if (
        not delta.exists("influence_scores")
        or delta.read("influence_scores", columns=["valuation_id"], where={"valuation_id": vid}).is_empty()
    ):
        raise AuditError(
            f"valuation {vid} is incomplete: its provenance was recorded but its influence_scores rows never landed "
            "(the run was killed between the two commits); `dataworth run` recomputes it"
        )
    tables = {}
    for table, version in versions.items():
        commit = delta.commit_metadata(table, version) if version is not None else {}
        tables[table] = {
            "version": version,
            "dagster_run_id": commit.get("dagster_run_id"),
            "code_version": commit.get("code_version"),
        }
    unavailable = []
    try:
        model = latest_row(delta, "model_checkpoint", versions["model_checkpoint"])
    except TableVersionMissing as error:
        model = {}
        unavailable.append(str(error))
    try:
        queries = (
            delta.read(
                "valuation_queries", version=versions["valuation_queries"], columns=["query_id", "prompt", "completion"]
            )
            .sort("query_id")
            .to_dicts()
        )
    except TableVersionMissing as error:
        queries = []
        unavailable.append(str(error))
    valuations = (
        delta.read("provider_valuations", where={"valuation_id": vid})
        if delta.exists("provider_valuations")
        else pl.DataFrame()
    )
    run_id = valuations["mlflow_run_id"][0] if valuations.height else None
    return {
        "valuation_id": vid,
        "created_at": str(record["created_at"]),
        "dagster_run_id": record["dagster_run_id"],
        "code_version": prov["code_version"],
        "tables": tables,
        "model": {
            "checkpoint_hash": prov["model_hash"],
            "path": model.get("path"),
            "adapter_path": model.get("adapter_path") or None,
            "source": model.get("source"),
            "training_mlflow_run_id": model.get("mlflow_run_id") or None,
        },
        "projection": {"hash": prov["projection_hash"], "config": prov["projection"]},
        "curvature": prov["curvature"],
        "scores": prov["scores"],
        "query_settings": prov["queries"],
        "queries": queries,
        "shards": prov["shards"],
        "mlflow": tracker.get_run(run_id) if run_id else None,
        "unavailable": unavailable,
    }


def verify(delta: DeltaStore, vid: str, sample: int) -> dict:
    """Recompute the provider x query sums of the first `sample` queries from the recorded table versions
    with the same scoring function the asset ran; raise AuditError on any gap."""
    prov = provenance_of(delta, vid)["provenance"]
    versions, scores = prov["tables"], prov["scores"]
    for table, version in sorted(versions.items()):  # every data file of every recorded version is still there
        if version is None:
            continue
        try:
            missing = delta.missing_files(table, version)
        except DeltaStoreError as error:
            raise AuditError(f"an upstream of valuation {vid} is gone or changed: {error}") from error
        if missing:
            cause = (
                "deleted outside dataworth"
                if version == delta.version(table)
                else "vacuumed (or deleted outside dataworth) after newer versions replaced them"
            )
            raise AuditError(
                f"version {version} of Delta table {table!r}, which valuation {vid} read, lists {len(missing)} data "
                f"file(s) that are gone ({', '.join(m.rsplit('/', 1)[-1] for m in missing[:3])}); they were {cause}. "
                f"Bring them back from a backup (or restore the table to a version whose files are all there, with "
                f"Delta time travel) to audit it; `dataworth run` re-materializes the table"
            )
    try:
        model = latest_row(delta, "model_checkpoint", versions["model_checkpoint"])
        if checkpoint_files_hash(model) != prov["model_hash"]:
            adapter = f" (with the adapter at {model['adapter_path']})" if model["adapter_path"] else ""
            raise AuditError(
                f"the checkpoint files at {model['path']}{adapter} changed: they no longer hash to "
                f"{prov['model_hash'][:12]}"
            )
        proj_row = latest_row(delta, "gradient_projection", versions["gradient_projection"])
        if Projection.load(proj_row["path"]).content_hash() != prov["projection_hash"]:
            raise AuditError(
                f"the projection files at {proj_row['path']} changed: "
                f"they no longer hash to {prov['projection_hash'][:12]}"
            )
        query_ids = delta.read("valuation_queries", version=versions["valuation_queries"], columns=["query_id"])
        picked = sorted(query_ids["query_id"].to_list())[:sample]
        scored = score_valuation(
            delta,
            versions,
            prov["shards"],
            CurvatureConfig(**prov["curvature"]),
            normalize=scores["normalize"],
            top_k=scores["top_k"],
            block_rows=scores["block_rows"],
            query_ids=picked,
        )
        stored = delta.read("influence_scores", where={"valuation_id": vid, "kind": "provider_query"})
    except (DeltaStoreError, FileNotFoundError, MismatchError) as error:
        raise AuditError(f"an upstream of valuation {vid} is gone or changed: {error}") from error
    expected = {(q, p): s for q, p, s in stored.select("query_id", "provider_id", "score").iter_rows()}
    worst, scale = 0.0, 0.0
    for q, query_id in enumerate(scored.query_ids):
        for p, provider in enumerate(scored.providers):
            if (query_id, provider) not in expected:
                raise AuditError(
                    f"influence_scores holds no provider x query sum of valuation {vid} for ({query_id}, {provider})"
                )
            recomputed = float(scored.result.group_sums["provider"][p, q])
            worst = max(worst, abs(recomputed - expected[query_id, provider]))
            scale = max(scale, abs(recomputed))
    relative = worst / scale if scale > 0 else worst
    return {
        "queries_recomputed": len(scored.query_ids),
        "max_abs_deviation": worst,
        "max_relative_deviation": relative,
        "tolerance": TOLERANCE,
        "passed": relative <= TOLERANCE,
    }


def to_text(report: dict) -> str:
    lines = [
        f"valuation {report['valuation_id']}  (created {report['created_at']}, Dagster run {report['dagster_run_id']})",
        f"code version: {report['code_version']}",
        "",
        "upstream Delta tables (version, written by Dagster run, code version):",
    ]
    for table, info in report["tables"].items():
        lines.append(f"  {table:<32} v{info['version']}  run {info['dagster_run_id']}  code {info['code_version']}")
    m, p, c = report["model"], report["projection"], report["curvature"]
    lines += ["", f"model checkpoint: {m['checkpoint_hash']} ({m['source']}) at {m['path']}"]
    if m.get("adapter_path"):
        lines.append(f"  with the LoRA adapter at {m['adapter_path']}")
    if m["training_mlflow_run_id"]:
        lines.append(f"  trained in MLflow run {m['training_mlflow_run_id']}")
    lines += [
        f"projection: {p['hash']}",
        f"  config: {json.dumps(p['config'], sort_keys=True)}",
        f"curvature: {c['kind']}, fisher {c['fisher']}, damping {c['damping']} ({c['damping_mode']})",
        f"scores: {json.dumps(report['scores'], sort_keys=True)}",
        f"shards: {len(report['shards'])}",
        f"queries ({len(report['queries'])}, {json.dumps(report['query_settings'], sort_keys=True)}):",
    ]
    lines += [f"  {q['query_id']}: {q['prompt']!r} -> {q['completion']!r}" for q in report["queries"]]
    lines += [f"unavailable: {reason}" for reason in report["unavailable"]]
    if report["mlflow"]:
        run = report["mlflow"]
        lines += ["", f"MLflow run {run['run_id']} ({run['status']}), params:"]
        lines += [f"  {k} = {v}" for k, v in sorted(run["params"].items())]
    if "verify" in report:
        v = report["verify"]
        if "error" in v:
            lines += ["", f"verify: FAILED: {v['error']}"]
        else:
            lines += [
                "",
                (
                    f"verify: recomputed {v['queries_recomputed']} queries from the recorded versions; "
                    "largest deviation "
                    f"{v['max_abs_deviation']:.3g} (relative {v['max_relative_deviation']:.3g}, "
                    f"tolerance {v['tolerance']:g}): "
                    f"{'PASSED' if v['passed'] else 'FAILED'}"
                ),
            ]
    return "\n".join(lines)
