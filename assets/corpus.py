"""training_corpus, model_checkpoint and token_shards: from staged batches to training sequences."""

import shutil
from datetime import datetime, timezone

import dagster as dg
import polars as pl
from transformers import AutoTokenizer

from assets.checks import schema_result, schema_spec
from assets.common import SINGLE_RUN, commit_metadata, shard_partitions, sql_in, upstream_versions
from pipelines.artifacts import latest_row
from pipelines.batches import read_staged_shard
from pipelines.home import models_dir
from pipelines.lm import TinyGPT2Config, load_checkpoint, save_checkpoint, train_tiny_gpt2, train_tokenizer
from pipelines.settings import Settings, configured_path
from pipelines.shards import tokenize_corpus
from resources.delta import DeltaStore
from resources.tracking import MlflowTracker


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    @dg.asset(
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
            delta.write(
                "training_corpus", docs, mode="overwrite", partition_by=["shard_id"],
                replace_where={"shard_id": shard}, metadata=commit_metadata(context, {}),
            )
            rows += docs.height
        return dg.MaterializeResult(
            metadata={"documents": rows, "shards": len(context.partition_keys), "delta_version": delta.version("training_corpus")},
            check_results=[schema_result(delta, "training_corpus", sql_in("shard_id", list(context.partition_keys)))],
        )

    @dg.asset(
        deps=[training_corpus],
        code_version=settings.version("model"),
        check_specs=[schema_spec("model_checkpoint")],
        group_name="model",
        kinds={"pytorch", "safetensors"},
    )
    def model_checkpoint(context: dg.AssetExecutionContext, delta: DeltaStore, mlflow: MlflowTracker) -> dg.MaterializeResult:
        """The causal LM being valued: a local HF checkpoint, or a small GPT-2 trained on the corpus."""
        m = settings.model
        corpus_version = delta.version("training_corpus")
        mlflow_run_id = ""
        if m.checkpoint_dir:
            path = configured_path(m.checkpoint_dir, "[model] checkpoint_dir")
            model, _, digest = load_checkpoint(path)
            source = "local"
        else:
            corpus = delta.read("training_corpus", columns=["doc_id", "provider_id", "batch_id", "text"])
            context.log.info(f"training a {m.vocab_size}-token BPE tokenizer on {corpus.height} documents")
            tokenizer = train_tokenizer(corpus["text"].to_list(), vocab_size=m.vocab_size)
            sequences = tokenize_corpus(corpus, tokenizer, m.n_positions)["input_ids"].to_list()
            config = TinyGPT2Config(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, n_positions=m.n_positions)
            params = {**settings.to_dict()["model"], "sequences": len(sequences), "corpus_version": corpus_version}
            with mlflow.run("embedded-model-training", params=params, tags={"dagster_run_id": context.run_id}) as run:
                def on_step(step: int, loss: float) -> None:
                    if step % 10 == 0 or step == m.train_steps - 1:
                        run.log_metrics({"train_loss": loss}, step=step)
                    if step % 100 == 0 or step == m.train_steps - 1:
                        context.log.info(f"embedded GPT-2 step {step + 1}/{m.train_steps}: loss {loss:.3f}")

                model = train_tiny_gpt2(
                    sequences, tokenizer, config, steps=m.train_steps, batch_size=m.train_batch_size,
                    lr=m.learning_rate, seed=m.seed, on_step=on_step,
                )
                staging = models_dir() / f".staging-{context.run_id}"
                digest = save_checkpoint(model, tokenizer, staging)
                path = models_dir() / digest[:16]
                if path.exists():
                    shutil.rmtree(staging)
                else:
                    staging.rename(path)
                mlflow_run_id = run.run_id
            source = "embedded"
        row = pl.DataFrame(
            {
                "checkpoint_hash": [digest], "path": [str(path)], "source": [source],
                "model_type": [model.config.model_type], "parameters": [sum(p.numel() for p in model.parameters())],
                "context_length": [model.config.max_position_embeddings], "corpus_version": [corpus_version],
                "mlflow_run_id": [mlflow_run_id], "created_at": [datetime.now(timezone.utc)],
            }
        )
        version = delta.write(  # one row per checkpoint: re-materializing the same one replaces its row
            "model_checkpoint", row, mode="overwrite", replace_where={"checkpoint_hash": digest},
            metadata=commit_metadata(context, {"training_corpus": corpus_version}),
        )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(digest[:16]),
            metadata={"checkpoint_hash": digest, "path": str(path), "source": source, "parameters": row["parameters"][0],
                      "mlflow_run_id": mlflow_run_id, "delta_version": version},
            check_results=[schema_result(delta, "model_checkpoint")],
        )

    @dg.asset(
        partitions_def=shard_partitions,
        backfill_policy=SINGLE_RUN,
        deps=[dg.AssetDep(training_corpus, partition_mapping=dg.IdentityPartitionMapping()), model_checkpoint],
        code_version=settings.version("shards"),
        check_specs=[schema_spec("token_shards")],
        group_name="corpus",
        kinds={"delta", "polars"},
    )
    def token_shards(context: dg.AssetExecutionContext, delta: DeltaStore) -> dg.MaterializeResult:
        """Fixed-length training sequences that never cross a document, with doc/provider offsets."""
        upstream = upstream_versions(delta, "training_corpus", "model_checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(latest_row(delta, "model_checkpoint")["path"], local_files_only=True)
        docs = delta.read("training_corpus", filter=sql_in("shard_id", list(context.partition_keys)))
        sequences, tokens, split = 0, 0, 0
        for shard, shard_docs in docs.sort("shard_id").group_by("shard_id", maintain_order=True):
            seqs = tokenize_corpus(shard_docs, tokenizer, settings.shards.seq_len)
            seqs = seqs.sort("doc_id", "token_start").with_columns(
                shard_id=pl.lit(shard[0]), seq_index=pl.int_range(pl.len(), dtype=pl.Int64)
            ).with_columns(seq_id=pl.col("shard_id") + ":" + pl.col("seq_index").cast(pl.String).str.zfill(5))
            delta.write(
                "token_shards", seqs, mode="overwrite", partition_by=["shard_id"],
                replace_where={"shard_id": shard[0]}, metadata=commit_metadata(context, upstream),
            )
            sequences += seqs.height
            tokens += int(seqs["n_tokens"].sum())
            split += seqs.group_by("doc_id").len().filter(pl.col("len") > 1).height
        context.log.info(f"{sequences} sequences from {docs.height} documents ({split} split across sequences)")
        return dg.MaterializeResult(
            metadata={"sequences": sequences, "tokens": tokens, "documents": docs.height, "documents_split": split},
            check_results=[schema_result(delta, "token_shards", sql_in("shard_id", list(context.partition_keys)))],
        )

    return [training_corpus, model_checkpoint, token_shards]
