"""Provider values vs leave-provider-out retraining (issue 11), on the embedded corpus.

    .venv/bin/python benchmarks/provider_values.py                      # the embedded default (ModelSettings)
    .venv/bin/python benchmarks/provider_values.py --setup small        # n_embd 64, seq_len 64, 5 providers
    .venv/bin/python benchmarks/provider_values.py --output results.json

What the pipeline does, without Dagster: the queries are data/embedded_queries.jsonl (held-out documents:
prompt + reference completion, group = provider), the training sequences' gradients are captured with the
default projection and EK-FAC curvature, and each provider's value (domain/valuation.py: predicted rise of
the mean query loss, nats, if its rows were removed) is compared with retraining without the provider's rows
(domain/quality.py: evaluate_provider_values): each provider alone and random sets of providers, 2 seeds.

--ground-truth scratch (default): the counterfactual the unit names. The embedded GPT-2 is trained from its
fixed random init on the valued training rows (tokenizer fixed, trained on the whole corpus), and retrained
the same way (same seed) without each removed set, for the same number of epochs (--budget epochs: fewer
rows, proportionally fewer steps, as a dataset without the provider would be trained) or of optimizer steps
(--budget steps: the remaining rows get the removed rows' steps). The valued model is the seed-0 full model.
A retraining seed sets the random init and the data order; with --fixed-init every retraining starts from
the valued model's init (the fixed base) and the seeds differ in data order only. --valued-seed K values the
full training of seed 1000 K instead, and its retraining seed 1000 K + s: with --seeds 1 the ground truth is
that model's own training (same init, same data order) without the removed rows.
--ground-truth finetune: the proxy `valuation_quality` uses for a model whose training is unknown: the
trained model is fine-tuned (--epochs, --lr) with and without the provider's rows.
--max-train N values (and retrains on) a seeded sample of N training sequences (0: all of them).
Prints the metrics and the per-removal figures as JSON.
"""

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataworth import CausalLMTask  # noqa: E402
from domain import quality  # noqa: E402
from domain.gradients import pipeline_projection_config  # noqa: E402
from domain.lm import TinyGPT2Config, train_embedded_model, train_tiny_gpt2, train_tokenizer  # noqa: E402
from domain.queries import completions_of, encode_queries, query_losses, read_prompts  # noqa: E402
from domain.sequences import tokenize_corpus  # noqa: E402
from domain.settings import ModelSettings, Settings, ShardSettings  # noqa: E402
from domain.valuation import provider_table  # noqa: E402

CORPUS = ROOT / "data" / "embedded_corpus"
SETUPS = {
    "embedded": {"model": {}, "seq_len": None, "providers": None},
    "small": {
        "model": {"n_embd": 64, "n_positions": 64, "train_steps": 400},
        "seq_len": 64,
        "providers": ["dagster", "numpy", "pandas", "polars", "torch"],
    },
}


