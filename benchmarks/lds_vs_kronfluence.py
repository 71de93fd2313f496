"""LDS of dataworth configurations side by side with Kronfluence EK-FAC, on three benchmarks (issue 10).

    .venv/bin/python benchmarks/lds_vs_kronfluence.py                       # every benchmark and config
    .venv/bin/python benchmarks/lds_vs_kronfluence.py --bench A --configs default kron-all

Benchmarks (all from data/embedded_corpus, base models cached under benchmarks/.cache/):
    A  the quality benchmark: split seed 0, GPT-2 n_layer 2, n_embd 64, 300 training sequences, 20 queries
    B  split seed 1 (other held-out and training documents), GPT-2 n_layer 4, n_embd 128,
       400 training sequences (40 per provider), 30 queries (3 per provider)
    C  split seed 2, GPT-2 n_layer 3, n_embd 96, 350 training sequences, 20 queries: added after A and B
       had picked the lm_head rank and damping, to check them on a benchmark that took no part in the choice
Ground truth: m random halves of the training set x S seeds fine-tuned from the base (AdamW, 2 epochs,
lr 1e-3, batch 8); each query's retrained loss is cached (benchmarks/.cache/lds/), as are Kronfluence's
scores, so a rerun only recomputes the dataworth configurations. LDS = Spearman over subsets between
minus the subset's summed scores and the actual loss (mean over seeds), mean over queries; 95% percentile
bootstrap over queries (2000 resamples); the paired difference from Kronfluence uses the same resamples.
Needs Kronfluence: `.venv/bin/pip install --no-deps kronfluence accelerate einconv einops opt-einsum`.
"""

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import rankdata
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import quality_data
import quality_kronfluence

from dataworth import (
    CausalLMTask,
    Curvature,
    CurvatureConfig,
    GradientCapture,
    InfluenceScorer,
    LoGra,
    ProjectionConfig,
    batches,
)
from domain.gradients import pipeline_projection_config
from domain.quality import RetrainConfig, example_losses, fine_tune, subset_masks
from domain.settings import Settings

CACHE = quality_data.CACHE / "lds"
torch.set_num_threads(int(os.environ.get("LDS_THREADS", "1")))  # 1: the 2-core machine is shared


@dataclass(frozen=True)
class BenchSpec:
    name: str
    seed: int  # document split (which documents are queries, training, pre-training)
    n_layer: int
    n_embd: int
    train_per_provider: int
    query_docs: int
    subsets: int
    seeds: int = 2
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 8


BENCHES = {
    "A": BenchSpec("A", seed=0, n_layer=2, n_embd=64, train_per_provider=30, query_docs=2, subsets=48),
    "B": BenchSpec("B", seed=1, n_layer=4, n_embd=128, train_per_provider=40, query_docs=3, subsets=40),
    # a held-out check of what A and B chose: another split and shape, never used to pick a setting
    "C": BenchSpec("C", seed=2, n_layer=3, n_embd=96, train_per_provider=35, query_docs=2, subsets=40),
}


def build(spec: BenchSpec, log):
    """(Benchmark, base model, tokenizer) through quality_data.build with this benchmark's model shape."""
    saved = quality_data.MODEL
    quality_data.MODEL = quality_data.TinyGPT2Config(
        n_layer=spec.n_layer, n_head=4, n_embd=spec.n_embd, n_positions=quality_data.SEQ_LEN
    )
    try:
        return quality_data.build(
            seed=spec.seed, train_per_provider=spec.train_per_provider, query_docs=spec.query_docs, log=log
        )
    finally:
        quality_data.MODEL = saved


# ---------------------------------------------------------------- ground truth (domain/quality.py's retraining)


