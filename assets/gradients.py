"""gradient_projection, projected_gradients (the GPU step, per shard) and hessian_factors."""

import resource
import time
from datetime import UTC, datetime

import dagster as dg
import polars as pl

from assets.checks import schema_result, schema_spec
from assets.metadata import commit_metadata, upstream_versions
from assets.partitions import SINGLE_RUN, shard_partitions
from assets.split import split_steps
from assets.steps import step_tags
from dataworth import CausalLMTask
from domain.artifacts import load_model, load_projection, projections_dir, require_single
from domain.gradients import (
    PCA_SEQUENCES,
    capture_shard,
    examples_of,
    fit_curvature,
    pipeline_logra,
    pipeline_projection_config,
    stored_gradients,
)
from domain.progress import Progress
from domain.settings import Settings
from domain.staging import shard_groups
from resources.codecs import tensors_to_frame
from resources.delta import DeltaStore, run_metadata
from resources.folders import publish


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CAPTURE_DEPS = ("token_shards", "model_checkpoint", "gradient_projection")
HASHES = ("projection_hash", "model_hash")


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    """The gradients group's assets, their code versions taken from `settings`."""
    gradients_version = settings.version("curvature.fisher")

    @dg.asset(
        op_tags=step_tags(settings.deployment, gpu=True),
        deps=["model_checkpoint"],
        code_version=settings.version("projection"),
        check_specs=[schema_spec("gradient_projection")],
        group_name="gradients",
        kinds={"pytorch", "safetensors"},
    )
    def gradient_projection(context: dg.AssetExecutionContext, delta: DeltaStore) -> dg.MaterializeResult:
        """The LoGra projection (random or PCA) shared by every shard and query."""
        model, tokenizer, model_row = load_model(delta)
        upstream = upstream_versions(delta, "model_checkpoint")
        pca_examples = None
        if settings.projection.init == "pca":  # statistics pass over the first sequences, version recorded
            upstream |= upstream_versions(delta, "token_shards")
            first = delta.read("token_shards", columns=["shard_id", "seq_index", "input_ids"]).sort(
                "shard_id", "seq_index"
            )
            pca_examples = examples_of(first.head(PCA_SEQUENCES))
        task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
        config = pipeline_projection_config(settings.projection, model, adapter=bool(model_row["adapter_path"]))
        logra = pipeline_logra(model, task, settings, config=config, pca_examples=pca_examples)
        projection = logra.projection
        digest = projection.content_hash()
        path = projections_dir() / digest[:16]
        if not path.exists():
            staging = projections_dir() / f".staging-{context.run_id}"
            projection.save(staging)
            staging.rename(path)
        row = pl.DataFrame(
            {
                "projection_hash": [digest],
                "path": [publish(path, "projections", path.name)],  # relative to the state folder, or its URI
                "config": [config.to_json()],
                "dim": [projection.layout.dim],
                "layers": [len(projection.layers)],
                "model_hash": [model_row["checkpoint_hash"]],
                "created_at": [datetime.now(UTC)],
            }
        )
        # one row per projection: re-materializing the same one replaces its row
        version = delta.replace(
            "gradient_projection", row, {"projection_hash": digest}, metadata=commit_metadata(context, upstream)
        )
        layers = "\n".join(f"| {b.name} | {b.k_in} | {b.k_out} |" for b in projection.layout.blocks)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(digest[:16]),
            metadata={
                "projection_hash": digest,
                "dim": projection.layout.dim,
                "delta_version": version,
                "layers": dg.MetadataValue.md("| layer | k_in | k_out |\n|---|---|---|\n" + layers),
                "not_tracked": ", ".join(sorted(set(config.exclude) - set(settings.projection.exclude))),
                "ranks_cut_to_width": ", ".join(sorted(set(config.ranks) - set(settings.projection.ranks))),
            },
            check_results=[schema_result(delta, "gradient_projection")],
        )

    workers = settings.deployment.capture_workers
    tables = ("projected_gradients", "projected_gradients_statistics")

    def capture_group(context: dg.OpExecutionContext, delta: DeltaStore, part: int) -> None:
        """Capture one contiguous group (`shard_groups`) of the run's shards, committing shard by shard."""
        shard_keys = shard_groups(list(context.partition_keys), workers)[part]
        if not shard_keys:
            context.log.info(f"part {part} of {workers} has no shard to capture")
            return
        model, tokenizer, model_row = load_model(delta)
        projection, projection_row = load_projection(delta, model_row["checkpoint_hash"])
        hashes = {"projection_hash": projection_row["projection_hash"], "model_hash": model_row["checkpoint_hash"]}
        upstream = upstream_versions(delta, "token_shards", "model_checkpoint", "gradient_projection")
        task = CausalLMTask(pad_token_id=tokenizer.pad_token_id, seed=settings.model.seed)
        logra = pipeline_logra(model, task, settings, projection=projection)
        capture_progress = Progress(len(shard_keys), "shard")  # one estimate of time left across the group
        for index, shard in enumerate(shard_keys):
            started = time.perf_counter()
            seqs = delta.read("token_shards", where={"shard_id": shard}).sort("seq_index")

            def progress(done: int, total: int, shard: str = shard, index: int = index) -> None:
                label = f"shard {index + 1}/{len(shard_keys)} ({shard}): {done}/{total} sequences"
                if report := capture_progress.update(index + done / max(total, 1), label):
                    context.log.info(report)

            rows, stats = capture_shard(
                logra, seqs, settings.curvature.fisher, hashes, progress, settings.gradient_dtype
            )
            meta = run_metadata(context.run_id, gradients_version, upstream)
            for table, frame in [("projected_gradients_statistics", stats), ("projected_gradients", rows)]:
                # statistics first: a shard counts as done (see stale_shards) once its gradients land
                # add_columns: a table written before `gradient_dtype` existed gains it (old rows: null = float32)
                delta.replace_shard(table, shard, frame, add_columns=table == "projected_gradients", metadata=meta)
            tokens, seconds = int(seqs["n_tokens"].sum()), time.perf_counter() - started
            # Dagster marks a ranged run's partitions done only when the asset's last step ends: say each
            # shard as it lands
            context.log_event(
                dg.AssetObservation(
                    asset_key="projected_gradients",
                    partition=shard,
                    metadata={
                        "sequences": seqs.height,
                        "tokens": tokens,
                        "providers": ", ".join(sorted(seqs["provider_id"].unique().to_list())),
                        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
                        "peak_memory_mb": round(peak_memory_mb(), 1),  # of this step's process so far
                        "capture_step": part,
                        "delta_version": delta.version("projected_gradients"),
                    },
                )
            )

    def check_gradients(context: dg.OpExecutionContext, delta: DeltaStore):
        """Every shard of the run captured: its totals, and both tables' schemas on its rows."""
        shards = list(context.partition_keys)
        rows = delta.read("projected_gradients", where={"shard_id": shards}, columns=["n_tokens", *HASHES])
        yield dg.Output(
            None,
            "projected_gradients",
            metadata={  # the run's totals: every partition of this run shows them (per shard: observations)
                "shards_in_this_run": len(shards),
                "sequences_in_this_run": rows.height,
                "tokens_in_this_run": int(rows["n_tokens"].sum()),
                "capture_steps": min(workers, len(shards)),
                **{name: ", ".join(sorted(rows[name].unique().to_list())) for name in HASHES},
            },
        )
        for table in tables:
            yield schema_result(delta, table, {"shard_id": shards})

    checks = [schema_spec(t, asset="projected_gradients") for t in tables]
    compose = split_steps(
        "projected_gradients",
        workers,
        CAPTURE_DEPS,
        checks,
        part=("capture_part", capture_group, step_tags(settings.deployment, gpu=True)),
        finish=("check_gradients", check_gradients, step_tags(settings.deployment)),
        whole="capture",
    )

    @dg.graph_multi_asset(
        outs={
            "projected_gradients": dg.AssetOut(
                code_version=gradients_version,
                group_name="gradients",
                kinds={"pytorch", "delta"},
                dagster_type=dg.Nothing,
                description="Per shard: every sequence's projected gradient, and the shard's partial curvature "
                "sums. A run's shards are captured by `[deployment] capture_workers` steps, each a group of them.",
            )
        },
        ins={
            "token_shards": dg.AssetIn(dagster_type=dg.Nothing, partition_mapping=dg.IdentityPartitionMapping()),
            "model_checkpoint": dg.AssetIn(dagster_type=dg.Nothing),
            "gradient_projection": dg.AssetIn(dagster_type=dg.Nothing),
        },
        partitions_def=shard_partitions,
        backfill_policy=SINGLE_RUN,
        check_specs=checks,
    )
    def projected_gradients(token_shards, model_checkpoint, gradient_projection):
        return compose(
            token_shards=token_shards, model_checkpoint=model_checkpoint, gradient_projection=gradient_projection
        )

    @dg.asset(
        op_tags=step_tags(settings.deployment),
        deps=["projected_gradients"],
        code_version=settings.version("curvature.kind", "curvature.fisher"),
        check_specs=[schema_spec("hessian_factors")],
        group_name="gradients",
        kinds={"pytorch", "delta"},
    )
    def hessian_factors(context: dg.AssetExecutionContext, delta: DeltaStore) -> dg.MaterializeResult:
        """Partial statistics of every shard merged into the chosen curvature (eigen-factors)."""
        shards = context.instance.get_dynamic_partitions(shard_partitions.name)
        upstream = upstream_versions(
            delta, "projected_gradients_statistics", "projected_gradients", "gradient_projection"
        )
        projection, projection_row = load_projection(delta)
        partials = delta.read("projected_gradients_statistics", where={"shard_id": shards})
        missing = sorted(set(shards) - set(partials["shard_id"].unique().to_list()))
        if missing:
            raise dg.Failure(
                f"{len(missing)} shard(s) have no gradient statistics yet ({missing[:5]}...); "
                "materialize projected_gradients for them first"
            )
        require_single(partials, "projection_hash", projection_row["projection_hash"], "gradient statistics")
        require_single(partials, "fisher", settings.curvature.fisher, "gradient statistics")
        gradients = None  # the empirical Fisher's second moments: one pass over the stored gradients
        if settings.curvature.fisher == "empirical":
            stored = stored_gradients(delta, shards, upstream["projected_gradients"], settings.deployment.shard_readers)
            gradients = (block for _, _, block in stored)
        curvature, merged = fit_curvature(partials, projection.layout, settings.curvature.kind, gradients)
        frame = tensors_to_frame(  # identity curvature has no factors: zero rows
            curvature.to_tensors(),
            kind=curvature.kind,
            fisher=settings.curvature.fisher,
            projection_hash=projection_row["projection_hash"],
        ).with_columns(examples=pl.lit(merged.examples, dtype=pl.Int64), tokens=pl.lit(merged.tokens, dtype=pl.Int64))
        version = delta.write("hessian_factors", frame, mode="overwrite", metadata=commit_metadata(context, upstream))
        return dg.MaterializeResult(
            metadata={
                "kind": curvature.kind,
                "fisher": settings.curvature.fisher,
                "shards": len(shards),
                "examples": merged.examples,
                "tokens": merged.tokens,
                "delta_version": version,
            },
            check_results=[schema_result(delta, "hessian_factors")],
        )

    return [gradient_projection, projected_gradients, hessian_factors]
