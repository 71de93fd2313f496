"""Provider values vs leave-provider-out retraining (issue 11), on the embedded corpus.

    .venv/bin/python benchmarks/provider_values.py                      # the embedded default (ModelSettings)
    .venv/bin/python benchmarks/provider_values.py --setup small        # n_embd 64, seq_len 64, 5 providers
    .venv/bin/python benchmarks/provider_values.py --output results.json
    .venv/bin/python benchmarks/provider_values.py --ground-truth base --seeds 3   # fine-tuned from a fixed base

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
--ground-truth base: the valued model is fine-tuned from a fixed pre-trained base, the way a released LLM is
trained on the data it is valued on. A seeded --base-fraction of each provider's documents pre-trains the base
(the embedded training, from a random init); the other documents' rows fine-tune it (--epochs, --lr, the same
schedule and content-keyed data order), and each retraining fine-tunes the same base without the removed rows.
--ground-truth finetune: the proxy `valuation_quality` uses for a model whose training is unknown: the
trained model is fine-tuned (--epochs, --lr) with and without the provider's rows.
--max-train N values (and retrains on) a seeded sample of N training sequences (0: all of them).
Prints the metrics and the per-removal figures as JSON.
"""

import argparse
import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase

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
BASE_SEED = 7919  # --ground-truth base: which documents pre-train the base, and its training seed
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


@dataclass
class Valued:
    """The valued model and its training rows: train (N token-id lists), train_providers (N,) indices into
    providers; train_fn(examples, seed) trains it again the way it was made (None: `finetune`, the proxy)."""

    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerBase
    providers: list[str]
    train: list[list[int]]
    train_providers: torch.Tensor
    train_fn: Callable[[list, int], GPT2LMHeadModel] | None
    settings: Settings


def setup_settings(setup: str) -> Settings:
    defaults = Settings()
    return replace(
        defaults,
        model=replace(ModelSettings(), **SETUPS[setup]["model"]),
        shards=ShardSettings(seq_len=SETUPS[setup]["seq_len"] or defaults.shards.seq_len),
    )


