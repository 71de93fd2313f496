"""How the predicted removal effects move with the valuation's settings, against a saved leave-provider-out run.

    .venv/bin/python benchmarks/provider_values.py --seeds 4 --output lpo.json     # the ground truth, once
    .venv/bin/python benchmarks/provider_values_sensitivity.py lpo.json

Retrains the valued model of that run (the embedded GPT-2, seed 0, all training rows; deterministic, so the same
model), then values the providers under a few settings (the default; rank 64; damping 0.001; lm_head or the token
embedding left out; projection seeds 1 and 2, whose spread is set beside the query-bootstrap interval)
and compares each with the saved measured effects:
Spearman across single-provider removals, calibration slope and intercept, sign agreement (domain/quality.py).
Needs a run of the `embedded` setup with `--ground-truth scratch` and no `--max-train`.
"""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provider_values import load_corpus  # noqa: E402

from dataworth import CausalLMTask  # noqa: E402
from domain import quality  # noqa: E402
from domain.gradients import pipeline_projection_config  # noqa: E402
from domain.lm import TinyGPT2Config, train_tiny_gpt2, train_tokenizer  # noqa: E402
from domain.queries import completions_of, encode_queries, read_prompts  # noqa: E402
from domain.sequences import tokenize_corpus  # noqa: E402
from domain.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ground_truth", type=Path, help="JSON written by provider_values.py --output")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    args = parser.parse_args()
    saved = json.loads(args.ground_truth.read_text())
    if (
        saved["setup"] != "embedded"
        or saved["retrain"].get("ground_truth") != "scratch"
        or saved["retrain"]["max_train"]
    ):
        raise SystemExit(f"{args.ground_truth}: needs an embedded, --ground-truth scratch run on all training rows")
    settings = Settings()
    m = settings.model
    corpus = load_corpus(None)
    tokenizer = train_tokenizer(corpus["text"].to_list(), vocab_size=m.vocab_size)
    seqs = tokenize_corpus(corpus, tokenizer, settings.shards.seq_len)
    providers = sorted(seqs["provider_id"].unique().to_list())
    code = {p: i for i, p in enumerate(providers)}
    train = [list(ids) for ids in seqs["input_ids"].to_list()]
    groups = torch.tensor([code[p] for p in seqs["provider_id"].to_list()])
    shape = TinyGPT2Config.of(m)
    model = train_tiny_gpt2(
        train, tokenizer, shape, steps=m.train_steps, batch_size=m.train_batch_size, lr=m.learning_rate, seed=0
    )
    prompts = read_prompts(settings.queries_path())
    queries = encode_queries(
        tokenizer, [p["prompt"] for p in prompts], completions_of(model, tokenizer, settings, prompts)
    )
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id, seed=m.seed)
    removals = [[code[p] for p in r["removed"]] for r in saved["removals"]]
    measured = np.array([r["measured"] for r in saved["removals"]])

    own = torch.tensor([code.get(p.get("group"), -1) for p in prompts])  # the held-out documents' provider
    rows = torch.bincount(groups, minlength=len(providers)).double()[:, None]

    def evaluate(name: str, valued: nn.Module, projection, curvature) -> tuple[np.ndarray, torch.Tensor]:
        projection = pipeline_projection_config(projection, valued, adapter=False)  # no wpe; ranks cut to widths
        gradients = quality.capture(valued, task, train, queries, projection, fishers=(curvature.fisher,))
        scores = quality.score_matrix(gradients, curvature)
        sums = quality.group_sums(scores, groups, len(providers))
        predicted = quality.predicted_removal_effects(sums, removals, len(train)).numpy()
        agreement = quality.removal_agreement(predicted, measured, len(providers))
        cells = " | ".join(f"{agreement[k]:.3f}" for k in ("spearman", "slope", "intercept", "sign_agreement"))
        cosine = quality.group_sums(quality.score_matrix(gradients, curvature, "cosine"), groups, len(providers))
        labelled = own >= 0
        ids = [quality.provider_accuracy(m[:, labelled], own[labelled]) for m in (sums, sums / rows, cosine / rows)]
        print(f"| {name} | {cells} | {' | '.join(f'{x:.2f}' for x in ids)} |", flush=True)
        return predicted, sums

    print(
        "| valuation setting | Spearman (singles) | slope | intercept | sign agreement "
        "| provider id. (sum) | id. (mean per row) | id. (mean cosine) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    predicted, sums = {}, {}
    for name in args.configs:
        label, projection, curvature = CONFIGS[name](settings.projection, settings.curvature)
        predicted[name], sums[name] = evaluate(label, model, projection, curvature)
    if "default" in predicted:  # per removal, as the quick start's values add up
        print("\n| removed | predicted, default (nats) | measured (nats, mean of the seeds) |\n|---|---|---|")
        for removal, p, m in zip(saved["removals"], predicted["default"], measured):
            print(f"| {', '.join(removal['removed'])} | {p:+.3f} | {m:+.3f} |")
    seeds = [n for n in ("default", *PROJECTION_SEEDS) if n in sums]
    if len(seeds) > 1:
        print_seed_spread(providers, [sums[n] for n in seeds], len(train))


def print_seed_spread(providers: list[str], sums: list[torch.Tensor], training_rows: int) -> None:
    """The estimator's two uncertainties side by side, per provider: the spread of value_nats over projection
    seeds, and the half-width of the 95% bootstrap interval over queries (the pipeline's interval) of one seed.
    `sums`: one (P, Q) group_sums per projection seed."""
    values = torch.stack([s.double().mean(1) / training_rows for s in sums]).numpy()  # (seeds, P)
    rng = np.random.default_rng(0)
    first = sums[0].double().numpy() / training_rows  # (P, Q)
    picks = rng.integers(0, first.shape[1], size=(1000, first.shape[1]))
    boot = first[:, picks].mean(2)  # (P, 1000)
    half = (np.percentile(boot, 97.5, axis=1) - np.percentile(boot, 2.5, axis=1)) / 2
    print(f"\n| provider | value_nats over {len(sums)} projection seeds | seed std | 95% query-bootstrap half-width |")
    print("|---|---|---|---|")
    for p, name in enumerate(providers):
        cells = ", ".join(f"{v:+.3f}" for v in values[:, p])
        print(f"| {name} | {cells} | {values[:, p].std(ddof=1):.3f} | {half[p]:.3f} |")
    ratio = values.std(0, ddof=1).mean() / half.mean()
    print(f"\nmean seed std / mean bootstrap half-width: {ratio:.3f}")


PROJECTION_SEEDS = {"seed1": 1, "seed2": 2}  # config name -> projection seed; the default is seed 0
# name -> (default projection, curvature) -> (row label, projection, curvature)
CONFIGS = {
    "default": lambda p, c: ("default (rank 32, lm_head 16 x 1024, wte 1024 x 16, damping 0.01 relative)", p, c),
    "rank64": lambda p, c: ("rank 64 (lm_head 16 x 1024)", replace(p, rank_in=64, rank_out=64), c),
    "damping": lambda p, c: ("damping 0.001 relative", p, replace(c, damping=0.001)),
    "no_head": lambda p, c: ("lm_head left out", replace(p, exclude=(*p.exclude, "lm_head")), c),
    "no_embedding": lambda p, c: ("token embedding left out", replace(p, embeddings=False), c),
    **{
        name: (lambda p, c, k=k: (f"projection seed {k}", replace(p, seed=k), c))
        for name, k in PROJECTION_SEEDS.items()
    },
}


if __name__ == "__main__":
    main()
