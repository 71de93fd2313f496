"""How the predicted removal effects move with the valuation's settings, against a saved leave-provider-out run.

    .venv/bin/python benchmarks/provider_values.py --seeds 4 --output lpo.json     # the ground truth, once
    .venv/bin/python benchmarks/provider_values_sensitivity.py lpo.json
    .venv/bin/python benchmarks/provider_values.py --seeds 3 --first-seed 4 --output more.json   # more seeds
    .venv/bin/python benchmarks/provider_values_sensitivity.py lpo.json more.json --configs default kronfluence

Trains the valued model of that run again (`provider_values.valued_model`, deterministic, so the same model),
then values the providers under a few settings (`CONFIGS`: the default; other ranks, damping, PCA or no
projection; lm_head, the token embedding or both left out; projection seeds 1 and 2, whose spread is set beside
the query-bootstrap interval; on request, Kronfluence's unprojected EK-FAC, the anchor, which needs the install
in benchmarks/README.md) and compares each with the saved measured effects, the seeds of every JSON pooled:
Spearman across single-provider removals, calibration slope and intercept, sign agreement (domain/quality.py).
Runs pooled must share every option but --seeds and --first-seed.
"""

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_kronfluence  # noqa: E402
from provider_values import SETUPS, valued_model  # noqa: E402

