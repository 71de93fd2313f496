"""Attribution quality harness: LDS, seed agreement, brittleness and provider identification.

Pure functions shared by benchmarks/quality.py and the valuation_quality asset (no Dagster).
Shapes: N training examples, Q queries, m subsets, S retraining seeds, P providers;
scores (N, Q) with score > 0 meaning "the example lowers the query's loss"; subset masks
(m, N) bool; retrained query losses (S, m, Q), each a sum of token NLLs (nats).
"""

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dataworth import (
    Curvature,
    CurvatureConfig,
    InfluenceScorer,
    LoGra,
    ProjectionConfig,
)
from dataworth.task import IGNORE, Task


@dataclass(frozen=True)
class RetrainConfig:
    """How each subset is fine-tuned from the fixed base model (AdamW, mean token loss)."""

    subsets: int = 8  # m
    seeds: int = 2  # S: retrainings per subset, differing in data order
    fraction: float = 0.5  # of the training set in each subset
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0  # fixes the subsets and every data order


def subset_masks(n: int, m: int, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """(m, n) bool, each row exactly round(fraction * n) True, reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(m, n, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(n, generator=generator)[: round(fraction * n)]] = True
    return masks


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), 0-based, float64."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x[np.diff(np.sort(x), prepend=np.nan) == 0]):
        ranks[x == value] = ranks[x == value].mean()
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D sequences; nan when either is constant."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def predicted_losses(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(m, Q) float64: minus the sum of each subset's scores (higher = larger predicted loss)."""
    return -(masks.double() @ scores.double())


def lds_per_query(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """(Q,) Spearman over subsets between predicted and actual loss; losses (m, Q), or (S, m, Q)
    averaged over seeds first."""
    actual = losses.double().mean(0) if losses.ndim == 3 else losses.double()
    predicted = predicted_losses(scores, masks)
    return torch.tensor([spearman(predicted[:, q], actual[:, q]) for q in range(actual.shape[1])])


def seed_agreement(losses: torch.Tensor) -> torch.Tensor:
    """(Q,) Spearman across subsets between seed 0's and seed 1's losses (S, m, Q): how much of the
    ground truth is subset effect rather than retraining noise."""
    return torch.tensor([spearman(losses[0, :, q], losses[1, :, q]) for q in range(losses.shape[2])])


def provider_accuracy(group_sums: torch.Tensor, providers: torch.Tensor) -> float:
    """Fraction of queries whose own provider (Q,) has the largest summed score in (P, Q)."""
    return float((group_sums.argmax(0) == torch.as_tensor(providers)).double().mean())


def group_sums(scores: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(G, Q) float64 sums of the scores (N, Q) of each group's rows; groups (N,) int64."""
    return torch.zeros(n_groups, scores.shape[1], dtype=torch.float64).index_add_(0, groups, scores.double())


@torch.no_grad()
def example_losses(model: nn.Module, task: Task, examples: Sequence) -> torch.Tensor:
    """(Q,) float64 each example's query loss (sum of target-token NLLs), one at a time."""
    model.eval()
    return torch.tensor([float(task.query_loss(model, task.collate([e]))) for e in examples], dtype=torch.float64)


def fine_tune(base: nn.Module, task: Task, examples: Sequence, config: RetrainConfig, seed: int) -> nn.Module:
    """A copy of `base` fine-tuned on `examples` (AdamW, mean loss per target token); `seed` fixes
    the data order."""
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            batch = task.collate([examples[i] for i in order[start : start + config.batch_size]])
            targets = (batch["labels"][:, 1:] != IGNORE).sum().clamp_min(1)
            loss = task.loss(model, batch) / targets
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def retrain_losses(
    base: nn.Module,
    task: Task,
    train: Sequence,
    queries: Sequence,
    masks: torch.Tensor,
    config: RetrainConfig,
    progress=None,
) -> torch.Tensor:
    """(S, m, Q) float64 query losses after fine-tuning on each subset (m, N) with S seeds."""
    out = torch.zeros(config.seeds, masks.shape[0], len(queries), dtype=torch.float64)
    for j, mask in enumerate(masks):
        subset = [train[i] for i in mask.nonzero().flatten().tolist()]
        for s in range(config.seeds):
            model = fine_tune(base, task, subset, config, seed=config.seed * 1000 + s)
            out[s, j] = example_losses(model, task, queries)
        if progress:
            progress(j + 1, masks.shape[0])
    return out


def removal_masks(n: int, removed: Sequence[Sequence[int]]) -> torch.Tensor:
    """(R, n) bool: all True except each row's removed indices."""
    masks = torch.ones(len(removed), n, dtype=torch.bool)
    for row, indices in zip(masks, removed):
        row[list(indices)] = False
    return masks


def random_removals(n: int, k: int, count: int, seed: int) -> list[list[int]]:
    """`count` sets of k random indices out of n."""
    generator = torch.Generator().manual_seed(seed + 7919)
    return [torch.randperm(n, generator=generator)[:k].tolist() for _ in range(count)]


def removal_increase(losses: torch.Tensor, full: torch.Tensor, query_index: Sequence[int]) -> torch.Tensor:
    """(R,) loss increase of query query_index[r] after removal r, averaged over seeds;
    losses (S, R, Q) after the removals, full (S, 1, Q) after training on everything."""
    rows = torch.arange(len(query_index))
    cols = torch.as_tensor(query_index)
    return (losses[:, rows, cols] - full[:, 0, cols]).mean(0)


@dataclass
class Gradients:
    """Captured gradients of one projection: train (N, D), queries (Q, D) and curvature statistics."""

    logra: LoGra
    train: torch.Tensor
    queries: torch.Tensor
    statistics: dict  # fisher ("empirical" / "sampled") -> CurvatureStatistics


def capture(
    model: nn.Module,
    task: Task,
    train: Sequence,
    queries: Sequence,
    projection: ProjectionConfig,
    *,
    fishers=("empirical",),
    second_moment: bool = True,
    batch_size: int = 16,
) -> Gradients:
    """One capture pass per projection: train and query gradients plus Fisher statistics. The empirical
    Fisher's (D_l x D_l) second moments are left to the train gradients (`score_matrix`); the sampled
    Fisher's are kept if `second_moment` (without them, only identity and KFAC can be fitted with it)."""
    logra = LoGra(model, task, projection, pca_examples=train, batch_size=batch_size)
    stats = {"empirical": logra.new_statistics(second_moment=False)}
    train_grads = logra.capture(train, statistics=stats["empirical"])
    if "sampled" in fishers:
        stats["sampled"] = logra.statistics(train, fisher="sampled", second_moment=second_moment)
    return Gradients(logra, train_grads, logra.capture(queries, query=True), stats)


def score_matrix(gradients: Gradients, curvature: CurvatureConfig, normalize: str = "none") -> torch.Tensor:
    """(N, Q) float32 influence scores for one curvature configuration."""
    train = [gradients.train] if curvature.fisher == "empirical" else None  # the empirical second moments
    fitted = Curvature.fit(gradients.statistics[curvature.fisher], curvature.kind, train)
    scorer = InfluenceScorer(gradients.queries, fitted.preconditioner(curvature), normalize)
    return scorer.stream([gradients.train], keep_scores=True).scores


def finite_mean(values: torch.Tensor) -> float:
    """Mean over the finite entries (nan when none)."""
    values = values[torch.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def mean_interval(values: torch.Tensor, level: float = 0.95, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the finite `values` (one per query), resampling
    them with replacement; (nan, nan) with fewer than two."""
    values = values[torch.isfinite(values)].double()
    if len(values) < 2:
        return float("nan"), float("nan")
    picks = torch.randint(len(values), (samples, len(values)), generator=torch.Generator().manual_seed(seed))
    low, high = torch.quantile(
        values[picks].mean(1), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    )
    return float(low), float(high)


def held_out_split(
    doc_ids: Sequence[str], provider_ids: Sequence[str], per_provider: int, max_train: int, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(train rows, query rows) of a sequence table: `per_provider` random documents of each provider
    are held out (their first row becomes a provider-id query); at most `max_train` random rows of
    the other documents are the training set. Rows are indices into the inputs, sorted."""
    generator = torch.Generator().manual_seed(seed)
    held = set()
    for provider in sorted(set(provider_ids)):
        docs = sorted({d for d, p in zip(doc_ids, provider_ids) if p == provider})
        held |= (
            {docs[i] for i in torch.randperm(len(docs), generator=generator)[:per_provider].tolist()}
            if len(docs) > 1
            else set()
        )
    first = {}
    for i, doc in enumerate(doc_ids):
        if doc in held:
            first.setdefault(doc, i)
    rest = [i for i, d in enumerate(doc_ids) if d not in held]
    train = sorted(rest[i] for i in torch.randperm(len(rest), generator=generator)[:max_train].tolist())
    return train, sorted(first.values())


def evaluate(
    model: nn.Module,
    task: Task,
    train: Sequence,
    queries: Sequence,
    projection: ProjectionConfig,
    curvature: CurvatureConfig,
    retrain: RetrainConfig,
    *,
    normalize: str = "none",
    train_providers: torch.Tensor | None = None,
    provider_queries: Sequence = (),
    query_providers: torch.Tensor | None = None,
    progress=None,
) -> dict[str, float]:
    """LDS (mean over queries, with its 95% bootstrap interval over queries), seed agreement and, given
    provider-labelled queries (with train_providers (N,) and query_providers (Q',) int64), provider-id
    accuracy of one configuration."""
    masks = subset_masks(len(train), retrain.subsets, retrain.fraction, retrain.seed)
    losses = retrain_losses(model, task, train, queries, masks, retrain, progress)
    gradients = capture(model, task, train, [*queries, *provider_queries], projection, fishers=(curvature.fisher,))
    scores = score_matrix(gradients, curvature, normalize)
    per_query = lds_per_query(scores[:, : len(queries)], masks, losses)
    low, high = mean_interval(per_query)
    metrics = {
        "lds": finite_mean(per_query),
        "lds_ci_low": low,
        "lds_ci_high": high,
        "seed_agreement": finite_mean(seed_agreement(losses)) if retrain.seeds > 1 else float("nan"),
        "subsets": retrain.subsets,
        "seeds": retrain.seeds,
        "train_sequences": len(train),
        "queries": len(queries),
    }
    if len(provider_queries):
        n_groups = int(max(train_providers.max(), query_providers.max())) + 1
        sums = group_sums(scores[:, len(queries) :], train_providers, n_groups)
        metrics["provider_acc"] = provider_accuracy(sums, query_providers)
    return metrics


# --- Provider values against leave-provider-out retraining (issue 11) ---------------------------------------
# A valuation claims: value_nats[p] = mean_q sum_{i in p} score(i, q) / N is the rise of the mean query loss
# if p's rows were removed. The ground truth fine-tunes the fixed base on all rows and on all rows but those
# of a removed set of providers (each provider alone, then random sets), with the same seeds, and measures the
# difference of the mean query loss (nats). Shapes: P providers, R removals, S seeds, Q queries.


@dataclass(frozen=True)
class ProviderRetrainConfig:
    """How the leave-provider-out ground truth is fine-tuned from the fixed base (AdamW, mean token loss)."""

    seeds: int = 2  # S: fine-tunings per removal (and of the full set), differing in data order
    random_sets: int = 4  # removals of a random set of providers, besides each provider alone
    set_fraction: float = 0.3  # of the providers in each random set
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    bootstrap_samples: int = 1000

    def retrain(self) -> RetrainConfig:
        return RetrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed)


def provider_removals(n_providers: int, config: ProviderRetrainConfig) -> list[list[int]]:
    """Each provider alone, then `random_sets` seeded random sets of round(set_fraction * P) (at least 2)."""
    generator = torch.Generator().manual_seed(config.seed + 104729)
    size = min(max(2, round(config.set_fraction * n_providers)), n_providers)
    sets = [sorted(torch.randperm(n_providers, generator=generator)[:size].tolist()) for _ in range(config.random_sets)]
    return [[p] for p in range(n_providers)] + sets


def predicted_removal_effects(group_sums: torch.Tensor, removals: Sequence[Sequence[int]], training_rows: int):
    """(R,) float64 predicted rise of the mean query loss (nats) of each removal: the sum of the removed
    providers' value_nats, value_nats[p] = mean_q group_sums[p, q] / training_rows (group_sums (P, Q))."""
    value = group_sums.double().mean(1) / training_rows  # (P,)
    return torch.stack([value[list(r)].sum() for r in removals])


def measured_removal_effects(
    train_fn: Callable[[Sequence, int], nn.Module],
    task: Task,
    train: Sequence,
    train_providers: torch.Tensor,
    queries: Sequence,
    removals: Sequence[Sequence[int]],
    config: ProviderRetrainConfig,
    progress=None,
) -> torch.Tensor:
    """(S, R, Q) float64 rise of each query's loss when `train_fn(examples, seed)` trains without the removed
    providers' rows, minus the same training (same seed) on all rows."""
    out = torch.zeros(config.seeds, len(removals), len(queries), dtype=torch.float64)
    for s in range(config.seeds):
        seed = config.seed * 1000 + s
        full = example_losses(train_fn(train, seed), task, queries)
        for r, removed in enumerate(removals):
            keep = ~torch.isin(train_providers, torch.tensor(list(removed)))
            subset = [train[i] for i in keep.nonzero().flatten().tolist()]
            out[s, r] = example_losses(train_fn(subset, seed), task, queries) - full
            if progress:
                progress(s * len(removals) + r + 1, config.seeds * len(removals))
    return out


def calibration(predicted, measured) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line measured = intercept + slope * predicted."""
    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def removal_agreement(predicted, measured, singles: int) -> dict[str, float]:
    """Spearman across providers (the first `singles` removals: each provider alone), calibration slope and
    intercept and the fraction of correct signs over every removal; predicted, measured (R,)."""
    predicted, measured = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    slope, intercept = calibration(predicted, measured)
    return {
        "spearman": spearman(predicted[:singles], measured[:singles]),
        "slope": slope,
        "intercept": intercept,
        "sign_agreement": float((np.sign(predicted) == np.sign(measured)).mean()),
    }


def split_half_agreement(measured: torch.Tensor) -> float:
    """Spearman between the mean of the first and of the second half of the seeds of measured (S, R): how
    far the ground truth repeats itself across seeds, the ceiling of any prediction's Spearman against half
    of them (against all S seeds it is higher). nan with one seed."""
    half = measured.shape[0] // 2
    if half == 0:
        return float("nan")
    return spearman(measured[:half].mean(0), measured[half : 2 * half].mean(0))


def within_group_agreement(
    group_sums: torch.Tensor, measured: torch.Tensor, query_groups: torch.Tensor, training_rows: int
) -> dict[str, float]:
    """Mean over query groups (e.g. each provider's held-out documents) of the Spearman across providers of
    the predicted and the measured single-provider removal effects on that group's queries, and of the
    ground truth's `split_half_agreement` on them: does the valuation rank providers for each kind of query?
    group_sums (P, Q); measured (S, R, Q) whose first P removals are each provider alone; query_groups (Q,)
    int, -1 for none."""
    n_providers = group_sums.shape[0]
    agreements, ceilings = [], []
    for group in query_groups[query_groups >= 0].unique().tolist():
        in_group = query_groups == group
        predicted = group_sums[:, in_group].double().mean(1) / training_rows  # (P,)
        effects = measured[:, :n_providers][:, :, in_group].mean(2)  # (S, P)
        agreements.append(spearman(predicted, effects.mean(0)))
        ceilings.append(split_half_agreement(effects))
    return {
        "group_spearman": finite_mean(torch.tensor(agreements)),
        "group_seed_agreement": finite_mean(torch.tensor(ceilings)),
    }


def provider_value_benchmark(
    predicted: torch.Tensor,
    measured: torch.Tensor,
    singles: int,
    *,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Agreement of predicted (R,) and measured (S, R, Q) removal effects: `removal_agreement` on the mean
    over seeds and queries, each with a percentile bootstrap interval over retraining seeds and queries (both
    resampled, then the mean taken again: the retraining noise of a few seeds is often the larger part), and
    the `split_half_agreement` of the measured single-provider effects (how much of the ground truth is
    removal effect rather than retraining noise; nan with one seed)."""
    measured = measured.double()
    point = removal_agreement(predicted, measured.mean((0, 2)), singles)
    generator = torch.Generator().manual_seed(seed)
    n_seeds, _, n_queries = measured.shape
    draws = {k: [] for k in point}
    for _ in range(samples):
        seeds = torch.randint(n_seeds, (n_seeds,), generator=generator)
        picks = torch.randint(n_queries, (n_queries,), generator=generator)
        resampled = measured[seeds][:, :, picks].mean((0, 2))
        for key, value in removal_agreement(predicted, resampled, singles).items():
            draws[key].append(value)
    out = dict(point)
    for key, values in draws.items():
        values = np.asarray(values)
        values = values[np.isfinite(values)]
        low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) if len(values) else (np.nan, np.nan)
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = float(low), float(high)
    out["seed_agreement"] = split_half_agreement(measured[:, :singles].mean(2))
    out["removals"] = float(measured.shape[1])
    out["seeds"] = float(measured.shape[0])
    return out


def evaluate_provider_values(
    model: nn.Module,
    task: Task,
    train: Sequence,
    train_providers: torch.Tensor,
    queries: Sequence,
    projection: ProjectionConfig,
    curvature: CurvatureConfig,
    config: ProviderRetrainConfig,
    *,
    query_providers: torch.Tensor | None = None,
    normalize: str = "none",
    train_fn: Callable[[Sequence, int], nn.Module] | None = None,
    progress=None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Provider values of `model` (trained on `train`; queries: (ids, n_prompt) pairs whose completions are
    measured) against leave-provider-out retraining: `train_fn(examples, seed)` retrains the way the model was
    made (from its fixed base); without it, `model` itself is fine-tuned with `config`, a proxy whose removal
    effects are those of one more pass over the data. Returns `provider_value_benchmark` metrics, the
    Spearman of the providers' row counts against their measured removal effects (`size_spearman`: the
    baseline that needs no valuation), provider-id top-1 accuracy and `within_group_agreement` when queries
    have a provider (query_providers (Q,), -1 for none), and the arrays: group_sums (P, Q), removals (R, P)
    bool, predicted (R,), measured (S, R, Q)."""
    n_providers = int(train_providers.max()) + 1
    gradients = capture(model, task, train, queries, projection, fishers=(curvature.fisher,))
    sums = group_sums(score_matrix(gradients, curvature, normalize), train_providers, n_providers)
    removals = provider_removals(n_providers, config)
    predicted = predicted_removal_effects(sums, removals, len(train))
    if train_fn is None:  # fine-tune the model itself: a proxy, when how it was trained is unknown

        def train_fn(examples: Sequence, seed: int) -> nn.Module:
            return fine_tune(model, task, examples, config.retrain(), seed)

    measured = measured_removal_effects(train_fn, task, train, train_providers, queries, removals, config, progress)
    metrics = provider_value_benchmark(
        predicted, measured, n_providers, samples=config.bootstrap_samples, seed=config.seed
    )
    metrics["train_sequences"] = float(len(train))
    metrics["queries"] = float(len(queries))
    # the baseline a valuation must beat: rank the providers by their number of training rows alone
    sizes = torch.bincount(train_providers, minlength=n_providers).double()
    metrics["size_spearman"] = spearman(sizes, measured[:, :n_providers].double().mean((0, 2)))
    if query_providers is not None and (query_providers >= 0).any():
        labelled = query_providers >= 0
        metrics["provider_acc"] = provider_accuracy(sums[:, labelled], query_providers[labelled])
        metrics.update(within_group_agreement(sums, measured, query_providers, len(train)))
    mask = torch.zeros(len(removals), n_providers, dtype=torch.bool)
    for row, removed in zip(mask, removals):
        row[list(removed)] = True
    return metrics, {"group_sums": sums, "removals": mask, "predicted": predicted, "measured": measured}
