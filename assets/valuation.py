"""valuation_queries, influence_scores and provider_valuations: from preconditioned queries to value."""

import base64
import io
import json
import time
from datetime import datetime, timezone

import dagster as dg
import polars as pl
import torch

from assets.checks import schema_result, schema_spec
from assets.common import (
    binary_to_gradients,
    commit_metadata,
    content_hash,
    frame_to_tensors,
    gradients_to_binary,
    shard_partitions,
    sql_in,
    upstream_versions,
)
from dataworth import CausalLMTask, Curvature, InfluenceScorer, LoGra
from pipelines.artifacts import latest_row, load_model, load_projection, require_single
from pipelines.lm import QueryTooLongError, generate_completions
from pipelines.settings import Settings
from pipelines.valuation import provider_chart, provider_table, valuation_id
from resources.delta import DeltaStore
from resources.tracking import MlflowTracker

LINEAGE_TABLES = (
    "training_corpus", "token_shards", "model_checkpoint", "gradient_projection", "projected_gradients",
    "projected_gradients_statistics", "hessian_factors", "valuation_queries",
)


def read_prompts(settings: Settings) -> list[dict]:
    """The query file's lines; a malformed line (or none at all) is a Failure naming the file, the line and the fix."""
    path = settings.queries_path()
    if not path.is_file():
        raise dg.Failure(f"query file {path} does not exist; set [queries] queries_file in the settings")
    example = '{"query_id": "q0", "prompt": "..."}'
    lines, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise dg.Failure(f"query file {path} line {number} is not valid JSON ({error.msg}); write one object per line like {example}") from None
        query_id, prompt = (row.get("query_id"), row.get("prompt")) if isinstance(row, dict) else (None, None)
        if not isinstance(query_id, str) or not query_id.strip() or not isinstance(prompt, str):
            raise dg.Failure(f"query file {path} line {number} needs a non-empty string query_id and a string prompt, like {example}")
        if query_id in seen:
            raise dg.Failure(f"query file {path} line {number} repeats query_id {query_id!r}; give every query its own id")
        seen.add(query_id)
        lines.append(row)
    if not lines:
        raise dg.Failure(f"query file {path} holds no query; add lines like {example}")
    return lines


def queries_version(settings: Settings) -> str:
    """valuation_queries' code version: the [queries] settings and the query file's bytes."""
    path = settings.queries_path()
    return f"{settings.version('queries')}-{content_hash(path.read_bytes())[:12] if path.is_file() else 'missing'}"


