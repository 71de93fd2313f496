"""Provider values vs leave-provider-out retraining (issue 11), on the embedded corpus.

    .venv/bin/python benchmarks/provider_values.py                      # the embedded default (ModelSettings)
    .venv/bin/python benchmarks/provider_values.py --setup small        # n_embd 64, seq_len 64, 5 providers
    .venv/bin/python benchmarks/provider_values.py --output results.json

What the pipeline does, without Dagster: the embedded GPT-2 is trained on the corpus (held-out documents
excluded), the queries are data/embedded_queries.jsonl (held-out documents: prompt + reference completion,
group = provider), the training sequences' gradients are captured with the default projection and EK-FAC
curvature, and each provider's value (domain/valuation.py: predicted rise of the mean query loss, nats, if
its rows were removed) is compared with fine-tuning the trained model with and without the provider's rows
(domain/quality.py: evaluate_provider_values): each provider alone and random sets of providers, 2 seeds.
To fit ~20 minutes on 2 CPU cores, the valued training set (N in the unit) and every fine-tuning use a seeded
sample of --max-train training sequences.
Prints a markdown section for benchmarks/RESULTS.md and the per-removal figures.
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
from domain.lm import train_embedded_model  # noqa: E402
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
    parser.add_argument("--random-sets", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-train", type=int, default=600, help="training sequences valued and fine-tuned on")
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
    model, tokenizer, _ = train_embedded_model(corpus, settings.model)
    log(f"trained the {args.setup} model ({settings.model.train_steps} steps) on {corpus.height} documents")
    seqs = tokenize_corpus(corpus, tokenizer, settings.shards.seq_len)
    providers = sorted(seqs["provider_id"].unique().to_list())
    code = {p: i for i, p in enumerate(providers)}
    picked = sorted(torch.randperm(seqs.height, generator=torch.Generator().manual_seed(0))[: args.max_train].tolist())
    seqs = seqs[picked]  # a seeded sample: the valued training set N, and what each fine-tuning sees
    train = [list(ids) for ids in seqs["input_ids"].to_list()]
    train_providers = torch.tensor([code[p] for p in seqs["provider_id"].to_list()])

    prompts = [p for p in read_prompts(defaults.queries_path()) if not setup["providers"] or p.get("group") in code]
    completions = completions_of(model, tokenizer, settings, prompts)
    queries = encode_queries(tokenizer, [p["prompt"] for p in prompts], completions)
    query_providers = torch.tensor([code.get(p.get("group"), -1) for p in prompts])
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id, seed=settings.model.seed)
    losses = query_losses(model, task, queries).numpy()
    log(f"{len(train)} training sequences, {len(queries)} queries, mean query loss {losses.mean():.3f} nats")

    config = quality.ProviderRetrainConfig(
        seeds=args.seeds, random_sets=args.random_sets, epochs=args.epochs, lr=args.lr, batch_size=16
    )

    def progress(done: int, total: int) -> None:
        log(f"fine-tuned {done}/{total} removals")

    metrics, arrays = quality.evaluate_provider_values(
        model,
        task,
        train,
        train_providers,
        queries,
        settings.projection,
        settings.curvature,
        config,
        query_providers=query_providers,
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
            "seeds": args.seeds,
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
    }
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    log("done")


if __name__ == "__main__":
    main()
