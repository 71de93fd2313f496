"""Attribution quality of LoGra configurations on the embedded corpus: LDS, brittleness, provider id.

    .venv/bin/python benchmarks/quality.py            # full grid, writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/quality.py --quick    # small grid, writes nothing unless --output

A tiny GPT-2 is pre-trained once (cached in benchmarks/.cache/); fine-tuning it on m random halves of
the training set with 2 seeds gives the ground truth, shared by every configuration. Gradients are
captured once per projection; every curvature/damping/Fisher/normalisation is then a cheap re-score.
Each configuration is one MLflow run (params = configuration, metrics = lds, brittleness, provider id).
LDS comes with a 95% bootstrap interval over queries, and its difference from the pipeline's default
configuration with a paired interval (the same resampled queries for both).
"""

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_data

from dataworth import CausalLMTask, CurvatureConfig, ProjectionConfig
from domain import quality as Q
from domain.settings import Settings
from resources.tracking import MlflowTracker

KINDS = ("identity", "raw", "kfac", "ekfac")
# Public tools run on the same model, data and queries (quality_<name>.py); their rows' params.
ANCHORS = {
    "kronfluence": {
        "method": "kronfluence",
        "init": "none",
        "rank": "full",
        "kind": "ekfac",
        "fisher": "sampled",
        "damping": 1e-8,  # Kronfluence's default damping_factor, absolute
        "normalize": "none",
    },
    "trak": {
        "method": "trak",
        "init": "dense random",
        "rank": "512 total",
        "kind": "raw, whole model",
        "fisher": "empirical",
        "damping": 0.1,
        "normalize": "none",
    },
}


def grid(quick: bool) -> list[tuple[ProjectionConfig, list[tuple[CurvatureConfig, str]]]]:
    """(projection, [(curvature, normalize)]) to evaluate."""
    ranks = (8,) if quick else (4, 8, 16, 32)
    dampings = (CurvatureConfig().damping,) if quick else (0.01, 0.1, 1.0)
    out = []
    for init in ("random", "pca"):
        for r in ranks:
            configs = [(CurvatureConfig(kind="identity"), "none")]
            configs += [(CurvatureConfig(kind=k, damping=d), "none") for k in KINDS[1:] for d in dampings]
            configs += [(CurvatureConfig(kind=k, fisher="sampled"), "none") for k in KINDS[1:]]
            configs += [(CurvatureConfig(), n) for n in ("relatif", "cosine")]
            out.append((ProjectionConfig(rank_in=r, rank_out=r, init=init, exclude=("lm_head",)), configs))
    if not quick:  # no projection: D_l = n_in n_out, too large for raw / EK-FAC second moments
        full = [
            (CurvatureConfig(kind="identity"), "none"),
            *[(CurvatureConfig(kind="kfac", damping=d), "none") for d in dampings],
        ]
        out.append(
            (
                ProjectionConfig(init="identity", exclude=("lm_head",)),
                [*full, (CurvatureConfig(kind="kfac", fisher="sampled"), "none")],
            )
        )
    return out


BRITTLE_RANK = {True: 8, False: 16}  # quick -> the rank whose configurations get brittleness


def is_brittle_probe(rank: int | str, curvature: CurvatureConfig, normalize: str, quick: bool) -> bool:
    """Brittleness retrains per configuration: only at one rank, the default damping, empirical Fisher, no normalisation."""
    return (
        rank in (BRITTLE_RANK[quick], "full")
        and curvature.damping == CurvatureConfig().damping
        and curvature.fisher == "empirical"
        and normalize == "none"
    )


