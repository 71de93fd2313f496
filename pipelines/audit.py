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
import sys

import polars as pl
import torch

from assets.common import binary_to_gradients, frame_to_tensors, sql_in
from dataworth import (
    Curvature,
    CurvatureConfig,
    InfluenceScorer,
    MismatchError,
    Projection,
)
from pipelines.artifacts import latest_row
from pipelines.lm import checkpoint_hash
from resources.delta import DeltaStore, DeltaStoreError, TableVersionMissing
from resources.tracking import MlflowTracker

TOLERANCE = 1e-4  # relative deviation above which --verify fails


class AuditError(Exception):
    """The valuation cannot be audited or does not reproduce; the message says what is wrong."""


def provenance_of(delta: DeltaStore, vid: str) -> dict:
    if not delta.exists("valuation_provenance"):
        raise AuditError("no valuation was ever recorded in this state folder (table valuation_provenance is missing)")
    rows = delta.read("valuation_provenance", filter=f"valuation_id = '{vid.replace(chr(39), '')}'")
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
    tables = {}
    for table, version in versions.items():
        commit = delta.commit_metadata(table, version) if version is not None else {}
        tables[table] = {"version": version, "dagster_run_id": commit.get("dagster_run_id"), "code_version": commit.get("code_version")}
    unavailable = []
    try:
        model = latest_row(delta, "model_checkpoint", versions["model_checkpoint"])
    except TableVersionMissing as error:
        model = {}
        unavailable.append(str(error))
    try:
        queries = delta.read("valuation_queries", version=versions["valuation_queries"], columns=["query_id", "prompt", "completion"]).sort("query_id").to_dicts()
    except TableVersionMissing as error:
        queries = []
        unavailable.append(str(error))
    valuations = delta.read("provider_valuations", filter=f"valuation_id = '{vid}'") if delta.exists("provider_valuations") else pl.DataFrame()
    run_id = valuations["mlflow_run_id"][0] if valuations.height else None
    return {
        "valuation_id": vid,
        "created_at": str(record["created_at"]),
        "dagster_run_id": record["dagster_run_id"],
        "code_version": prov["code_version"],
        "tables": tables,
        "model": {"checkpoint_hash": prov["model_hash"], "path": model.get("path"), "source": model.get("source"),
                  "training_mlflow_run_id": model.get("mlflow_run_id") or None},
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
    """Recompute a sample of queries from the recorded table versions; raise AuditError on any gap."""
    prov = provenance_of(delta, vid)["provenance"]
    versions = prov["tables"]
    try:
        model = latest_row(delta, "model_checkpoint", versions["model_checkpoint"])
        if checkpoint_hash(model["path"]) != prov["model_hash"]:
            raise AuditError(f"the checkpoint files at {model['path']} changed: they no longer hash to {prov['model_hash'][:12]}")
        proj_row = latest_row(delta, "gradient_projection", versions["gradient_projection"])
        projection = Projection.load(proj_row["path"])
        if projection.content_hash() != prov["projection_hash"]:
            raise AuditError(f"the projection files at {proj_row['path']} changed: they no longer hash to {prov['projection_hash'][:12]}")
        queries = delta.read("valuation_queries", version=versions["valuation_queries"]).sort("query_id")
        factors = delta.read("hessian_factors", version=versions["hessian_factors"])
        grads = delta.read("projected_gradients", version=versions["projected_gradients"], filter=sql_in("shard_id", prov["shards"])).sort("seq_id")
        stored = delta.read("influence_scores", filter=f"valuation_id = '{vid}' AND kind = 'provider_query'")
    except (DeltaStoreError, FileNotFoundError, MismatchError) as error:
        raise AuditError(f"an upstream of valuation {vid} is gone or changed: {error}") from error
    if set(grads["shard_id"].unique().to_list()) != set(prov["shards"]):
        raise AuditError(f"projected_gradients v{versions['projected_gradients']} lacks some of the valuation's {len(prov['shards'])} shards")
    for frame, what in [(grads, "training gradients"), (queries, "query gradients")]:
        for column, expected in [("projection_hash", prov["projection_hash"]), ("model_hash", prov["model_hash"])]:
            if set(frame[column].unique().to_list()) != {expected}:
                raise AuditError(f"{what} at the recorded version were made with another {column.removesuffix('_hash')} than {expected[:12]}")

    config = CurvatureConfig(**prov["curvature"])
    curvature = Curvature.from_tensors(config.kind, projection.layout, frame_to_tensors(factors))
    picked = queries.head(sample)
    scorer = InfluenceScorer(binary_to_gradients(picked["gradient"]), curvature.preconditioner(config), prov["scores"]["normalize"])
    providers = grads["provider_id"].unique(maintain_order=True)
    codes = torch.tensor(grads["provider_id"].replace_strict(providers, range(len(providers)), return_dtype=pl.Int64).to_numpy())
    result = scorer.stream(binary_to_gradients(grads["gradient"]).split(4096), groups={"provider": codes}, top_k=1)
    expected = {(q, p): s for q, p, s in stored.select("query_id", "provider_id", "score").iter_rows()}
    worst, scale = 0.0, 0.0
    for q, query_id in enumerate(picked["query_id"].to_list()):
        for p, provider in enumerate(providers.to_list()):
            if (query_id, provider) not in expected:
                raise AuditError(f"influence_scores holds no provider x query sum of valuation {vid} for ({query_id}, {provider})")
            recomputed = float(result.group_sums["provider"][p, q])
            worst = max(worst, abs(recomputed - expected[query_id, provider]))
            scale = max(scale, abs(recomputed))
    relative = worst / scale if scale > 0 else worst
    return {"queries_recomputed": picked.height, "max_abs_deviation": worst, "max_relative_deviation": relative,
            "tolerance": TOLERANCE, "passed": relative <= TOLERANCE}


def to_text(report: dict) -> str:
    lines = [f"valuation {report['valuation_id']}  (created {report['created_at']}, Dagster run {report['dagster_run_id']})",
             f"code version: {report['code_version']}", "", "upstream Delta tables (version, written by Dagster run, code version):"]
    for table, info in report["tables"].items():
        lines.append(f"  {table:<32} v{info['version']}  run {info['dagster_run_id']}  code {info['code_version']}")
    m, p, c = report["model"], report["projection"], report["curvature"]
    lines += ["", f"model checkpoint: {m['checkpoint_hash']} ({m['source']}) at {m['path']}"]
    if m["training_mlflow_run_id"]:
        lines.append(f"  trained in MLflow run {m['training_mlflow_run_id']}")
    lines += [f"projection: {p['hash']}", f"  config: {json.dumps(p['config'], sort_keys=True)}",
              f"curvature: {c['kind']}, fisher {c['fisher']}, damping {c['damping']} ({c['damping_mode']})",
              f"scores: {json.dumps(report['scores'], sort_keys=True)}", f"shards: {len(report['shards'])}",
              f"queries ({len(report['queries'])}, {json.dumps(report['query_settings'], sort_keys=True)}):"]
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
            lines += ["", (f"verify: recomputed {v['queries_recomputed']} queries from the recorded versions; largest deviation "
                           f"{v['max_abs_deviation']:.3g} (relative {v['max_relative_deviation']:.3g}, tolerance {v['tolerance']:g}): "
                           f"{'PASSED' if v['passed'] else 'FAILED'}")]
    return "\n".join(lines)


def main(args) -> int:
    """Print the lineage (text or JSON); with --verify exit 1 on a deviation, 2 when an upstream is gone or changed."""
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
        print(f"audit failed: valuation {args.valuation_id} deviates by {report['verify']['max_relative_deviation']:.3g} (relative) from its recomputation", file=sys.stderr)
        return 1
    return 0
