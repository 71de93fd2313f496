"""valuation_quality: how well the current settings' attribution predicts retraining, on a small sample.

Not part of the default job (fine-tuning m subsets x S seeds is the expensive part): expose it with
`build(...)` and materialize it on demand. Base model: the current checkpoint; training set: at most
`max_train` sequences of token_shards; queries: the current valuation_queries (prompt + completion,
the completion is the measured loss); provider-id queries: the first sequence of held-out documents.

Provider values against leave-provider-out retraining: the same training sample is fine-tuned from the
checkpoint with and without each provider (and random sets of providers), and the predicted rise of the mean
query loss (value_nats, domain/valuation.py) is compared with the measured one: Spearman across providers,
calibration slope and intercept, fraction of correct signs, each with a bootstrap interval over retraining
seeds and queries (metrics `provider_*`). Fine-tuning the checkpoint is a proxy (the asset cannot know how a
user's model was trained): it measures one more pass over the data, not the retraining from a fixed base
that the unit names; benchmarks/provider_values.py measures both on the embedded model. When the queries carry a `group`
naming a provider (held-out documents), `provider_values_acc` is the fraction of them whose own provider has
the largest value.
"""

import math

import dagster as dg
import torch

from assets.steps import step_tags
from dataworth import CausalLMTask
from domain import quality
from domain.artifacts import load_model
from domain.gradients import pipeline_projection_config
from domain.queries import encode_queries
from domain.settings import Settings
from resources.delta import DeltaStore
from resources.tracking import MlflowTracker

HELD_OUT_PER_PROVIDER = 2  # documents per provider used as provider-id queries
DEFAULT_RETRAIN = quality.RetrainConfig(subsets=8, seeds=2)  # 16 fine-tunings of <= max_train sequences
DEFAULT_PROVIDER_RETRAIN = quality.ProviderRetrainConfig()  # (1 + P + 4) x 2 fine-tunings of <= max_train sequences


def build(
    settings: Settings,
    *,
    retrain: quality.RetrainConfig = DEFAULT_RETRAIN,
    provider_retrain: quality.ProviderRetrainConfig | None = DEFAULT_PROVIDER_RETRAIN,
    max_train: int = 200,
) -> dg.AssetsDefinition:
    """valuation_quality, its code version taken from `settings`."""

    @dg.asset(
        op_tags=step_tags(settings.deployment, gpu=True),
        deps=["model_checkpoint", "token_shards", "valuation_queries"],
        code_version=settings.version("projection", "curvature", "scores.normalize"),
        group_name="quality",
        kinds={"pytorch", "mlflow"},
    )
    def valuation_quality(
        context: dg.AssetExecutionContext, delta: DeltaStore, mlflow: MlflowTracker
    ) -> dg.MaterializeResult:
        """LDS, seed-to-seed agreement and provider-id accuracy of the current projection and curvature, and
        provider values against leave-provider-out fine-tuning."""
        model, tokenizer, model_row = load_model(delta)
        seqs = delta.read("token_shards", columns=["seq_id", "doc_id", "provider_id", "input_ids"]).sort("seq_id")
        queries = delta.read("valuation_queries", columns=["query_id", "prompt", "completion", "query_group"]).sort(
            "query_id"
        )
        if seqs.height == 0 or queries.height == 0:
            raise dg.Failure("valuation_quality needs token_shards and valuation_queries; materialize them first")
        train_rows, held_rows = quality.held_out_split(
            seqs["doc_id"].to_list(), seqs["provider_id"].to_list(), HELD_OUT_PER_PROVIDER, max_train, retrain.seed
        )
        providers = sorted(seqs["provider_id"].unique().to_list())
        code = {p: i for i, p in enumerate(providers)}
        ids = [list(x) for x in seqs["input_ids"].to_list()]
        provider_ids = seqs["provider_id"].to_list()
        task = CausalLMTask(pad_token_id=tokenizer.pad_token_id, seed=settings.model.seed)
        projection = pipeline_projection_config(settings.projection, model, adapter=bool(model_row["adapter_path"]))

        def progress(done: int, total: int) -> None:
            context.log.info(f"subset {done}/{total} fine-tuned ({retrain.seeds} seeds)")

        metrics = quality.evaluate(
            model,
            task,
            [ids[i] for i in train_rows],
            encode_queries(tokenizer, queries["prompt"].to_list(), queries["completion"].to_list()),
            projection,
            settings.curvature,
            retrain,
            normalize=settings.scores.normalize,
            train_providers=torch.tensor([code[provider_ids[i]] for i in train_rows]),
            provider_queries=[ids[i] for i in held_rows],
            query_providers=torch.tensor([code[provider_ids[i]] for i in held_rows]),
            progress=progress,
        )
        if provider_retrain is not None:
            train_codes = torch.tensor([code[provider_ids[i]] for i in train_rows])
            present = sorted(set(train_codes.tolist()))  # providers with rows in the sample, renumbered 0..P'-1
            renumber = {c: i for i, c in enumerate(present)}
            group_codes = [renumber.get(code.get(g, -1), -1) if g else -1 for g in queries["query_group"].to_list()]

            def removal_progress(done: int, total: int) -> None:
                context.log.info(f"leave-provider-out fine-tuning {done}/{total}")

            provider_metrics, _ = quality.evaluate_provider_values(
                model,
                task,
                [ids[i] for i in train_rows],
                torch.tensor([renumber[c] for c in train_codes.tolist()]),
                encode_queries(tokenizer, queries["prompt"].to_list(), queries["completion"].to_list()),
                projection,
                settings.curvature,
                provider_retrain,
                query_providers=torch.tensor(group_codes),
                normalize=settings.scores.normalize,
                progress=removal_progress,
            )
            metrics.update({f"provider_{k}": v for k, v in provider_metrics.items() if k != "provider_acc"})
            if "provider_acc" in provider_metrics:
                metrics["provider_values_acc"] = provider_metrics["provider_acc"]
        if not metrics["seed_agreement"] > 0.3:
            context.log.warning(
                f"seed agreement {metrics['seed_agreement']:.3f}: the LDS ground truth is mostly retraining noise"
            )
        params = {
            "model_hash": model_row["checkpoint_hash"],
            "projection": projection.to_json(),
            "curvature": settings.curvature.to_json(),
            "normalize": settings.scores.normalize,
            "subsets": retrain.subsets,
            "seeds": retrain.seeds,
            "epochs": retrain.epochs,
            "lr": retrain.lr,
            "provider_retrain": repr(provider_retrain),
        }
        with mlflow.run("valuation-quality", params=params, tags={"dagster_run_id": context.run_id}) as run:
            run.log_metrics(
                {k: v for k, v in metrics.items() if math.isfinite(v)}
            )  # nan (seed agreement of one seed) left out
            run_id = run.run_id
        return dg.MaterializeResult(
            metadata={
                **{k: float(v) for k, v in metrics.items()},
                "provider_queries": len(held_rows),
                "mlflow_run_id": run_id,
            }
        )

    return valuation_quality
