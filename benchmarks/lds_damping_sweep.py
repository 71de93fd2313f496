"""Damping of lm_head versus the other layers, at full width and projected (issue 10, step "damping per layer").

    LDS_THREADS=2 .venv/bin/python benchmarks/lds_damping_sweep.py --bench A B --subsets 24
    ... --alphas 0.01 0.1 --projections "random32, lm_head 16x1024"   # names: see projections()

For each benchmark of benchmarks/lds_vs_kronfluence.py (same models, ground truth and cache; run that
script first for Kronfluence's `kron-all` reference): one capture per projection (empirical Fisher, lm_head
tracked through an untied copy, as Kronfluence tracks it), one EK-FAC fit, then LDS for a grid of relative
dampings (alpha x mean eigenvalue of the layer), one alpha for lm_head and one for every other layer.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds_vs_kronfluence as lds

from dataworth import CausalLMTask, Curvature, CurvatureConfig, InfluenceScorer, LoGra, ProjectionConfig

ALPHAS = (1e-8, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def projections(model) -> dict[str, ProjectionConfig]:
    """Full width, random rank 32 and 64, and rank 32 with lm_head or the other layers kept at full rank
    (a random square projection: no information lost) or with lm_head given more rank."""
    widths = {
        n: (m.in_features, m.out_features)
        for n, m in lds.conv1d_to_linear(model).named_modules()
        if hasattr(m, "in_features")
    }
    square_others = {n: w for n, w in widths.items() if n != "lm_head"}
    return {
        "full": ProjectionConfig(init="identity"),
        "random32": ProjectionConfig(rank_in=32, rank_out=32),
        "random64": ProjectionConfig(rank_in=64, rank_out=64),
        "random32, lm_head square": ProjectionConfig(rank_in=32, rank_out=32, ranks={"lm_head": widths["lm_head"]}),
        "random32, others square": ProjectionConfig(rank_in=32, rank_out=32, ranks=square_others),
        "random32, lm_head 32x256": ProjectionConfig(rank_in=32, rank_out=32, ranks={"lm_head": (32, 256)}),
        "random32, lm_head 64x128": ProjectionConfig(rank_in=32, rank_out=32, ranks={"lm_head": (64, 128)}),
        "random32, lm_head 32x512": ProjectionConfig(rank_in=32, rank_out=32, ranks={"lm_head": (32, 512)}),
        "random32, lm_head 32x1024": ProjectionConfig(rank_in=32, rank_out=32, ranks={"lm_head": (32, 1024)}),
        "random32, lm_head 16x1024": ProjectionConfig(rank_in=32, rank_out=32, ranks={"lm_head": (16, 1024)}),
        "random16, lm_head 32x512": ProjectionConfig(rank_in=16, rank_out=16, ranks={"lm_head": (32, 512)}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", nargs="*", default=["A", "B"], choices=sorted(lds.BENCHES))
    parser.add_argument("--subsets", type=int, default=24)
    parser.add_argument("--projections", nargs="*", default=["full", "random32", "random64"])
    parser.add_argument("--alphas", nargs="*", type=float, default=list(ALPHAS))
    args = parser.parse_args()
    for name in args.bench:
        spec = replace(lds.BENCHES[name], subsets=args.subsets)
        bench, model, tokenizer = lds.build(spec, lambda message: None)
        task = CausalLMTask(pad_token_id=tokenizer.pad_token_id, seed=0)
        model = lds.untied_head(model.eval())
        key = f"{name}-s{spec.seed}-l{spec.n_layer}-e{spec.n_embd}-t{spec.train_per_provider}-q{spec.query_docs}"
        masks, losses = lds.ground_truth(spec, key, model, task, bench, print)
        reference = np.nanmean(
            lds.lds_per_query(load_file(lds.CACHE / f"{key}-kron-all.safetensors")["scores"], masks, losses)
        )
        print(
            f"\n### Benchmark {name}: kron-all LDS {reference:.3f}; rows: alpha of the other layers, columns: alpha of lm_head\n"
        )
        for projection_name in args.projections:
            logra = LoGra(model, task, projections(model)[projection_name], batch_size=16)
            stats = logra.new_statistics(second_moment=False)
            train = lds.pass_gradients(logra, bench.train, stats=stats)
            queries = lds.pass_gradients(logra, bench.queries, query=True)
            curvature = Curvature.fit_ekfac_from_gradients(stats, train.split(64))  # = fit(stats, "ekfac")
            print(
                f"{projection_name} (D = {logra.projection.layout.dim:,}) | "
                + " | ".join(f"head {a:g}" for a in args.alphas)
            )
            print("|---" * (len(args.alphas) + 1) + "|")
            for alpha in args.alphas:
                cells = []
                for head_alpha in args.alphas:
                    config = CurvatureConfig(damping=alpha, per_layer_damping={"lm_head": head_alpha})
                    scorer = InfluenceScorer(queries, curvature.preconditioner(config), "none")
                    scores = scorer.stream(train.split(256), keep_scores=True).scores
                    value = np.nanmean(lds.lds_per_query(scores, masks, losses))
                    cells.append(f"{value:.3f} ({value / reference:.2f}x)")
                print(f"| others {alpha:g} | " + " | ".join(cells) + " |", flush=True)
            print()


if __name__ == "__main__":
    main()
