"""training_corpus, model_checkpoint and token_shards: from staged batches to training sequences."""

from datetime import UTC, datetime

import dagster as dg
import polars as pl
from transformers import AutoTokenizer

from assets.checks import schema_result, schema_spec
from assets.metadata import commit_metadata, upstream_versions
from assets.partitions import SINGLE_RUN, shard_partitions
from assets.steps import step_tags
from domain.artifacts import latest_row, record_checkpoint, store_checkpoint
from domain.lm import apply_adapter, check_adapter, load_checkpoint, train_embedded_model
from domain.progress import Progress
from domain.sequences import number_sequences, split_documents, tokenize_corpus
from domain.settings import Settings, operator_path
from domain.staging import read_staged_shard
from resources.delta import DeltaStore
from resources.folders import models_location, publish
from resources.tracking import MlflowTracker


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    """The corpus and model groups' assets, their code versions taken from `settings`."""

    @dg.asset(
        op_tags=step_tags(settings.deployment),
        partitions_def=shard_partitions,
        backfill_policy=SINGLE_RUN,
        code_version=settings.version("corpus"),
        check_specs=[schema_spec("training_corpus")],
        group_name="corpus",
        kinds={"delta", "polars"},
    )
    def training_corpus(context: dg.AssetExecutionContext, delta: DeltaStore) -> dg.MaterializeResult:
        """Provider-attributed documents, one partition per shard of a staged ingestion batch."""
        rows = 0
        for shard in context.partition_keys:
            docs = read_staged_shard(shard)
            delta.replace_shard("training_corpus", shard, docs, metadata=commit_metadata(context, {}))
            rows += docs.height
        shards = list(context.partition_keys)
        return dg.MaterializeResult(
            metadata={"documents": rows, "shards": len(shards), "delta_version": delta.version("training_corpus")},
            check_results=[schema_result(delta, "training_corpus", {"shard_id": shards})],
        )

    @dg.asset(
        op_tags=step_tags(settings.deployment, gpu=True),
        deps=["training_corpus"],
        code_version=settings.version("model"),
        check_specs=[schema_spec("model_checkpoint")],
        group_name="model",
        kinds={"pytorch", "safetensors"},
    )
    def model_checkpoint(
        context: dg.AssetExecutionContext, delta: DeltaStore, mlflow: MlflowTracker
    ) -> dg.MaterializeResult:
        """The causal LM being valued: a local HF checkpoint, or a small GPT-2 trained on the corpus; with
        `[model] adapter_dir`, a LoRA adapter applied on it (only its factors are then valued)."""
        m = settings.model
        models_location()  # a wrong $DATAWORTH_MODELS_ROOT fails now, not after training
        corpus_version = delta.version("training_corpus")
        mlflow_run_id = ""
        adapter = operator_path(m.adapter_dir, "[model] adapter_dir") if m.adapter_dir else None
        if m.checkpoint_dir:
            path = operator_path(m.checkpoint_dir, "[model] checkpoint_dir")
            model, _, digest = load_checkpoint(path, adapter)
            source = "local"
        else:
            if adapter:
                check_adapter(adapter)  # before training the model it goes on
            corpus = delta.read("training_corpus", columns=["doc_id", "provider_id", "batch_id", "text"])
            context.log.info(f"training the embedded GPT-2 on {corpus.height} documents")
            params = {**settings.to_dict()["model"], "documents": corpus.height, "corpus_version": corpus_version}
            with mlflow.run("embedded-model-training", params=params, tags={"dagster_run_id": context.run_id}) as run:
                training = Progress(m.train_steps, "embedded GPT-2 step")

                def on_step(step: int, loss: float) -> None:
                    if step % 10 == 0 or step == m.train_steps - 1:
                        run.log_metrics({"train_loss": loss}, step=step)
                    if report := training.update(step + 1):  # at most every ~12 s, with the time left
                        context.log.info(f"{report}; loss {loss:.3f}")

                model, tokenizer, _ = train_embedded_model(corpus, m, on_step)
                path, digest = store_checkpoint(model, tokenizer, context.run_id)
                mlflow_run_id = run.run_id
            if adapter:
                model, digest = apply_adapter(model, digest, adapter)
            source = "embedded"
        row = pl.DataFrame(
            {
                "checkpoint_hash": [digest],
                # relative to the state folder (absolute outside it), or the URI they were published to
                "path": [publish(path, "models", path.name if source == "embedded" else digest[:16])],
                "adapter_path": [publish(adapter, "adapters", digest[:16]) if adapter else ""],
                "source": [source],
                "model_type": [model.config.model_type],
                "parameters": [sum(p.numel() for p in model.parameters())],
                "context_length": [model.config.max_position_embeddings],
                "corpus_version": [corpus_version],
                "mlflow_run_id": [mlflow_run_id],
                "created_at": [datetime.now(UTC)],
            }
        )
        # one row per checkpoint: re-materializing the same one replaces its row
        upstream = {"training_corpus": corpus_version}
        version = record_checkpoint(delta, row, commit_metadata(context, upstream))
        return dg.MaterializeResult(
            data_version=dg.DataVersion(digest[:16]),
            metadata={
                "checkpoint_hash": digest,
                "path": str(path),
                "adapter_path": str(adapter or ""),
                "source": source,
                "parameters": row["parameters"][0],
                "mlflow_run_id": mlflow_run_id,
                "delta_version": version,
            },
            check_results=[schema_result(delta, "model_checkpoint")],
        )

    @dg.asset(
        op_tags=step_tags(settings.deployment),
        partitions_def=shard_partitions,
        backfill_policy=SINGLE_RUN,
        deps=[dg.AssetDep("training_corpus", partition_mapping=dg.IdentityPartitionMapping()), "model_checkpoint"],
        code_version=settings.version("shards"),
        check_specs=[schema_spec("token_shards")],
        group_name="corpus",
        kinds={"delta", "polars"},
    )
    def token_shards(context: dg.AssetExecutionContext, delta: DeltaStore) -> dg.MaterializeResult:
        """Fixed-length training sequences that never cross a document, with doc/provider offsets."""
        upstream = upstream_versions(delta, "training_corpus", "model_checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(latest_row(delta, "model_checkpoint")["path"], local_files_only=True)
        shards = list(context.partition_keys)
        docs = delta.read("training_corpus", where={"shard_id": shards})
        sequences, tokens, split = 0, 0, 0
        for (shard,), shard_docs in docs.sort("shard_id").group_by("shard_id", maintain_order=True):
            seqs = number_sequences(tokenize_corpus(shard_docs, tokenizer, settings.shards.seq_len), shard)
            delta.replace_shard("token_shards", shard, seqs, metadata=commit_metadata(context, upstream))
            sequences += seqs.height
            tokens += int(seqs["n_tokens"].sum())
            split += split_documents(seqs)
        context.log.info(f"{sequences} sequences from {docs.height} documents ({split} split across sequences)")
        return dg.MaterializeResult(
            metadata={"sequences": sequences, "tokens": tokens, "documents": docs.height, "documents_split": split},
            check_results=[schema_result(delta, "token_shards", {"shard_id": shards})],
        )

    return [training_corpus, model_checkpoint, token_shards]
