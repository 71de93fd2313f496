"""The attribution-quality harness: subsets, Spearman/LDS against scipy, provider identification,
and one tiny end-to-end LDS evaluation."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from transformers import GPT2Config, GPT2LMHeadModel

from dataworth import CausalLMTask, CurvatureConfig, ProjectionConfig
from domain import quality


def test_subset_masks_are_deterministic_halves():
    a, b = quality.subset_masks(20, 6, 0.5, seed=3), quality.subset_masks(20, 6, 0.5, seed=3)
    assert torch.equal(a, b) and a.shape == (6, 20)
    assert (a.sum(1) == 10).all()
    assert not torch.equal(a, quality.subset_masks(20, 6, 0.5, seed=4))
    assert len({tuple(row.tolist()) for row in a}) == 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)
    assert quality.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert quality.spearman(b, b**3) == pytest.approx(1.0)
    assert math.isnan(quality.spearman(np.ones(5), b[:5]))


def test_lds_is_spearman_of_minus_subset_score_sums():
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.normal(size=(12, 3)))  # (N, Q)
    masks = quality.subset_masks(12, 8, seed=1)
    losses = torch.tensor(rng.normal(size=(2, 8, 3)))  # (S, m, Q)
    got = quality.lds_per_query(scores, masks, losses)
    predicted = -(masks.double().numpy() @ scores.numpy())
    expected = [spearmanr(predicted[:, q], losses.mean(0)[:, q]).statistic for q in range(3)]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    perfect = quality.lds_per_query(scores, masks, torch.tensor(predicted))  # losses exactly as predicted
    np.testing.assert_allclose(perfect.numpy(), 1.0)
    agreement = quality.seed_agreement(losses)
    assert agreement[0] == pytest.approx(spearmanr(losses[0, :, 0], losses[1, :, 0]).statistic)


def test_mean_interval_is_the_percentile_bootstrap_of_the_mean():
    values = torch.tensor([0.1, 0.5, float("nan"), 0.3, 0.9, -0.2])
    low, high = quality.mean_interval(values, samples=4000, seed=3)
    finite = values[torch.isfinite(values)].double()
    picks = torch.randint(5, (4000, 5), generator=torch.Generator().manual_seed(3))  # the same resamples, by hand
    means = np.sort(finite[picks].mean(1).numpy())
    assert (low, high) == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)), abs=1e-12)
    assert low < float(finite.mean()) < high and quality.mean_interval(values, samples=4000, seed=3) == (low, high)
    wide = quality.mean_interval(torch.tensor([-1.0, 1.0] * 4))
    assert wide[1] - wide[0] > high - low  # more spread, wider interval
    assert all(math.isnan(v) for v in quality.mean_interval(torch.tensor([0.4, float("nan")])))


def test_provider_accuracy_on_a_constructed_case():
    scores = torch.tensor([[5.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, -1.0]])  # (N=4, Q=3)
    sums = quality.group_sums(scores, torch.tensor([0, 0, 1, 2]), 3)  # (P=3, Q)
    torch.testing.assert_close(
        sums, torch.tensor([[6.0, 0.0, 2.0], [0.0, 3.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    )
    assert quality.provider_accuracy(sums, torch.tensor([0, 1, 2])) == pytest.approx(2 / 3)


def test_held_out_split_keeps_documents_apart():
    docs = [f"d{i // 3}" for i in range(24)]  # 8 documents of 3 rows
    providers = ["a" if i < 12 else "b" for i in range(24)]
    train, held = quality.held_out_split(docs, providers, per_provider=1, max_train=10, seed=0)
    assert len(train) == 10 and len(held) == 2
    assert {providers[i] for i in held} == {"a", "b"}
    assert not {docs[i] for i in held} & {docs[i] for i in train}
    assert (train, held) == quality.held_out_split(docs, providers, per_provider=1, max_train=10, seed=0)


def test_tiny_end_to_end_lds_is_finite():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_layer=1, n_head=2, n_embd=16, n_positions=16)).eval()
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(1, 32, (10,), generator=g).tolist() for _ in range(12)]
    queries = [(torch.randint(1, 32, (10,), generator=g).tolist(), 4) for _ in range(3)]
    metrics = quality.evaluate(
        model,
        CausalLMTask(pad_token_id=0),
        train,
        queries,
        ProjectionConfig(rank_in=2, rank_out=2, exclude=("lm_head",)),
        CurvatureConfig(kind="ekfac"),
        quality.RetrainConfig(subsets=4, seeds=2, epochs=1, lr=1e-2, batch_size=4),
        train_providers=torch.tensor([0, 1] * 6),
        provider_queries=train[:2],
        query_providers=torch.tensor([0, 1]),
    )
    assert all(math.isfinite(metrics[k]) for k in ("lds", "seed_agreement", "provider_acc"))
    assert -1 <= metrics["lds"] <= 1 and metrics["subsets"] == 4
    assert metrics["lds_ci_low"] <= metrics["lds"] <= metrics["lds_ci_high"]


def test_provider_removals_predictions_and_calibration():
    config = quality.ProviderRetrainConfig(random_sets=3, set_fraction=0.5, seed=1)
    removals = quality.provider_removals(4, config)
    assert removals[:4] == [[0], [1], [2], [3]] and all(len(r) == 2 for r in removals[4:])
    assert removals == quality.provider_removals(4, config)
    sums = torch.tensor([[2.0, 4.0], [-1.0, -3.0], [0.0, 1.0], [5.0, 5.0]])  # (P, Q)
    predicted = quality.predicted_removal_effects(sums, [[0], [1], [0, 1]], training_rows=10)
    torch.testing.assert_close(predicted, torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    assert quality.calibration([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]) == pytest.approx((2.0, 1.0))
    agreement = quality.removal_agreement([0.1, -0.2, 0.3, 0.05], [0.2, -0.1, 0.5, -0.01], singles=3)
    assert agreement["spearman"] == pytest.approx(1.0) and agreement["sign_agreement"] == pytest.approx(0.75)


def test_provider_value_benchmark_is_perfect_when_measured_equals_predicted():
    predicted = torch.tensor([0.3, -0.2, 0.1, 0.05, 0.25], dtype=torch.float64)
    rng = np.random.default_rng(0)
    noise = torch.tensor(rng.normal(0, 0.01, size=(2, 5, 6)))
    measured = predicted[None, :, None] + noise - noise.mean(2, keepdim=True)  # per-query noise, exact means
    metrics = quality.provider_value_benchmark(predicted, measured, singles=4, samples=200)
    assert metrics["spearman"] == pytest.approx(1.0) and metrics["slope"] == pytest.approx(1.0)
    assert metrics["intercept"] == pytest.approx(0.0, abs=1e-12) and metrics["sign_agreement"] == 1.0
    assert metrics["slope_ci_low"] <= 1.0 <= metrics["slope_ci_high"]
    assert metrics["removals"] == 5 and metrics["seeds"] == 2


def test_provider_value_benchmark_interval_covers_retraining_seeds_not_only_queries():
    """Seeds that disagree on the ranking, each the same on every query: resampling queries alone would give
    a zero-width interval around the seeds' mean; the interval must show that the seeds disagree."""
    predicted = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    by_seed = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    measured = by_seed[:, :, None].expand(3, 4, 5)  # (S, R, Q): no query-to-query spread at all
    metrics = quality.provider_value_benchmark(predicted, measured, singles=4, samples=400)
    assert metrics["spearman"] == pytest.approx(1.0)  # the mean over seeds still ranks like the prediction
    assert metrics["spearman_ci_low"] == pytest.approx(-1.0)  # a draw of seed 1 alone ranks it in reverse
    assert metrics["spearman_ci_high"] == pytest.approx(1.0)
    assert metrics["slope_ci_low"] < 0 and metrics["slope_ci_high"] == pytest.approx(1.0)


