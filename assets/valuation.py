"""valuation_queries, influence_scores and provider_valuations: from preconditioned queries to value."""

import base64
import io
import json
from datetime import UTC, datetime

import dagster as dg
import polars as pl

from assets.checks import schema_result, schema_spec
from assets.metadata import commit_metadata, upstream_versions
from assets.partitions import shard_partitions
from assets.split import split_steps
from assets.steps import step_tags
from domain.artifacts import latest_row, load_model, load_projection
from domain.queries import queries_version, query_rows, read_prompts
from domain.report import valuation_report
from domain.scoring import (
    PARTIALS,
    VALUATION_INPUTS,
    merge_partials,
    partial_frame,
    score_valuation,
    valuation_provenance,
)
from domain.settings import Settings
from domain.staging import shard_groups
from domain.valuation import (
    VALUE_LABEL,
    provider_chart,
    provider_valuation,
    score_rows,
    tracking_metrics,
    tracking_params,
    valuation_id,
    value_markdown,
)
from resources.delta import DeltaStore, run_metadata
from resources.state import reports_dir
from resources.tracking import MlflowTracker

VALUATION_DEPS = ("projected_gradients", "hessian_factors", "valuation_queries")


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    """The valuation group's assets, their code versions taken from `settings`."""

    @dg.asset(
        op_tags=step_tags(settings.deployment, gpu=True),
        deps=["model_checkpoint", "gradient_projection"],
        code_version=queries_version(settings),
        check_specs=[schema_spec("valuation_queries")],
        group_name="valuation",
        kinds={"pytorch", "delta"},
    )
    def valuation_queries(context: dg.AssetExecutionContext, delta: DeltaStore) -> dg.MaterializeResult:
        """Prompts, their measured completions (the file's reference, else greedy), losses and projected gradients."""
        prompts = read_prompts(settings.queries_path())
        model, tokenizer, model_row = load_model(delta)
        projection, projection_row = load_projection(delta, model_row["checkpoint_hash"])
        upstream = upstream_versions(delta, "model_checkpoint", "gradient_projection")
        rows = query_rows(model, tokenizer, projection, settings, prompts).with_columns(
            projection_hash=pl.lit(projection_row["projection_hash"]), model_hash=pl.lit(model_row["checkpoint_hash"])
        )
        empty = rows.filter(pl.col("completion_tokens") == 0)["query_id"].to_list()
        if empty:
            context.log.warning(f"queries {empty} got an empty completion: their gradient is zero")
        version = delta.write("valuation_queries", rows, mode="overwrite", metadata=commit_metadata(context, upstream))
        preview = "\n".join(
            f"| {q} | {g or ''} | {'reference' if r else 'greedy'} | {p[:40]!r} | {c[:40]!r} | {n} | {loss:.2f} |"
            for q, g, r, p, c, n, loss in rows.select(
                "query_id", "query_group", "reference", "prompt", "completion", "completion_tokens", "loss"
            )
            .head(10)
            .iter_rows()
        )
        return dg.MaterializeResult(
            metadata={
                "queries": rows.height,
                "reference_completions": int(rows["reference"].sum()),
                "empty_completions": len(empty),
                "mean_query_loss_nats": float(rows["loss"].mean()),
                "delta_version": version,
                "preview": dg.MetadataValue.md(
                    "| query | group | completion | prompt | completion text | tokens | loss (nats) |\n"
                    "|---|---|---|---|---|---|---|\n" + preview
                ),
            },
            check_results=[schema_result(delta, "valuation_queries")],
        )

    scores, workers = settings.scores, settings.deployment.scoring_workers
    scores_version = settings.version("curvature", "scores")

    def current_valuation(context: dg.OpExecutionContext, delta: DeltaStore) -> tuple[dict, str]:
        """(provenance, valuation id) of scoring the current table versions and shards: every scoring step
        derives it alike, so a table that changes between the steps shows as a part of another valuation."""
        shards = sorted(context.instance.get_dynamic_partitions(shard_partitions.name))
        versions = upstream_versions(delta, *VALUATION_INPUTS)  # every read is of these versions
        provenance = valuation_provenance(delta, versions, shards, settings, scores_version)
        return provenance, valuation_id(provenance)

    def score_group(context: dg.OpExecutionContext, delta: DeltaStore, part: int) -> None:
        """Score one contiguous group of shards (`shard_groups`) and write its partial result."""
        provenance, vid = current_valuation(context, delta)
        group = shard_groups(provenance["shards"], workers)[part]
        if not group:
            context.log.info(f"part {part} of {workers} has no shard to score")
            return
        scored = score_valuation(
            delta,
            provenance["tables"],
            group,
            settings.curvature,
            normalize=scores.normalize,
            top_k=scores.top_k,
            block_rows=scores.block_rows,
            readers=settings.deployment.shard_readers,
        )
        meta = run_metadata(context.run_id, scores_version, provenance["tables"])
        where = {"valuation_id": vid, "part": f"{part:04d}"}
        delta.replace(PARTIALS, partial_frame(vid, part, group, scored), where, metadata=meta)
        context.log.info(f"part {part}: {scored.rows.height} rows of {len(group)} shard(s) in {scored.seconds:.1f}s")

    def merge_scores(context: dg.OpExecutionContext, delta: DeltaStore):
        """Merge the parts (exact: top-k of top-k's, sums add) and commit the valuation."""
        provenance, vid = current_valuation(context, delta)
        scored = merge_partials(delta, vid, provenance, workers, scores.top_k)
        rows = score_rows(vid, scored, scores.top_k)
        meta = run_metadata(context.run_id, scores_version, provenance["tables"])
        training_rows, rate = scored.rows.height, scored.rows.height / max(scored.seconds, 1e-9)
        record = pl.DataFrame(
            {
                "valuation_id": [vid],
                "provenance": [json.dumps(provenance, sort_keys=True)],
                "dagster_run_id": [context.run_id],
                "training_rows": [training_rows],
                "queries": [len(scored.query_ids)],
                "scoring_seconds": [scored.seconds],
                "rows_per_second": [rate],
                "created_at": [datetime.now(UTC)],
            }
        )
        # provenance first: a crash between the two commits leaves a valuation that every reader sees as
        # incomplete (stale_work redoes it, the audit refuses it), never score rows that nothing knows
        delta.replace("valuation_provenance", record, {"valuation_id": vid}, metadata=meta)
        delta.replace("influence_scores", rows, {"valuation_id": vid}, metadata=meta)
        yield dg.Output(
            None,
            "influence_scores",
            metadata={
                "valuation_id": vid,
                "training_rows": training_rows,
                "queries": len(scored.query_ids),
                "documents": len(scored.docs),
                "scoring_workers": workers,
                "rows_per_second": round(rate, 1),  # per worker: rows over the workers' summed seconds
                "score_rows": rows.height,
            },
        )
        for table in ("influence_scores", "valuation_provenance", PARTIALS):
            yield schema_result(delta, table, {"valuation_id": vid})

    checks = [
        schema_spec("influence_scores"),
        schema_spec("valuation_provenance", asset="influence_scores"),
        schema_spec(PARTIALS, asset="influence_scores"),
    ]
    tags = step_tags(settings.deployment)
    compose = split_steps(
        "influence_scores",
        workers,
        VALUATION_DEPS,
        checks,
        part=("score_part", score_group, tags),
        finish=("merge_scores", merge_scores, tags),
        whole="score",
    )

    @dg.graph_multi_asset(
        outs={
            "influence_scores": dg.AssetOut(
                code_version=scores_version,
                group_name="valuation",
                kinds={"pytorch", "delta"},
                dagster_type=dg.Nothing,
                description="Per query: top-k training sequences and documents; per document: total over "
                "queries. Scored by `[deployment] scoring_workers` steps over groups of shards, then merged.",
            )
        },
        ins={name: dg.AssetIn(dagster_type=dg.Nothing) for name in VALUATION_DEPS},
        check_specs=checks,
    )
    def influence_scores(projected_gradients, hessian_factors, valuation_queries):
        return compose(
            projected_gradients=projected_gradients,
            hessian_factors=hessian_factors,
            valuation_queries=valuation_queries,
        )

    @dg.asset(
        op_tags=step_tags(settings.deployment),
        deps=["influence_scores"],
        code_version=settings.version("scores"),
        check_specs=[schema_spec("provider_valuations")],
        group_name="valuation",
        kinds={"delta", "mlflow"},
    )
    def provider_valuations(
        context: dg.AssetExecutionContext, delta: DeltaStore, mlflow: MlflowTracker
    ) -> dg.MaterializeResult:
        """Per provider: predicted rise of the mean query loss if its data were removed (nats, % of the loss,
        per token), signed share, 95% bootstrap interval and verdict, fraction of queries helped."""
        record = latest_row(delta, "valuation_provenance")
        vid, provenance = record["valuation_id"], json.loads(record["provenance"])
        table, groups = provider_valuation(
            delta,
            vid,
            provenance,
            record["training_rows"],
            bootstrap_samples=settings.scores.bootstrap_samples,
            seed=settings.queries.seed,
        )
        normalized = provenance["scores"]["normalize"] != "none"
        unit = f"{VALUE_LABEL} [normalize={provenance['scores']['normalize']}: not nats]" if normalized else VALUE_LABEL
        figure = provider_chart(table, f"Provider value, valuation {vid}", unit)
        tags = {"dagster_run_id": context.run_id, "valuation_id": vid}
        params = tracking_params(vid, provenance, record["queries"])
        with mlflow.run(f"valuation-{vid}", params=params, tags=tags, replaces="valuation_id") as run:
            run.log_metrics(
                {
                    "scoring_rows_per_second": record["rows_per_second"],
                    "training_rows": record["training_rows"],
                    "providers": table.height,
                    **tracking_metrics(table),
                }
            )
            run.log_figure(figure, "provider_valuations.png")
            run.log_dict(provenance, "provenance.json")
            run.log_dict({"providers": table.to_dicts(), "by_query_group": groups.to_dicts()}, "provider_values.json")
            run_id = run.run_id
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=80)
        rows = table.with_columns(valuation_id=pl.lit(vid), mlflow_run_id=pl.lit(run_id))
        upstream = {**provenance["tables"], "influence_scores": delta.version("influence_scores")}
        version = delta.replace(
            "provider_valuations", rows, {"valuation_id": vid}, metadata=commit_metadata(context, upstream)
        )
        report = reports_dir() / f"{vid}.html"  # the page a person can forward, also in the MLflow run
        report.write_text(valuation_report(delta, mlflow, vid, image.getvalue(), unit=unit), encoding="utf-8")
        mlflow.log_artifact(run_id, report)
        chart = base64.b64encode(image.getvalue()).decode()
        return dg.MaterializeResult(
            metadata={
                "valuation_id": vid,
                "mlflow_run_id": run_id,
                "providers": table.height,
                "mean_query_loss_nats": float(table["mean_query_loss"][0]),
                "delta_version": version,
                "unit": unit,
                "report": dg.MetadataValue.path(str(report)),
                "top_providers": dg.MetadataValue.md(value_markdown(table)),
                **(
                    {"by_query_group": dg.MetadataValue.md(value_markdown(groups, by_group=True))}
                    if groups.height
                    else {}
                ),
                "chart (picture)": dg.MetadataValue.md(f"![provider value](data:image/png;base64,{chart})"),
            },
            check_results=[schema_result(delta, "provider_valuations", {"valuation_id": vid})],
        )

    return [valuation_queries, influence_scores, provider_valuations]