def base_split(corpus: pl.DataFrame, fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(base documents, valued training documents): a seeded `fraction` of each provider's documents
    pre-trains the base, the rest are the rows the fine-tuned model is valued on."""
    rng = random.Random(BASE_SEED)
    base = []
    for provider in sorted(corpus["provider_id"].unique().to_list()):
        ids = sorted(corpus.filter(pl.col("provider_id") == provider)["doc_id"].to_list())
        rng.shuffle(ids)
        base += ids[: round(fraction * len(ids))]
    in_base = pl.col("doc_id").is_in(base)
    return corpus.filter(in_base), corpus.filter(~in_base)


def valued_model(setup: str, retrain: dict, log: Callable[[str], None] = print) -> Valued:
    """The valued model of a run whose options are `retrain` (the JSON's "retrain"), trained again
    (deterministic), with its training rows and its retraining."""
    settings = setup_settings(setup)
    m = settings.model
    corpus = load_corpus(SETUPS[setup]["providers"])
    ground_truth = retrain["ground_truth"]
    if ground_truth == "finetune":
        model, tokenizer, _ = train_embedded_model(corpus, m)
        log(f"trained the {setup} model ({m.train_steps} steps) on {corpus.height} documents")
    else:
        tokenizer = train_tokenizer(corpus["text"].to_list(), vocab_size=m.vocab_size)
    shape, base = TinyGPT2Config.of(m), None
    if ground_truth == "base":
        base_docs, corpus = base_split(corpus, retrain["base_fraction"])
        base_rows = tokenize_corpus(base_docs, tokenizer, settings.shards.seq_len)["input_ids"].to_list()
        base = train_tiny_gpt2(
            base_rows,
            tokenizer,
            shape,
            steps=m.train_steps,
            batch_size=m.train_batch_size,
            lr=m.learning_rate,
            seed=BASE_SEED,
        )
        log(f"pre-trained the base ({m.train_steps} steps) on {len(base_rows)} sequences, {base_docs.height} documents")
    seqs = tokenize_corpus(corpus, tokenizer, settings.shards.seq_len)
    providers = sorted(seqs["provider_id"].unique().to_list())
    code = {p: i for i, p in enumerate(providers)}
    if retrain["max_train"]:  # a seeded sample: the valued training set N, and what each retraining sees
        order = torch.randperm(seqs.height, generator=torch.Generator().manual_seed(0))
        seqs = seqs[sorted(order[: retrain["max_train"]].tolist())]
    train = [list(ids) for ids in seqs["input_ids"].to_list()]
    train_providers = torch.tensor([code[p] for p in seqs["provider_id"].to_list()])
    if ground_truth == "finetune":
        return Valued(model, tokenizer, providers, train, train_providers, None, settings)
    valued_training_seed = retrain["valued_seed"] * 1000  # = retraining seed 0 (quality.measured_removal_effects)
    if base is None:  # scratch: the embedded training, its steps and learning rate
        steps, lr = m.train_steps, m.learning_rate
    else:  # fine-tuning the base: `epochs` passes over the training rows
        steps, lr = math.ceil(retrain["epochs"] * len(train) / m.train_batch_size), retrain["lr"]

    def train_fn(examples, seed: int):
        """The valued model's training on `examples`, from its seeded random init (scratch) or from the base:
        the same epochs as the full training (budget "epochs") or the same optimizer steps ("steps")."""
        fraction = 1.0 if retrain["budget"] == "steps" else len(examples) / len(train)
        return train_tiny_gpt2(
            examples,
            tokenizer,
            shape,
            steps=max(1, round(steps * fraction)),
            batch_size=m.train_batch_size,
            lr=lr,
            seed=seed,
            init_seed=valued_training_seed if retrain["fixed_init"] else None,
            base=base,
        )

    model = train_fn(train, valued_training_seed)  # the valued model: the full training of retraining seed 0
    log(f"trained the {setup} model ({ground_truth}, {steps} steps) on {len(train)} sequences")
    return Valued(model, tokenizer, providers, train, train_providers, train_fn, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=sorted(SETUPS), default="embedded")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="retraining seeds start here (more seeds for a saved run)"
    )
    parser.add_argument(
        "--valued-seed",
        type=int,
        default=0,
        help="the valued model is the full training of seed 1000 x this; retraining seeds count from there",
    )
    parser.add_argument("--random-sets", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1, help="finetune, base: passes over the training rows")
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="finetune, base: learning rate (base: the schedule's peak)"
    )
    parser.add_argument("--ground-truth", choices=("scratch", "base", "finetune"), default="scratch")
    parser.add_argument(
        "--base-fraction", type=float, default=0.5, help="base: of each provider's documents, pre-train the base"
    )
    parser.add_argument(
        "--budget", choices=("epochs", "steps"), default="epochs", help="scratch, base: what stays fixed"
    )
    parser.add_argument(
        "--fixed-init", action="store_true", help="scratch: every retraining starts from the valued model's init"
    )
    parser.add_argument("--max-train", type=int, default=0, help="training sequences valued and retrained on (0: all)")
    parser.add_argument("--output", type=Path, help="write the metrics and per-removal figures as JSON")
    args = parser.parse_args()
    if not 0 < args.base_fraction < 1:
        parser.error(f"--base-fraction {args.base_fraction} must be between 0 and 1 (the base's share of documents)")
    if args.fixed_init and args.ground_truth != "scratch":
        parser.error("--fixed-init is for --ground-truth scratch (base: every retraining starts from the base)")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    retrain = {
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
        "base_fraction": args.base_fraction,
    }
    config = quality.ProviderRetrainConfig(
        seeds=args.seeds,
        random_sets=args.random_sets,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=16,
        seed=args.valued_seed,
    )
    valued = valued_model(args.setup, retrain, log)
    model, tokenizer, providers, train = valued.model, valued.tokenizer, valued.providers, valued.train
    settings, setup, code = valued.settings, SETUPS[args.setup], {p: i for i, p in enumerate(valued.providers)}
    prompts = [p for p in read_prompts(settings.queries_path()) if not setup["providers"] or p.get("group") in code]
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
        valued.train_providers,
        queries,
        pipeline_projection_config(settings.projection, model, adapter=False),
        settings.curvature,
        config,
        query_providers=query_providers,
        train_fn=(lambda examples, seed: valued.train_fn(examples, seed + args.first_seed))
        if valued.train_fn
        else None,
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
        "retrain": retrain,
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