from dataworth import CausalLMTask  # noqa: E402
from domain import quality  # noqa: E402
from domain.gradients import pipeline_projection_config  # noqa: E402
from domain.queries import completions_of, encode_queries, read_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "ground_truth", type=Path, nargs="+", help="JSON written by provider_values.py --output; several: seeds pooled"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=sorted(CONFIGS | KRONFLUENCE),
        default=sorted(CONFIGS),
        help="default: all but Kronfluence's",
    )
    args = parser.parse_args()
    saved, measured_by_seed = pooled_ground_truth(args.ground_truth)
    valued = valued_model(saved["setup"], saved["retrain"])
    model, tokenizer, train, groups = valued.model, valued.tokenizer, valued.train, valued.train_providers
    providers, settings, m = valued.providers, valued.settings, valued.settings.model
    code = {p: i for i, p in enumerate(providers)}
    selected = SETUPS[saved["setup"]]["providers"]
    prompts = [p for p in read_prompts(settings.queries_path()) if not selected or p.get("group") in code]
    queries = encode_queries(
        tokenizer, [p["prompt"] for p in prompts], completions_of(model, tokenizer, settings, prompts)
    )
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id, seed=m.seed)
    removals = [[code[p] for p in r["removed"]] for r in saved["removals"]]
    measured = measured_by_seed.mean((0, 2))  # (R,) nats, mean over seeds and queries
    print(f"ground truth: {measured_by_seed.shape[0]} retraining seeds, {len(removals)} removals\n")

    own = torch.tensor([code.get(p.get("group"), -1) for p in prompts])  # the held-out documents' provider
    rows = torch.bincount(groups, minlength=len(providers)).double()[:, None]

    def evaluate(name: str, scores: torch.Tensor, cosine: torch.Tensor | None) -> tuple[np.ndarray, torch.Tensor]:
        """One table row for influence scores (N, Q); `cosine` (N, Q): the same, normalized (if available)."""
        sums = quality.group_sums(scores, groups, len(providers))
        predicted = quality.predicted_removal_effects(sums, removals, len(train)).numpy()
        agreement = quality.removal_agreement(predicted, measured, len(providers))
        cells = " | ".join(f"{agreement[k]:.3f}" for k in ("spearman", "slope", "intercept", "sign_agreement"))
        labelled = own >= 0
        rankings = (sums, sums / rows) + (
            () if cosine is None else (quality.group_sums(cosine, groups, len(providers)) / rows,)
        )
        ids = [f"{quality.provider_accuracy(m[:, labelled], own[labelled]):.2f}" for m in rankings]
        print(f"| {name} | {cells} | {' | '.join(ids + ['-'] * (3 - len(ids)))} |", flush=True)
        return predicted, sums

    def dataworth_scores(projection, curvature) -> tuple[torch.Tensor, torch.Tensor]:
        projection = pipeline_projection_config(projection, model, adapter=False)  # no wpe; ranks cut to widths
        gradients = quality.capture(model, task, train, queries, projection, fishers=(curvature.fisher,))
        return quality.score_matrix(gradients, curvature), quality.score_matrix(gradients, curvature, "cosine")

    print(
        "| valuation setting | Spearman (singles) | slope | intercept | sign agreement "
        "| provider id. (sum) | id. (mean per row) | id. (mean cosine) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    predicted, sums = {}, {}
    for name in args.configs:
        if name in KRONFLUENCE:
            label, options = KRONFLUENCE[name]
            with tempfile.TemporaryDirectory() as factors:
                by_damping = quality_kronfluence.damped_scores(
                    model, task, train, queries, Path(factors), settings.shards.seq_len, **options
                )
            for damping, scores in zip(options["dampings"], by_damping):
                predicted[name], sums[name] = evaluate(f"{label}, damping {damping} relative", scores, None)
            continue
        label, projection, curvature = CONFIGS[name](settings.projection, settings.curvature)
        predicted[name], sums[name] = evaluate(label, *dataworth_scores(projection, curvature))
    if "default" in predicted:  # per removal, as the quick start's values add up
        print("\n| removed | predicted, default (nats) | measured (nats, mean of the seeds) |\n|---|---|---|")
        for removal, p, m in zip(saved["removals"], predicted["default"], measured):
            print(f"| {', '.join(removal['removed'])} | {p:+.3f} | {m:+.3f} |")
    seeds = [n for n in ("default", *PROJECTION_SEEDS) if n in sums]
    if len(seeds) > 1:
        print_seed_spread(providers, [sums[n] for n in seeds], len(train))


def pooled_ground_truth(paths: list[Path]) -> tuple[dict, np.ndarray]:
    """The first run's JSON, and the measured rises (S, R, Q) of every run's seeds, stacked: runs of the same
    setup and removals with different --first-seed pool into one ground truth with more seeds."""
    runs = [json.loads(path.read_text()) for path in paths]
    for run in runs:  # the options of runs made before they existed
        run["retrain"] = {**RETRAIN_DEFAULTS, **run["retrain"]}

    def options(run: dict) -> dict:
        """What makes one ground truth: the setup and every retrain option but its seeds."""
        kept = {k: v for k, v in run["retrain"].items() if k not in ("seeds", "first_seed")}
        return {"setup": run["setup"], **kept}

    for path, run in zip(paths, runs):
        if [r["removed"] for r in run["removals"]] != [r["removed"] for r in runs[0]["removals"]]:
            raise SystemExit(f"{path}: its removals differ from {paths[0]}'s; pool runs of the same --random-sets only")
        for key, value in options(run).items():
            if value != options(runs[0]).get(key):
                raise SystemExit(f"{path}: its {key} differs from {paths[0]}'s; pool runs of one ground truth only")
    starts = [run["retrain"]["first_seed"] for run in runs]
    seeds = [set(range(start, start + run["retrain"]["seeds"])) for start, run in zip(starts, runs)]
    if sum(map(len, seeds)) != len(set().union(*seeds)):
        raise SystemExit(f"{', '.join(map(str, paths))}: their retraining seeds overlap; run with other --first-seed")
    return runs[0], np.concatenate([np.array(run["arrays"]["measured"]) for run in runs])


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


# the retrain options of runs that predate them: what those runs did
RETRAIN_DEFAULTS = {"first_seed": 0, "valued_seed": 0, "fixed_init": False, "base_fraction": 0.5}
PROJECTION_SEEDS = {"seed1": 1, "seed2": 2}  # config name -> projection seed; the default is seed 0
# name -> (default projection, curvature) -> (row label, projection, curvature)
CONFIGS = {
    "default": lambda p, c: ("default (rank 32, lm_head 16 x 1024, wte 1024 x 16, damping 0.01 relative)", p, c),
    "rank64": lambda p, c: ("rank 64 (lm_head 16 x 1024)", replace(p, rank_in=64, rank_out=64), c),
    "rank128": lambda p, c: ("rank 128 (lm_head 16 x 1024)", replace(p, rank_in=128, rank_out=128), c),
    **{
        f"vocabulary{k}": (
            lambda p, c, k=k: (
                f"lm_head {k} x 1024, wte 1024 x {k} (their hidden sides at rank {k})",
                replace(p, ranks={**p.ranks, "lm_head": (k, 1024)}, embedding_ranks=(1024, k)),
                c,
            )
        )
        for k in (64, 128)
    },
    "head128_no_embedding": lambda p, c: (
        "lm_head 128 x 1024 (its hidden side at full width), token embedding left out",
        replace(p, ranks={**p.ranks, "lm_head": (128, 1024)}, embeddings=False),
        c,
    ),
    "blocks": lambda p, c: (
        "the transformer blocks only (lm_head and token embedding left out)",
        replace(p, embeddings=False, exclude=(*p.exclude, "lm_head")),
        c,
    ),
    "blocks_unprojected": lambda p, c: (
        "the blocks only, unprojected (identity projections): Kronfluence's layers in this engine",
        replace(p, init="identity", embeddings=False, exclude=(*p.exclude, "lm_head")),
        c,
    ),
    "pca": lambda p, c: ("PCA projections (top covariance eigenvectors)", replace(p, init="pca"), c),
    "damping0.001": lambda p, c: ("damping 0.001 relative", p, replace(c, damping=0.001)),
    "damping0.1": lambda p, c: ("damping 0.1 relative", p, replace(c, damping=0.1)),
    **{
        f"no_embedding_damping{d}": (
            lambda p, c, d=d: (
                f"token embedding left out, damping {d} relative",
                replace(p, embeddings=False),
                replace(c, damping=d),
            )
        )
        for d in (0.001, 0.1)
    },
    "no_head": lambda p, c: ("lm_head left out", replace(p, exclude=(*p.exclude, "lm_head")), c),
    "no_embedding": lambda p, c: ("token embedding left out", replace(p, embeddings=False), c),
    **{
        name: (lambda p, c, k=k: (f"projection seed {k}", replace(p, seed=k), c))
        for name, k in PROJECTION_SEEDS.items()
    },
}


# name -> (row label, quality_kronfluence.damped_scores options): unprojected EK-FAC on every Linear, lm_head
# included; Kronfluence does not track the token embedding, so compare with `no_embedding`
KRONFLUENCE = {
    "kronfluence": (
        "Kronfluence EK-FAC, unprojected, no token embedding, empirical Fisher",
        {"lm_head": True, "empirical": True, "dampings": (0.001, 0.01, 0.1, 1.0)},
    ),
    "kronfluence_blocks": (
        "Kronfluence EK-FAC, unprojected, the blocks only, empirical Fisher",
        {"lm_head": False, "empirical": True, "dampings": (0.001, 0.01)},
    ),
}


if __name__ == "__main__":
    main()
