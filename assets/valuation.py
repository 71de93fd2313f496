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
from domain.artifacts import latest_row, load_model, load_projection
from domain.queries import queries_version, query_rows, read_prompts
from domain.scoring import VALUATION_INPUTS, score_valuation
from domain.settings import Settings
from domain.valuation import provider_chart, provider_valuation, score_rows, tracking_params, valuation_id
from resources.delta import DeltaStore
from resources.tracking import MlflowTracker


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    """The valuation group's assets, their code versions taken from `settings`."""

    @dg.asset(
        deps=["model_checkpoint", "gradient_projection"],
        code_version=queries_version(settings),
        check_specs=[schema_spec("valuation_queries")],
        group_name="valuation",
        kinds={"pytorch", "delta"},
    )
    def valuation_queries(context: dg.AssetExecutionContext, delta: DeltaStore) -> dg.MaterializeResult:
        """Prompts, the completions the model generates for them (greedy), and their projected gradients."""
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
            f"| {q} | {p[:40]!r} | {c[:40]!r} |"
            for q, p, c in rows.select("query_id", "prompt", "completion").head(10).iter_rows()
        )
        return dg.MaterializeResult(
            metadata={
                "queries": rows.height,
                "empty_completions": len(empty),
                "delta_version": version,
                "preview": dg.MetadataValue.md("| query | prompt | completion |\n|---|---|---|\n" + preview),
            },
            check_results=[schema_result(delta, "valuation_queries")],
        )

    @dg.asset(
        deps=["projected_gradients", "hessian_factors", "valuation_queries"],
        code_version=settings.version("curvature", "scores"),
        check_specs=[schema_spec("influence_scores"), schema_spec("valuation_provenance", asset="influence_scores")],
        group_name="valuation",
        kinds={"pytorch", "delta"},
    )
    def influence_scores(context: dg.AssetExecutionContext, delta: DeltaStore) -> dg.MaterializeResult:
        """Per query: top-k training sequences and documents; per document: total over queries."""
        shards = sorted(context.instance.get_dynamic_partitions(shard_partitions.name))
        versions = upstream_versions(delta, *VALUATION_INPUTS)  # every read below is of these versions
        scores = settings.scores
        scored = score_valuation(
            delta,
            versions,
            shards,
            settings.curvature,
            normalize=scores.normalize,
            top_k=scores.top_k,
            block_rows=scores.block_rows,
        )
        projection_row = latest_row(delta, "gradient_projection", versions["gradient_projection"])
        provenance = {
            "tables": versions,
            "model_hash": projection_row["model_hash"],
            "projection_hash": projection_row["projection_hash"],
            "projection": json.loads(projection_row["config"]),
            "curvature": settings.to_dict()["curvature"],
            "scores": settings.to_dict()["scores"],
            "queries": settings.to_dict()["queries"],
            "shards": shards,
            "code_version": context.assets_def.code_versions_by_key[context.asset_key],
        }
        vid = valuation_id(provenance)
        rows = score_rows(vid, scored, scores.top_k)
        meta = commit_metadata(context, versions)
        delta.replace("influence_scores", rows, {"valuation_id": vid}, metadata=meta)
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
        delta.replace("valuation_provenance", record, {"valuation_id": vid}, metadata=meta)
        return dg.MaterializeResult(
            metadata={
                "valuation_id": vid,
                "training_rows": training_rows,
                "queries": len(scored.query_ids),
                "documents": len(scored.docs),
                "rows_per_second": round(rate, 1),
                "score_rows": rows.height,
            },
            check_results=[
                schema_result(delta, t, {"valuation_id": vid}) for t in ("influence_scores", "valuation_provenance")
            ],
        )

    @dg.asset(
        deps=["influence_scores"],
        code_version=settings.version("scores"),
        check_specs=[schema_spec("provider_valuations")],
        group_name="valuation",
        kinds={"delta", "mlflow"},
    )
    def provider_valuations(
        context: dg.AssetExecutionContext, delta: DeltaStore, mlflow: MlflowTracker
    ) -> dg.MaterializeResult:
        """Per provider: total and positive value, share, documents, tokens, value per token, 95% interval."""
        record = latest_row(delta, "valuation_provenance")
        vid, provenance = record["valuation_id"], json.loads(record["provenance"])
        table = provider_valuation(
            delta, vid, provenance, bootstrap_samples=settings.scores.bootstrap_samples, seed=settings.queries.seed
        )
        figure = provider_chart(table, f"Provider value, valuation {vid}")
        tags = {"dagster_run_id": context.run_id, "valuation_id": vid}
        with mlflow.run(
            f"valuation-{vid}", params=tracking_params(vid, provenance, record["queries"]), tags=tags
        ) as run:
            run.log_metrics(
                {
                    "scoring_rows_per_second": record["rows_per_second"],
                    "training_rows": record["training_rows"],
                    "providers": table.height,
                    "total_value": float(table["total_value"].sum()),
                }
            )
            run.log_figure(figure, "provider_valuations.png")
            run.log_dict(provenance, "provenance.json")
            run_id = run.run_id
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=80)
        rows = table.with_columns(valuation_id=pl.lit(vid), mlflow_run_id=pl.lit(run_id))
        upstream = {**provenance["tables"], "influence_scores": delta.version("influence_scores")}
        version = delta.replace(
            "provider_valuations", rows, {"valuation_id": vid}, metadata=commit_metadata(context, upstream)
        )
        top = "\n".join(
            f"| {p} | {t:.4g} | {s:.1%} | [{lo:.3g}, {hi:.3g}] |"
            for p, t, s, lo, hi in table.select("provider_id", "total_value", "share", "ci_low", "ci_high").iter_rows()
        )
        chart = base64.b64encode(image.getvalue()).decode()
        return dg.MaterializeResult(
            metadata={
                "valuation_id": vid,
                "mlflow_run_id": run_id,
                "providers": table.height,
                "delta_version": version,
                "top_providers": dg.MetadataValue.md(
                    "| provider | total value | share | 95% interval |\n|---|---|---|---|\n" + top
                ),
                "chart": dg.MetadataValue.md(f"![provider value](data:image/png;base64,{chart})"),
            },
            check_results=[schema_result(delta, "provider_valuations", {"valuation_id": vid})],
        )

    return [valuation_queries, influence_scores, provider_valuations]