def test_split_half_and_within_group_agreement():
    measured = torch.tensor([[1.0, 2.0, 3.0], [1.1, 2.2, 2.9], [3.0, 2.0, 1.0], [2.9, 2.1, 1.2]])  # (S=4, R)
    assert quality.split_half_agreement(measured) == pytest.approx(-1.0)  # seeds 0-1 vs 2-3 disagree
    assert quality.split_half_agreement(measured[:2]) == pytest.approx(1.0)
    assert math.isnan(quality.split_half_agreement(measured[:1]))

    # 3 providers, 4 queries in 2 groups: group 0 ranks providers 0 < 1 < 2, group 1 the reverse
    sums = torch.tensor([[1.0, 1.0, 9.0, 9.0], [2.0, 2.0, 5.0, 5.0], [3.0, 3.0, 1.0, 1.0]])  # (P, Q)
    groups = torch.tensor([0, 0, 1, -1])
    exact = (sums.double() / 10).T[None].expand(2, 4, 3).transpose(1, 2)  # (S=2, R=P, Q): measured = predicted
    agreement = quality.within_group_agreement(sums, exact, groups, training_rows=10)
    assert agreement == pytest.approx({"group_spearman": 1.0, "group_seed_agreement": 1.0})
    flipped = exact.clone()
    flipped[:, :, 2] = exact[:, :, 2].flip(1)  # group 1's measured ranking reversed
    assert quality.within_group_agreement(sums, flipped, groups, 10)["group_spearman"] == pytest.approx(0.0)


def test_tiny_end_to_end_provider_values_are_finite():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_layer=1, n_head=2, n_embd=16, n_positions=16)).eval()
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(1, 32, (10,), generator=g).tolist() for _ in range(12)]
    queries = [(torch.randint(1, 32, (10,), generator=g).tolist(), 4) for _ in range(3)]
    metrics, arrays = quality.evaluate_provider_values(
        model,
        CausalLMTask(pad_token_id=0),
        train,
        torch.tensor([0, 1, 2, 0, 1, 0] * 2),  # 6, 4 and 2 rows
        queries,
        ProjectionConfig(rank_in=2, rank_out=2, exclude=("lm_head",)),
        CurvatureConfig(kind="ekfac"),
        quality.ProviderRetrainConfig(seeds=2, random_sets=1, batch_size=4, bootstrap_samples=50),
        query_providers=torch.tensor([0, 1, -1]),
    )
    assert arrays["measured"].shape == (2, 4, 3) and arrays["group_sums"].shape == (3, 3)
    assert all(math.isfinite(metrics[k]) for k in ("spearman", "slope", "intercept", "sign_agreement"))
    assert 0 <= metrics["provider_acc"] <= 1 and metrics["train_sequences"] == 12
    singles = arrays["measured"][:, :3].double().mean((0, 2))  # each provider removed alone
    assert metrics["size_spearman"] == pytest.approx(quality.spearman([6, 4, 2], singles))
    assert -1 <= metrics["group_spearman"] <= 1 and -1 <= metrics["group_seed_agreement"] <= 1