def default_params() -> dict:
    """The configuration the pipeline runs by default, as a results row's params."""
    s = Settings()
    return {
        "method": "dataworth",
        "init": s.projection.init,
        "rank": s.projection.rank_in,
        "kind": s.curvature.kind,
        "fisher": s.curvature.fisher,
        "damping": s.curvature.damping,
        "normalize": s.scores.normalize,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 subsets, rank 8 only, damping 0.1 only")
    parser.add_argument("--subsets", type=int, default=None, help="m (default 24, quick 8)")
    parser.add_argument("--brittle-queries", type=int, default=5)
    parser.add_argument("--brittle-k", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(ANCHORS), help="public tools not to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlflow-uri", default=f"sqlite:///{quality_data.CACHE / 'mlflow.db'}")
    parser.add_argument(
        "--output", default=None, help="results file (default benchmarks/RESULTS.md; none with --quick)"
    )
    args = parser.parse_args()
    started = time.time()
    log = lambda msg: print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)
    retrain = Q.RetrainConfig(
        subsets=args.subsets or (8 if args.quick else 24), seeds=2, epochs=2, lr=1e-3, batch_size=8, seed=args.seed
    )

    bench, model, tokenizer = quality_data.build(seed=args.seed, log=log)
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id, seed=args.seed)
    n, n_q = len(bench.train), len(bench.queries)
    log(f"{n} training sequences, {n_q} queries, {len(bench.providers)} providers")

    masks = Q.subset_masks(n, retrain.subsets, retrain.fraction, retrain.seed)
    losses = Q.retrain_losses(
        model, task, bench.train, bench.queries, masks, retrain, progress=lambda j, m: log(f"subset {j}/{m} retrained")
    )
    agreement = Q.finite_mean(Q.seed_agreement(losses))
    log(f"seed-to-seed agreement {agreement:.3f}")
    if not agreement > 0.3:
        log("WARNING: seed agreement is not well above zero: the LDS ground truth is mostly retraining noise")

    brittle_q = torch.linspace(0, n_q - 1, args.brittle_queries).round().long().tolist()
    full = Q.retrain_losses(model, task, bench.train, bench.queries, Q.removal_masks(n, [[]]), retrain)
    randoms = Q.random_removals(n, args.brittle_k, len(brittle_q), retrain.seed)
    random_inc = Q.removal_increase(
        Q.retrain_losses(model, task, bench.train, bench.queries, Q.removal_masks(n, randoms), retrain), full, brittle_q
    )
    log(f"random removal of {args.brittle_k}: mean query loss increase {random_inc.mean():.3f}")

    def evaluate(scores: torch.Tensor, brittle: bool) -> tuple[dict[str, float], torch.Tensor]:
        per_query = Q.lds_per_query(scores, masks, losses)
        low, high = Q.mean_interval(per_query)
        metrics = {"lds": Q.finite_mean(per_query), "lds_ci_low": low, "lds_ci_high": high}
        sums = Q.group_sums(scores, torch.tensor(bench.train_providers), len(bench.providers))
        metrics["provider_acc"] = Q.provider_accuracy(sums, torch.tensor(bench.query_providers))
        if brittle:
            top = [scores[:, q].topk(args.brittle_k).indices.tolist() for q in brittle_q]
            inc = Q.removal_increase(
                Q.retrain_losses(model, task, bench.train, bench.queries, Q.removal_masks(n, top), retrain),
                full,
                brittle_q,
            )
            metrics |= {
                "topk_increase": float(inc.mean()),
                "random_increase": float(random_inc.mean()),
                "topk_beats_random": float((inc > random_inc).double().mean()),
            }
        return metrics, per_query

    tracker = MlflowTracker(tracking_uri=args.mlflow_uri, experiment="dataworth-quality")
    common = {
        "subsets": retrain.subsets,
        "seeds": retrain.seeds,
        "train": n,
        "queries": n_q,
        "seed_agreement": round(agreement, 4),
    }
    rows = []

    def record(name: str, params: dict, evaluated: tuple[dict, torch.Tensor]) -> None:
        metrics, per_query = evaluated
        rows.append((params, metrics, per_query))
        log(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        with tracker.run(name, params=params | common, tags={"benchmark": "quality", "quick": args.quick}) as run:
            run.log_metrics(metrics | {"seed_agreement": agreement})

    for projection, configs in grid(args.quick):
        full_rank = projection.init == "identity"
        rank = "full" if full_rank else projection.rank_in
        gradients = Q.capture(
            model,
            task,
            bench.train,
            bench.queries,
            projection,
            fishers=("empirical", "sampled"),
            second_moment=not full_rank,
        )
        for curvature, normalize in configs:
            scores = Q.score_matrix(gradients, curvature, normalize)
            params = {
                "method": "dataworth",
                "init": projection.init,
                "rank": rank,
                "kind": curvature.kind,
                "fisher": curvature.fisher,
                "damping": curvature.damping,
                "normalize": normalize,
            }
            name = "-".join(str(v) for v in params.values())
            record(name, params, evaluate(scores, is_brittle_probe(rank, curvature, normalize, args.quick)))

    for name, params in ANCHORS.items():
        if name in args.skip:
            continue
        try:
            anchor = importlib.import_module(f"quality_{name}")
            scores = anchor.scores(
                model, task, bench.train, bench.queries, quality_data.CACHE / name, quality_data.SEQ_LEN
            )
        except ImportError as error:
            log(f"{name} skipped (not installed, see benchmarks/README.md): {error}")
            continue
        record(name, params, evaluate(scores, True))

    output = args.output or (None if args.quick else str(Path(__file__).resolve().parent / "RESULTS.md"))
    if output:
        write_results(Path(output), rows, common, retrain, args, time.time() - started)
        log(f"wrote {output}")


def write_results(path: Path, rows, common, retrain, args, seconds: float) -> None:
    """Write the "## Attribution quality" section of `path` (other sections are kept)."""
    command = "python " + " ".join(["benchmarks/quality.py", *sys.argv[1:]])
    noise = (
        ""
        if common["seed_agreement"] > 0.3
        else " **The ground truth is mostly retraining noise: LDS values below are not evidence.**"
    )
    setup = (
        f"Command: `{command}` ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min, "
        f"{platform.machine()} {platform.system()}, nproc={os.cpu_count()}, torch {torch.__version__}).\n\n"
        f"Base model: GPT-2 n_layer={quality_data.MODEL.n_layer}, n_embd={quality_data.MODEL.n_embd}, seq {quality_data.SEQ_LEN}, "
        f"vocab {quality_data.VOCAB}, pre-trained {quality_data.PRETRAIN['steps']} steps on the documents not used below. "
        f"Training set: {common['train']} sequences (30 per provider); queries: {common['queries']} held-out documents "
        "(2 per provider; first sequence, 16 prompt tokens, loss = summed NLL of the other tokens).\n\n"
        f"LDS: {retrain.subsets} subsets of half the training set x {retrain.seeds} seeds, fine-tuned from the base "
        f"({retrain.epochs} epochs, AdamW lr {retrain.lr}, batch {retrain.batch_size}); Spearman per query, mean over queries, "
        "with a 95% percentile bootstrap interval over queries (2000 resamples). `LDS - default` is the mean per-query "
        "difference from the pipeline's default configuration ("
        + ", ".join(f"{k} {v}" for k, v in default_params().items() if k != "method")
        + "), with a paired bootstrap interval: an interval that excludes 0 is a difference the queries support. "
        "Seed-to-seed agreement (Spearman of the two seeds' losses across subsets, mean over queries): "
        f"**{common['seed_agreement']:.3f}**.{noise}\n\n"
        f"Brittleness (rank {BRITTLE_RANK[args.quick]} and full, damping {CurvatureConfig().damping}, empirical Fisher, no normalisation, and the public tools only): "
        f"for {args.brittle_queries} queries, remove the top-{args.brittle_k} training sequences by score and retrain (2 seeds); "
        f"`topk_inc` = mean query loss increase (nats), `rand_inc` = the same for {args.brittle_k} random sequences, "
        "`beats` = fraction of queries where top-k > random. "
        "Provider id: fraction of queries whose provider has the largest summed score."
    )
    default = next((q for p, _, q in rows if p == default_params()), None)
    lines = [
        "## Attribution quality",
        "",
        setup,
        "",
        "| method | init | rank | kind | fisher | damping | normalize | LDS [95% CI] | LDS - default [95% CI] | provider id | topk_inc | rand_inc | beats |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, m, per_query in rows:
        b = [f"{m[k]:.2f}" if k in m else "" for k in ("topk_increase", "random_increase", "topk_beats_random")]
        lds = f"{m['lds']:.3f} [{m['lds_ci_low']:.2f}, {m['lds_ci_high']:.2f}]"
        if default is None or p == default_params():
            versus = "default" if default is not None else ""
        else:
            diff = per_query - default
            low, high = Q.mean_interval(diff)
            versus = f"{Q.finite_mean(diff):+.3f} [{low:+.2f}, {high:+.2f}]"
        cells = [p[k] for k in ("method", "init", "rank", "kind", "fisher", "damping", "normalize")] + [
            lds,
            versus,
            f"{m['provider_acc']:.2f}",
            *b,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    head, marker, tail = text.partition("## Attribution quality")
    rest = tail[tail.find("\n## ") + 1 :] if marker and "\n## " in tail else ""
    path.write_text(head + "\n".join(lines) + "\n" + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
