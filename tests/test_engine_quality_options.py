"""Engine options added for attribution quality (issue 10), each proved exact against brute force:
EK-FAC eigenvalues from a pass over gradients equal those from second moments; projected EK-FAC with
the curvature's own eigenbasis as projection (init="pca") equals full EK-FAC restricted to the top
subspace."""

import pytest
import torch

from dataworth import (
    ConfigError,
    Curvature,
    CurvatureConfig,
    InfluenceScorer,
    LoGra,
    MismatchError,
    ProjectionConfig,
)
from tests.engine_models import RegressionTask, TokenMLP, regression_examples


def captured(config, examples, queries, batch_size=5):
    model, task = TokenMLP(), RegressionTask()
    logra = LoGra(model, task, config, pca_examples=examples, batch_size=batch_size)
    stats = logra.new_statistics(second_moment=config.init != "identity")
    train = logra.capture(examples, statistics=stats)
    return logra, stats, train, logra.capture(queries, query=True)


@pytest.mark.parametrize(
    "config", [ProjectionConfig(rank_in=3, rank_out=2), ProjectionConfig(rank_in=4, rank_out=3, bias=True, seed=3)]
)
def test_ekfac_from_gradients_equals_ekfac_from_second_moments(config):
    _, stats, train, _ = captured(config, regression_examples(14), regression_examples(2, seed=1))
    expected = Curvature.fit(stats, "ekfac")
    got = Curvature.fit_ekfac_from_gradients(stats, train.split(4))
    for name, factors in expected.factors.items():
        for key, value in factors.items():
            torch.testing.assert_close(got.factors[name][key], value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["raw", "ekfac"])
def test_fit_with_gradients_instead_of_second_moments_equals_fit_with_them(kind):
    config = ProjectionConfig(rank_in=3, rank_out=2)
    _, stats, train, _ = captured(config, regression_examples(14), regression_examples(2, seed=1))
    without = stats.__class__.from_tensors(
        stats.layout, {k: v for k, v in stats.to_tensors().items() if not k.endswith("|second_moment")}
    )
    assert not without.has_second_moment
    with pytest.raises(ConfigError, match="second_moment=True, or the gradients"):
        Curvature.fit(without, kind)
    expected, got = Curvature.fit(stats, kind), Curvature.fit(without, kind, gradients=train.split(4))
    for name, factors in expected.factors.items():
        if kind == "raw":  # eigenvectors are defined up to sign: compare the matrices they make
            factors = {
                "matrix": factors["eigenvectors"] @ torch.diag(factors["eigenvalues"]) @ factors["eigenvectors"].T
            }
            mine = got.factors[name]
            got.factors[name] = {
                "matrix": mine["eigenvectors"] @ torch.diag(mine["eigenvalues"]) @ mine["eigenvectors"].T
            }
        for key, value in factors.items():
            torch.testing.assert_close(got.factors[name][key], value, rtol=1e-9, atol=1e-12)
    with pytest.raises(MismatchError):
        Curvature.fit(without, kind, gradients=[train[:7]])


def test_ekfac_from_gradients_refuses_other_examples():
    _, stats, train, _ = captured(
        ProjectionConfig(rank_in=3, rank_out=2), regression_examples(10), regression_examples(2, seed=1)
    )
    with pytest.raises(MismatchError):
        Curvature.fit_ekfac_from_gradients(stats, [train[:7]])


def full_width_ekfac_scores(examples, queries, keep_in, keep_out, damping):
    """Brute force: full-width EK-FAC influence, summing only eigen-directions (o, i) with o among the
    top `keep_out` eigenvectors of S and i among the top `keep_in` of A (per layer)."""
    logra, stats, train, query = captured(ProjectionConfig(init="identity"), examples, queries)
    curvature = Curvature.fit_ekfac_from_gradients(stats, [train])
    total = 0
    for block in logra.projection.layout.blocks:
        f = curvature.factors[block.name]
        q_s, q_a = f["q_s"].flip(1)[:, :keep_out], f["q_a"].flip(1)[:, :keep_in]  # top eigenvectors first
        lam = f["eigenvalues"].flip(0, 1)[:keep_out, :keep_in]
        g_i = q_s.T @ block.view(train).double() @ q_a  # (N, keep_out, keep_in) rotated
        g_q = q_s.T @ block.view(query).double() @ q_a
        total = total + torch.einsum("noi,qoi->nq", g_i, g_q / (lam + damping))
    return total


@pytest.mark.parametrize("k_in,k_out", [(2, 2), (3, 2), (4, 3)])
def test_eigenbasis_projection_equals_full_ekfac_restricted_to_top_subspace(k_in, k_out):
    examples, queries = regression_examples(16, seed=2), regression_examples(3, seed=5)
    damping = 0.05
    expected = full_width_ekfac_scores(examples, queries, k_in, k_out, damping)
    _, stats, train, query = captured(ProjectionConfig(init="pca", rank_in=k_in, rank_out=k_out), examples, queries)
    config = CurvatureConfig(damping=damping, damping_mode="absolute")
    got = (
        InfluenceScorer(query, Curvature.fit(stats, "ekfac").preconditioner(config))
        .stream([train], keep_scores=True)
        .scores
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())