def build(settings: Settings, model_checkpoint, gradient_projection, projected_gradients, hessian_factors) -> list[dg.AssetsDefinition]:
    @dg.asset(
        deps=[model_checkpoint, gradient_projection],
        code_version=queries_version(settings),
        check_specs=[schema_spec("valuation_queries")],
        group_name="valuation",
        kinds={"pytorch", "delta"},
    )
    def valuation_queries(context: dg.AssetExecutionContext, delta: DeltaStore) -> dg.MaterializeResult:
        """Prompts, the completions the model generates for them (greedy), and their projected gradients."""
        prompts = read_prompts(settings)
        model, tokenizer, model_row = load_model(delta)
        projection, projection_row = load_projection(delta, model_row["checkpoint_hash"])
        upstream = upstream_versions(delta, "model_checkpoint", "gradient_projection")
        texts = [p["prompt"] for p in prompts]
        try:
            completions = generate_completions(model, tokenizer, texts, max_new_tokens=settings.queries.max_new_tokens, seed=settings.queries.seed)
        except QueryTooLongError as error:
            raise QueryTooLongError(f"query {prompts[error.index]['query_id']!r} of {settings.queries_path()}: {error}", error.index) from None
        examples, prompt_lengths, completion_lengths = [], [], []
        for text, completion in zip(texts, completions):
            prompt_ids = tokenizer.encode(text, add_special_tokens=False) or [tokenizer.bos_token_id]
            completion_ids = tokenizer.encode(completion, add_special_tokens=False)
            examples.append((prompt_ids + completion_ids, len(prompt_ids)))
            prompt_lengths.append(len(prompt_ids))
            completion_lengths.append(len(completion_ids))
        empty = [p["query_id"] for p, n in zip(prompts, completion_lengths) if n == 0]
        if empty:
            context.log.warning(f"queries {empty} got an empty completion: their gradient is zero")
        logra = LoGra(model, CausalLMTask(pad_token_id=tokenizer.pad_token_id), projection=projection, batch_size=settings.capture_batch_size)
        gradients = logra.capture(examples, query=True)
        rows = pl.DataFrame(
            {
                "query_id": [p["query_id"] for p in prompts], "prompt": texts, "completion": completions,
                "prompt_tokens": prompt_lengths, "completion_tokens": completion_lengths,
            },
            schema_overrides={"prompt_tokens": pl.Int64, "completion_tokens": pl.Int64},
        ).with_columns(
            gradient=gradients_to_binary(gradients),
            projection_hash=pl.lit(projection_row["projection_hash"]),
            model_hash=pl.lit(model_row["checkpoint_hash"]),
        )
        version = delta.write("valuation_queries", rows, mode="overwrite", metadata=commit_metadata(context, upstream))
        preview = "\n".join(f"| {q} | {p[:40]!r} | {c[:40]!r} |" for q, p, c in rows.select("query_id", "prompt", "completion").head(10).iter_rows())
        return dg.MaterializeResult(
            metadata={"queries": rows.height, "empty_completions": len(empty), "delta_version": version,
                      "preview": dg.MetadataValue.md("| query | prompt | completion |\n|---|---|---|\n" + preview)},
            check_results=[schema_result(delta, "valuation_queries")],
        )

    @dg.asset(
        deps=[projected_gradients, hessian_factors, valuation_queries],
        code_version=settings.version("curvature", "scores"),
        check_specs=[schema_spec("influence_scores"), schema_spec("valuation_provenance", asset="influence_scores")],
        group_name="valuation",
        kinds={"pytorch", "delta"},
    )
    def influence_scores(context: dg.AssetExecutionContext, delta: DeltaStore) -> dg.MaterializeResult:
        """Per query: top-k training sequences and documents; per document: total over queries."""
        shards = context.instance.get_dynamic_partitions(shard_partitions.name)
        versions = upstream_versions(delta, *LINEAGE_TABLES)  # every read below is of these versions
        projection, projection_row = load_projection(delta, version=versions["gradient_projection"])
        model_hash = projection_row["model_hash"]
        queries = delta.read("valuation_queries", version=versions["valuation_queries"]).sort("query_id")
        require_single(queries, "projection_hash", projection_row["projection_hash"], "query gradients")
        require_single(queries, "model_hash", model_hash, "query gradients")
        factors = delta.read("hessian_factors", version=versions["hessian_factors"])
        require_single(factors, "projection_hash", projection_row["projection_hash"], "Hessian factors")
        require_single(factors, "kind", settings.curvature.kind, "Hessian factors")
        curvature = Curvature.from_tensors(settings.curvature.kind, projection.layout, frame_to_tensors(factors))
        scorer = InfluenceScorer(binary_to_gradients(queries["gradient"]), curvature.preconditioner(settings.curvature), settings.scores.normalize)

        rows = delta.read(
            "projected_gradients", columns=["shard_id", "seq_id", "doc_id", "provider_id", "projection_hash", "model_hash"],
            filter=sql_in("shard_id", shards), version=versions["projected_gradients"],
        ).sort("seq_id")
        missing = sorted(set(shards) - set(rows["shard_id"].unique().to_list()))
        if missing:
            raise dg.Failure(f"{len(missing)} shard(s) have no gradients yet ({missing[:5]}); materialize projected_gradients for them")
        require_single(rows, "projection_hash", projection_row["projection_hash"], "training gradients")
        require_single(rows, "model_hash", model_hash, "training gradients")
        docs = rows["doc_id"].unique(maintain_order=True)
        providers = rows["provider_id"].unique(maintain_order=True)
        doc_codes = torch.tensor(rows["doc_id"].replace_strict(docs, range(len(docs)), return_dtype=pl.Int64).to_numpy())
        provider_codes = torch.tensor(rows["provider_id"].replace_strict(providers, range(len(providers)), return_dtype=pl.Int64).to_numpy())

        def blocks():
            for shard in sorted(shards):
                part = delta.read("projected_gradients", version=versions["projected_gradients"], columns=["seq_id", "gradient"], filter=sql_in("shard_id", [shard])).sort("seq_id")
                yield from binary_to_gradients(part["gradient"]).split(settings.scores.block_rows)

        started = time.perf_counter()
        result = scorer.stream(blocks(), top_k=settings.scores.top_k, groups={"doc": doc_codes, "provider": provider_codes})
        seconds = time.perf_counter() - started
        provenance = {
            "tables": versions, "model_hash": model_hash, "projection_hash": projection_row["projection_hash"],
            "projection": json.loads(projection_row["config"]), "curvature": settings.to_dict()["curvature"],
            "scores": settings.to_dict()["scores"], "queries": settings.to_dict()["queries"], "shards": sorted(shards),
            "code_version": context.assets_def.code_versions_by_key[context.asset_key],
        }
        vid = valuation_id(provenance)
        scores = score_rows(vid, queries["query_id"].to_list(), rows, docs.to_list(), providers.to_list(), result, settings.scores.top_k)
        meta = commit_metadata(context, versions)
        delta.write("influence_scores", scores, mode="overwrite", replace_where={"valuation_id": vid}, metadata=meta)
        record = pl.DataFrame(
            {
                "valuation_id": [vid], "provenance": [json.dumps(provenance, sort_keys=True)], "dagster_run_id": [context.run_id],
                "training_rows": [rows.height], "queries": [queries.height], "scoring_seconds": [seconds],
                "rows_per_second": [rows.height / max(seconds, 1e-9)], "created_at": [datetime.now(timezone.utc)],
            }
        )
        delta.write("valuation_provenance", record, mode="overwrite", replace_where={"valuation_id": vid}, metadata=meta)
        return dg.MaterializeResult(
            metadata={"valuation_id": vid, "training_rows": rows.height, "queries": queries.height, "documents": len(docs),
                      "rows_per_second": round(rows.height / max(seconds, 1e-9), 1), "score_rows": scores.height},
            check_results=[schema_result(delta, t, f"valuation_id = '{vid}'") for t in ("influence_scores", "valuation_provenance")],
        )

    @dg.asset(
        deps=[influence_scores],
        code_version=settings.version("scores"),
        check_specs=[schema_spec("provider_valuations")],
        group_name="valuation",
        kinds={"delta", "mlflow"},
    )
    def provider_valuations(context: dg.AssetExecutionContext, delta: DeltaStore, mlflow: MlflowTracker) -> dg.MaterializeResult:
        """Per provider: total and positive value, share, documents, tokens, value per token, 95% interval."""
        record = latest_row(delta, "valuation_provenance")
        vid, provenance = record["valuation_id"], json.loads(record["provenance"])
        sums = delta.read("influence_scores", filter=f"valuation_id = '{vid}' AND kind = 'provider_query'")
        matrix = sums.pivot(on="query_id", index="provider_id", values="score", sort_columns=True).sort("provider_id")
        values = matrix.drop("provider_id").fill_null(0).to_numpy()
        seqs = delta.read("token_shards", version=provenance["tables"]["token_shards"], columns=["shard_id", "provider_id", "doc_id", "n_tokens"], filter=sql_in("shard_id", provenance["shards"]))
        per_provider = seqs.group_by("provider_id").agg(documents=pl.col("doc_id").n_unique(), tokens=pl.col("n_tokens").sum())
        documents = dict(per_provider.select("provider_id", "documents").iter_rows())
        tokens = dict(per_provider.select("provider_id", "tokens").iter_rows())
        table = provider_table(values, matrix["provider_id"].to_list(), documents, tokens, bootstrap_samples=settings.scores.bootstrap_samples, seed=settings.queries.seed)
        figure = provider_chart(table, f"Provider value, valuation {vid}")
        params = {
            "valuation_id": vid, "rank_in": provenance["projection"]["rank_in"], "rank_out": provenance["projection"]["rank_out"],
            "projection_ranks": provenance["projection"]["ranks"], "projection_init": provenance["projection"]["init"],
            "projection_seed": provenance["projection"]["seed"], "modules_include": provenance["projection"]["include"],
            "modules_exclude": provenance["projection"]["exclude"], "hessian": provenance["curvature"]["kind"],
            "fisher": provenance["curvature"]["fisher"], "damping": provenance["curvature"]["damping"],
            "damping_mode": provenance["curvature"]["damping_mode"], "normalize": provenance["scores"]["normalize"],
            "model_hash": provenance["model_hash"], "projection_hash": provenance["projection_hash"],
            "corpus_version": provenance["tables"]["training_corpus"], "queries": record["queries"],
        }
        with mlflow.run(f"valuation-{vid}", params=params, tags={"dagster_run_id": context.run_id, "valuation_id": vid}) as run:
            run.log_metrics({
                "scoring_rows_per_second": record["rows_per_second"], "training_rows": record["training_rows"],
                "providers": table.height, "total_value": float(table["total_value"].sum()),
            })
            run.log_figure(figure, "provider_valuations.png")
            run.log_dict(provenance, "provenance.json")
            run_id = run.run_id
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=80)
        rows = table.with_columns(valuation_id=pl.lit(vid), mlflow_run_id=pl.lit(run_id))
        version = delta.write("provider_valuations", rows, mode="overwrite", replace_where={"valuation_id": vid},
                              metadata=commit_metadata(context, {**provenance["tables"], "influence_scores": delta.version("influence_scores")}))
        top = "\n".join(f"| {p} | {t:.4g} | {s:.1%} | [{lo:.3g}, {hi:.3g}] |" for p, t, s, lo, hi in table.select("provider_id", "total_value", "share", "ci_low", "ci_high").iter_rows())
        return dg.MaterializeResult(
            metadata={
                "valuation_id": vid, "mlflow_run_id": run_id, "providers": table.height, "delta_version": version,
                "top_providers": dg.MetadataValue.md("| provider | total value | share | 95% interval |\n|---|---|---|---|\n" + top),
                "chart": dg.MetadataValue.md(f"![provider value](data:image/png;base64,{base64.b64encode(image.getvalue()).decode()})"),
            },
            check_results=[schema_result(delta, "provider_valuations", f"valuation_id = '{vid}'")],
        )

    return [valuation_queries, influence_scores, provider_valuations]