def ground_truth(spec: BenchSpec, key: str, model, task, bench, log) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (m, N), losses (S, m, Q)), cached; extends a cached run with fewer subsets."""
    path = CACHE / f"{key}-S{spec.seeds}-e{spec.epochs}-lr{spec.lr}-b{spec.batch_size}.safetensors"
    masks = subset_masks(len(bench.train), spec.subsets, seed=spec.seed)
    rows = list(load_file(path)["losses"]) if path.exists() else []  # per subset: (S, Q)
    retrain = RetrainConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size)
    started = time.time()
    for j in range(len(rows), spec.subsets):
        subset = [bench.train[i] for i in masks[j].nonzero().flatten().tolist()]
        rows.append(
            torch.stack(
                [
                    example_losses(
                        fine_tune(model, task, subset, retrain, seed=1000 * spec.seed + s), task, bench.queries
                    )
                    for s in range(spec.seeds)
                ]
            )
        )
        if (j + 1) % 8 == 0 or j + 1 == spec.subsets:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"losses": torch.stack(rows).contiguous()}, path)
            log(f"  subset {j + 1}/{spec.subsets} retrained ({time.time() - started:.0f}s)")
    return masks, torch.stack(rows[: spec.subsets], dim=1)  # (S, m, Q)


def spearman_columns(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """(Q,) Spearman between columns of (m, Q) arrays."""
    out = []
    for q in range(actual.shape[1]):
        a, b = rankdata(pred[:, q]), rankdata(actual[:, q])
        a, b = a - a.mean(), b - b.mean()
        d = np.sqrt((a * a).sum() * (b * b).sum())
        out.append((a * b).sum() / d if d > 0 else np.nan)
    return np.array(out)


def lds_per_query(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> np.ndarray:
    predicted = -(masks.double() @ scores.double())  # (m, Q)
    return spearman_columns(predicted.numpy(), losses.mean(0).numpy())


def bootstrap(values: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    picks = np.random.default_rng(seed).integers(len(values), size=(samples, len(values)))
    means = np.nanmean(values[picks], axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def seed_agreement(losses: torch.Tensor) -> float:
    return (
        float(np.nanmean(spearman_columns(losses[0].numpy(), losses[1].numpy())))
        if losses.shape[0] > 1
        else float("nan")
    )


# ---------------------------------------------------------------- dataworth configurations


@dataclass(frozen=True)
class Config:
    name: str
    projection: ProjectionConfig = field(
        default_factory=lambda: ProjectionConfig(rank_in=32, rank_out=32, exclude=("lm_head",))
    )
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    normalize: str = "none"
    ensemble: int = 1  # average the scores of this many projection seeds
    note: str = ""


NO_HEAD = ("lm_head",)
DEFAULT_PROJ = ProjectionConfig(rank_in=32, rank_out=32, exclude=NO_HEAD)
ABS0 = dict(damping=1e-8, damping_mode="absolute")  # Kronfluence's default damping_factor


def configs() -> list[Config]:
    full = ProjectionConfig(init="identity", exclude=NO_HEAD)
    c = [
        Config(
            "default",
            Settings().projection,
            Settings().curvature,
            note="pipeline default: random 32/side, lm_head 16 x 1024, wte 1024 x 16, EK-FAC, empirical, 0.01 relative",
        ),
        Config(
            "default-no-wte",
            replace(Settings().projection, embeddings=False),
            Settings().curvature,
            note="the default without the token embedding (the default before issue 11's provider identification)",
        ),
        Config("old-default", note="the default before: random 32/side, EK-FAC, empirical, 0.01 relative, no lm_head"),
        # step 2: full width, the very layers and Fisher of Kronfluence
        Config(
            "full-ekfac-sampled-d1e-8", full, CurvatureConfig(fisher="sampled", **ABS0), note="= kron-nohead's math"
        ),
        Config("full-ekfac-emp-d1e-8", full, CurvatureConfig(**ABS0)),
        Config("full-ekfac-emp-rel0.01", full, CurvatureConfig()),
        Config("full-ekfac-emp-rel0.1", full, CurvatureConfig(damping=0.1)),
        # step 3: projection
        Config("random32-d1e-8", DEFAULT_PROJ, CurvatureConfig(**ABS0)),
        Config("random32-rel0.001", DEFAULT_PROJ, CurvatureConfig(damping=0.001)),
        Config("random32-rel0.1", DEFAULT_PROJ, CurvatureConfig(damping=0.1)),
        Config("random64", replace(DEFAULT_PROJ, rank_in=64, rank_out=64)),
        Config("pca32", replace(DEFAULT_PROJ, init="pca")),
        Config("pca32-d1e-8", replace(DEFAULT_PROJ, init="pca"), CurvatureConfig(**ABS0)),
        Config("random32-x4seeds", DEFAULT_PROJ, ensemble=4),
        # lm_head's output use (an untied copy, as Kronfluence tracks it)
        Config("full+head-emp-d1e-8", ProjectionConfig(init="identity"), CurvatureConfig(**ABS0)),
        Config("random32+head", replace(DEFAULT_PROJ, exclude=())),
        Config("random32+head-d1e-8", replace(DEFAULT_PROJ, exclude=()), CurvatureConfig(**ABS0)),
        Config(
            "random64+head-d1e-8", replace(DEFAULT_PROJ, rank_in=64, rank_out=64, exclude=()), CurvatureConfig(**ABS0)
        ),
        Config("pca32+head-d1e-8", replace(DEFAULT_PROJ, init="pca", exclude=()), CurvatureConfig(**ABS0)),
        Config(
            "full+head-sampled-d1e-8",
            ProjectionConfig(init="identity"),
            CurvatureConfig(fisher="sampled", **ABS0),
            note="= kron-all's math",
        ),
        Config(
            "random32+head-sampled-d1e-8", replace(DEFAULT_PROJ, exclude=()), CurvatureConfig(fisher="sampled", **ABS0)
        ),
        Config(
            "random64+head-sampled-d1e-8",
            replace(DEFAULT_PROJ, rank_in=64, rank_out=64, exclude=()),
            CurvatureConfig(fisher="sampled", **ABS0),
        ),
        Config("full+head-emp-rel1e-4", ProjectionConfig(init="identity"), CurvatureConfig(damping=1e-4)),
        Config("random32+head-x4seeds-d1e-8", replace(DEFAULT_PROJ, exclude=()), CurvatureConfig(**ABS0), ensemble=4),
        Config("random32-cosine", DEFAULT_PROJ, normalize="cosine"),
        # lm_head's vocabulary side gets the rank (benchmarks/lds_damping_sweep.py), damped per layer
        Config(
            "random32+head16x1024-rel0.1",
            replace(DEFAULT_PROJ, exclude=(), ranks={"lm_head": (16, 1024)}),
            CurvatureConfig(damping=0.1, per_layer_damping={"lm_head": 0.01}),
        ),
        Config(
            "random32+head32x1024",
            replace(DEFAULT_PROJ, exclude=(), ranks={"lm_head": (32, 1024)}),
            CurvatureConfig(damping=0.1, per_layer_damping={"lm_head": 0.01}),
        ),
        Config(
            "random16+head32x512",
            replace(DEFAULT_PROJ, rank_in=16, rank_out=16, exclude=(), ranks={"lm_head": (32, 512)}),
            CurvatureConfig(damping=0.1, per_layer_damping={"lm_head": 0.01}),
        ),
        Config(
            "full+head-rel0.01-head0.1",
            ProjectionConfig(init="identity"),
            CurvatureConfig(per_layer_damping={"lm_head": 0.1}),
            note="full width, lm_head damped 0.1 x its mean eigenvalue",
        ),
    ]
    return c


def tracked_params(model, exclude: tuple[str, ...]) -> int:
    """Weights of the Linear / Conv1D layers not excluded (what Kronfluence or a projection covers)."""
    from fnmatch import fnmatchcase

    return sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and not any(fnmatchcase(n, p) for p in exclude)
    )


def pass_gradients(logra: LoGra, examples, *, query=False, sample_labels=False, stats=None) -> torch.Tensor:
    rows = []
    with GradientCapture(logra.model, logra.projection, logra.task) as capture:
        for batch in batches(logra.task, examples, logra.batch_size, logra.device):
            result = capture.capture(batch, query=query, sample_labels=sample_labels)
            if stats is not None:
                stats.update(result)
            rows.append(result.gradients)
    return torch.cat(rows)


def untied_head(model: nn.Module) -> nn.Module:
    """A copy whose lm_head has its own copy of the tied embedding weight: same outputs, and the
    lm_head gradient is the output use of the tied weight only, which is what Kronfluence tracks."""
    model = copy.deepcopy(model)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def dataworth_scores(model, task, bench, cfg: Config, seed: int) -> tuple[torch.Tensor, float, float, int]:
    """(scores (N, Q), capture seconds, scoring seconds, D) for one projection seed."""
    projection = replace(cfg.projection, seed=seed)
    from_gradients = cfg.curvature.kind == "ekfac"  # no (D_l x D_l) second moments: wide blocks stay cheap
    if "lm_head" not in projection.exclude:
        model = untied_head(model)
    projection = pipeline_projection_config(projection, model, adapter=False)  # no wpe; ranks cut to the widths
    t0 = time.time()
    logra = LoGra(model, task, projection, pca_examples=bench.train, batch_size=16)
    sampled = cfg.curvature.fisher == "sampled"
    stats = logra.new_statistics(second_moment=not from_gradients)
    train = pass_gradients(logra, bench.train, stats=None if sampled else stats)
    fisher_grads = train
    if sampled:  # the curvature's own pass with labels drawn from the model
        fisher_grads = pass_gradients(logra, bench.train, sample_labels=True, stats=stats)
    queries = pass_gradients(logra, bench.queries, query=True)
    t1 = time.time()
    if from_gradients:  # EK-FAC eigenvalues by a pass over the gradients, equal to fit(stats, "ekfac")
        curvature = Curvature.fit_ekfac_from_gradients(stats, fisher_grads.split(64))
    else:
        curvature = Curvature.fit(stats, cfg.curvature.kind)
    scorer = InfluenceScorer(queries, curvature.preconditioner(cfg.curvature), cfg.normalize)
    scores = scorer.stream(train.split(256), keep_scores=True).scores
    return scores, t1 - t0, time.time() - t1, logra.projection.layout.dim


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", nargs="*", default=["A", "B", "C"], choices=sorted(BENCHES))
    parser.add_argument(
        "--configs",
        nargs="*",
        default=None,
        help="config names (default all); kron-all / kron-nohead are always run (cached)",
    )
    parser.add_argument("--subsets", type=int, default=None, help="override m")
    parser.add_argument("--output", default=None, help="write the Markdown tables to this file")
    args = parser.parse_args()
    started = time.time()
    log = lambda msg: print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)
    wanted = [c for c in configs() if args.configs is None or c.name in args.configs]
    sections = []
    for bname in args.bench:
        spec = BENCHES[bname]
        if args.subsets:
            spec = replace(spec, subsets=args.subsets)
        bench, model, tokenizer = build(spec, log)
        task = CausalLMTask(pad_token_id=tokenizer.pad_token_id, seed=0)
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        key = f"{bname}-s{spec.seed}-l{spec.n_layer}-e{spec.n_embd}-t{spec.train_per_provider}-q{spec.query_docs}"
        log(f"benchmark {bname}: {len(bench.train)} train, {len(bench.queries)} queries, {n_params} parameters")
        masks, losses = ground_truth(spec, key, model, task, bench, log)
        agreement = seed_agreement(losses)
        log(f"  seed agreement {agreement:.3f}")
        rows = {}

        def record(name, scores, d, params, cap_s, score_s, note=""):
            per_q = lds_per_query(scores, masks, losses)
            rows[name] = dict(per_q=per_q, d=d, params=params, cap=cap_s, score=score_s, note=note)
            log(f"  {name}: LDS {np.nanmean(per_q):.3f}  D={d}  capture {cap_s:.1f}s  scoring {score_s:.1f}s")

        for lm_head, names in [  # damping None: Kronfluence's default 1e-8 absolute; 0.1: its heuristic, relative
            (True, {None: "kron-all"}),
            (False, {None: "kron-nohead", 0.1: "kron-nohead-heuristic"}),
        ]:
            paths = {d: CACHE / f"{key}-{n}.safetensors" for d, n in names.items()}
            if not all(p.exists() for p in paths.values()):
                t0 = time.time()
                computed = quality_kronfluence.damped_scores(
                    model,
                    task,
                    bench.train,
                    bench.queries,
                    quality_data.CACHE / "kron" / key / names[None],
                    quality_data.SEQ_LEN,
                    lm_head=lm_head,
                    dampings=list(names),
                )
                seconds = time.time() - t0  # one factor fit, then every damping's scores
                for d, scores in zip(names, computed):
                    save_file({"scores": scores.contiguous(), "seconds": torch.tensor(seconds)}, paths[d])
            params = tracked_params(model, () if lm_head else NO_HEAD)
            for d, name in names.items():
                saved = load_file(paths[d])
                record(
                    name,
                    saved["scores"],
                    params,
                    params,
                    float("nan"),
                    float(saved["seconds"]),
                    f"Kronfluence EK-FAC, sampled Fisher, damping {'1e-8' if d is None else f'{d} x mean eigenvalue'}, {'all Linear incl. lm_head' if lm_head else 'no lm_head'}",
                )
        for cfg in wanted:
            total, cap, sc = 0, 0.0, 0.0
            for s in range(cfg.ensemble):
                scores, c, t, d = dataworth_scores(model, task, bench, cfg, seed=s)
                total, cap, sc = total + scores.double(), cap + c, sc + t
            record(cfg.name, total, d * cfg.ensemble, tracked_params(model, cfg.projection.exclude), cap, sc, cfg.note)
        sections.append(table(bname, spec, bench, n_params, agreement, rows))
        print(sections[-1], flush=True)
    if args.output:
        Path(args.output).write_text("\n\n".join(sections) + "\n")
        log(f"wrote {args.output}")


def table(bname, spec, bench, n_params, agreement, rows) -> str:
    ref = rows["kron-all"]["per_q"]
    ref_lds = np.nanmean(ref)
    lines = [
        f"### Benchmark {bname}: GPT-2 n_layer {spec.n_layer}, n_embd {spec.n_embd} ({n_params:,} parameters), split seed {spec.seed}, "
        f"{len(bench.train)} training sequences, {len(bench.queries)} queries, {spec.subsets} subsets x {spec.seeds} seeds, seed agreement {agreement:.3f}",
        "",
        "| config | LDS [95% CI] | LDS - kron-all [95% CI] | ratio to kron-all | D | tracked params | capture s | scoring s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lo, hi = bootstrap(r["per_q"])
        diff = r["per_q"] - ref
        dlo, dhi = bootstrap(diff)
        lds = np.nanmean(r["per_q"])
        cap = "" if np.isnan(r["cap"]) else f"{r['cap']:.1f}"
        lines.append(
            f"| {name} | {lds:.3f} [{lo:.2f}, {hi:.2f}] | {np.nanmean(diff):+.3f} [{dlo:+.2f}, {dhi:+.2f}] | {lds / ref_lds:.2f} | {r['d']:,} | {r['params']:,} | {cap} | {r['score']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