def load_corpus(providers: list[str] | None) -> pl.DataFrame:
    rows = [json.loads(line) for path in sorted(CORPUS.glob("*.jsonl")) for line in path.read_text().splitlines()]
    docs = pl.DataFrame(rows).select("doc_id", "provider_id", "text").with_columns(batch_id=pl.lit("b0"))
    return docs.filter(pl.col("provider_id").is_in(providers)) if providers else docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=sorted(SETUPS), default="embedded")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="scratch: retraining seeds start here (more seeds for a saved run)"
    )
    parser.add_argument(
        "--valued-seed",
        type=int,
        default=0,
        help="scratch: the valued model is the full training of seed 1000 x this; retraining seeds count from there",
    )
    parser.add_argument("--random-sets", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ground-truth", choices=("scratch", "finetune"), default="scratch")
    parser.add_argument("--budget", choices=("epochs", "steps"), default="epochs", help="scratch: what stays fixed")
    parser.add_argument(
        "--fixed-init", action="store_true", help="scratch: every retraining starts from the valued model's init"
    )
    parser.add_argument("--max-train", type=int, default=0, help="training sequences valued and retrained on (0: all)")
    parser.add_argument("--output", type=Path, help="write the metrics and per-removal figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    started = time.perf_counter()
    setup = SETUPS[args.setup]
    defaults = Settings()
    settings = replace(
        defaults,
        model=replace(ModelSettings(), **setup["model"]),
        shards=ShardSettings(seq_len=setup["seq_len"] or defaults.shards.seq_len),
    )

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    corpus = load_corpus(setup["providers"])
    m = settings.model
    config = quality.ProviderRetrainConfig(
        seeds=args.seeds,
        random_sets=args.random_sets,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=16,
        seed=args.valued_seed,
    )
    if args.ground_truth == "finetune":
        model, tokenizer, _ = train_embedded_model(corpus, m)
        log(f"trained the {args.setup} model ({m.train_steps} steps) on {corpus.height} documents")
    else:
        tokenizer = train_tokenizer(corpus["text"].to_list(), vocab_size=m.vocab_size)
    seqs = tokenize_corpus(corpus, tokenizer, settings.shards.seq_len)
    providers = sorted(seqs["provider_id"].unique().to_list())
    code = {p: i for i, p in enumerate(providers)}
    if args.max_train:  # a seeded sample: the valued training set N, and what each retraining sees
        order = torch.randperm(seqs.height, generator=torch.Generator().manual_seed(0))
        seqs = seqs[sorted(order[: args.max_train].tolist())]
    train = [list(ids) for ids in seqs["input_ids"].to_list()]
    train_providers = torch.tensor([code[p] for p in seqs["provider_id"].to_list()])
    train_fn = None
    if args.ground_truth == "scratch":
        shape = TinyGPT2Config.of(m)
        valued_training_seed = config.seed * 1000  # = retraining seed 0 (domain/quality.py: measured_removal_effects)

        def train_fn(examples, seed: int):
            """The embedded model's training, from its seeded random init, on `examples`: the same epochs as
            the full training (--budget epochs) or the same optimizer steps (--budget steps)."""
            fraction = 1.0 if args.budget == "steps" else len(examples) / len(train)
            return train_tiny_gpt2(
                examples,
                tokenizer,
                shape,
                steps=max(1, round(m.train_steps * fraction)),
                batch_size=m.train_batch_size,
                lr=m.learning_rate,
                seed=seed,
                init_seed=valued_training_seed if args.fixed_init else None,
            )

        model = train_fn(train, valued_training_seed)  # the valued model: the full training of retraining seed 0
        log(f"trained the {args.setup} model from scratch ({m.train_steps} steps) on {len(train)} sequences")

    prompts = [p for p in read_prompts(defaults.queries_path()) if not setup["providers"] or p.get("group") in code]
    completions = completions_of(model, tokenizer, settings, prompts)
    queries = encode_queries(tokenizer, [p["prompt"] for p in prompts], completions)
    query_providers = torch.tensor([code.get(p.get("group"), -1) for p in prompts])
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id, seed=settings.model.seed)
    losses = query_losses(model, task, queries).numpy()
    log(f"{len(train)} training sequences, {len(queries)} queries, mean query loss {losses.mean():.3f} nats")

    def progress(done: int, total: int) -> None:
        log(f"retrained {done}/{total} removals ({args.ground_truth})")

    metrics, arrays = quality.evaluate_provider_values(
        model,
        task,
        train,
        train_providers,
        queries,
        pipeline_projection_config(settings.projection, model, adapter=False),
        settings.curvature,
        config,
        query_providers=query_providers,
        train_fn=(lambda examples, seed: train_fn(examples, seed + args.first_seed)) if train_fn else None,
        progress=progress,
    )
    table = provider_table(
        arrays["group_sums"].numpy(),
        providers,
        {},
        {},
        training_rows=len(train),
        query_losses=losses,
        completion_tokens=np.array([len(ids) - n for ids, n in queries]),
        bootstrap_samples=1000,
        seed=0,
    )
    predicted, measured = arrays["predicted"].numpy(), arrays["measured"].double().mean((0, 2)).numpy()
    seconds = time.perf_counter() - started
    removals = [[providers[p] for p in row.nonzero().flatten().tolist()] for row in arrays["removals"]]
    report = {
        "setup": args.setup,
        "command": " ".join(["python", *sys.argv]),
        "model": {k: getattr(settings.model, k) for k in ("n_layer", "n_embd", "n_positions", "train_steps")},
        "seq_len": settings.shards.seq_len,
        "retrain": {
            "ground_truth": args.ground_truth,
            "budget": args.budget,
            "seeds": args.seeds,
            "first_seed": args.first_seed,
            "valued_seed": args.valued_seed,
            "fixed_init": args.fixed_init,
            "random_sets": args.random_sets,
            "epochs": args.epochs,
            "lr": args.lr,
            "max_train": args.max_train,
        },
        "metrics": metrics,
        "mean_query_loss": float(losses.mean()),
        "removals": [
            {"removed": r, "predicted": float(p), "measured": float(m)}
            for r, p, m in zip(removals, predicted, measured)
        ],
        "providers": table.select(
            "provider_id", "value_nats", "ci_low", "ci_high", "verdict", "queries_helped"
        ).to_dicts(),
        "seconds": seconds,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "arrays": {  # for analyses without retraining
            "group_sums": arrays["group_sums"].tolist(),  # (P, Q) summed scores of each provider's rows
            "measured": arrays["measured"].tolist(),  # (S, R, Q) rise of each query's loss, nats
            "query_providers": query_providers.tolist(),  # (Q,) provider index of each query (-1: none)
            "query_losses": losses.tolist(),  # (Q,) nats
        },
    }
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    log("done")


if __name__ == "__main__":
    main()