def score_rows(vid: str, query_ids: list[str], rows: pl.DataFrame, docs: list[str], providers: list[str], result, top_k: int) -> pl.DataFrame:
    """The influence_scores table: top sequences and documents per query, document totals, provider x query sums."""
    seq_ids, seq_docs, seq_providers = rows["seq_id"].to_list(), rows["doc_id"].to_list(), rows["provider_id"].to_list()
    doc_provider = dict(zip(seq_docs, seq_providers))
    out = []
    for q, query_id in enumerate(query_ids):
        for rank, (score, index) in enumerate(zip(result.top_scores[q].tolist(), result.top_indices[q].tolist())):
            out.append((vid, query_id, "top_sequence", rank + 1, seq_ids[index], seq_docs[index], seq_providers[index], score))
        doc_scores = result.group_sums["doc"][:, q]
        top = doc_scores.topk(min(top_k, len(docs)))
        for rank, (score, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            out.append((vid, query_id, "top_document", rank + 1, None, docs[index], doc_provider[docs[index]], score))
        for p, provider in enumerate(providers):
            out.append((vid, query_id, "provider_query", None, None, None, provider, float(result.group_sums["provider"][p, q])))
    for d, total in enumerate(result.group_sums["doc"].sum(1).tolist()):
        out.append((vid, None, "document_total", None, None, docs[d], doc_provider[docs[d]], total))
    columns = ["valuation_id", "query_id", "kind", "rank", "seq_id", "doc_id", "provider_id", "score"]
    return pl.DataFrame(out, schema={"valuation_id": pl.String, "query_id": pl.String, "kind": pl.String, "rank": pl.Int64,
                                     "seq_id": pl.String, "doc_id": pl.String, "provider_id": pl.String, "score": pl.Float64}, orient="row").select(columns)
