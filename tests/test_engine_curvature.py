"""With full-rank identity projections, streamed scores equal exact influence computed with an
explicit damped per-layer Hessian (raw, KFAC, EK-FAC); statistics merge exactly across shards;
top-k and group sums equal the full score matrix."""

import pytest
import torch

from dataworth import (
    ConfigError,
    Curvature,
    CurvatureConfig,
    CurvatureStatistics,
    InfluenceScorer,
    LoGra,
    MismatchError,
    ProjectionConfig,
    merge_results,
)
from tests.engine_models import RegressionTask, TokenMLP, per_example_weight_grads, regression_examples

LAYERS = ["fc1", "fc2"]


def token_inputs_and_output_grads(model, task, examples):
    """Brute force with plain autograd: per layer (inputs x (B,T,n_in), output grads g (B,T,n_out))."""
    batch = task.collate(examples)
    h = model.fc1(batch["x"])
    a = torch.tanh(h)
    y = model.fc2(a)
    loss = (((y - batch["y"]) ** 2).sum(-1) * batch["mask"]).sum()
    g_h, g_y = torch.autograd.grad(loss, [h, y])
    return {"fc1": (batch["x"], g_h), "fc2": (a.detach(), g_y)}, batch["mask"].bool()


def explicit_hessians(model, task, examples, kind):
    """layer -> (D_l x D_l) float64 Hessian approximation built with explicit Kronecker products."""
    grads = per_example_weight_grads(model, task, examples, LAYERS)
    tokens, mask = token_inputs_and_output_grads(model, task, examples)
    n = len(examples)
    hessians = {}
    for name in LAYERS:
        g = grads[name][..., :-1].reshape(n, -1).double()  # (N, n_out n_in), bias not logged
        x, gy = tokens[name]
        a = x[mask].double().T @ x[mask].double() / mask.sum()  # E_tokens[x x^T]
        s = gy.reshape(-1, gy.shape[-1]).double().T @ gy.reshape(-1, gy.shape[-1]).double() / n
        if kind == "raw":
            hessians[name] = g.T @ g / n
        elif kind == "kfac":
            hessians[name] = torch.kron(s, a)
        else:
            q = torch.kron(torch.linalg.eigh(s)[1], torch.linalg.eigh(a)[1])
            hessians[name] = q @ torch.diag(((g @ q) ** 2).mean(0)) @ q.T
    return hessians, grads


def explicit_scores(hessians, train_grads, query_grads, alpha, relative=True):
    """(N, Q) sum over layers of g_i^T (H_l + lambda_l I)^-1 g_q."""
    total = 0
    for name, h in hessians.items():
        lam = alpha * torch.linalg.eigvalsh(h).mean() if relative else alpha
        gi = train_grads[name][..., :-1].reshape(len(train_grads[name]), -1).double()
        gq = query_grads[name][..., :-1].reshape(len(query_grads[name]), -1).double()
        total = total + gi @ torch.linalg.solve(h + lam * torch.eye(len(h), dtype=h.dtype), gq.T)
    return total


def fitted(kind, examples, queries):
    model, task = TokenMLP(), RegressionTask()
    logra = LoGra(model, task, ProjectionConfig(init="identity"), batch_size=5)
    stats = logra.new_statistics()
    train = logra.capture(examples, statistics=stats)
    return model, task, logra, Curvature.fit(stats, kind), train, logra.capture(queries, query=True)


@pytest.mark.parametrize("kind", ["raw", "kfac", "ekfac"])
@pytest.mark.parametrize("relative,damping", [(True, 0.1), (False, 0.05)])
def test_scores_equal_exact_influence_with_explicit_hessian(kind, relative, damping):
    examples, queries = regression_examples(12, seed=0), regression_examples(4, seed=1)
    model, task, logra, curvature, train, query = fitted(kind, examples, queries)
    config = CurvatureConfig(kind=kind, damping=damping, damping_mode="relative" if relative else "absolute")
    result = InfluenceScorer(query, curvature.preconditioner(config)).stream(train.split(5), keep_scores=True)

    hessians, train_grads = explicit_hessians(model, task, examples, kind)
    query_grads = per_example_weight_grads(model, task, queries, LAYERS)
    expected = explicit_scores(hessians, train_grads, query_grads, damping, relative)
    torch.testing.assert_close(result.scores.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_identity_curvature_is_the_plain_gradient_dot_product():
    examples, queries = regression_examples(8), regression_examples(3, seed=1)
    _, _, _, curvature, train, query = fitted("identity", examples, queries)
    result = InfluenceScorer(query, curvature.preconditioner(CurvatureConfig(kind="identity"))).stream(
        [train], keep_scores=True
    )
    torch.testing.assert_close(result.scores, train @ query.T)


@pytest.mark.parametrize("normalize", ["relatif", "cosine"])
def test_normalised_scores(normalize):
    examples, queries = regression_examples(10), regression_examples(3, seed=1)
    model, task, logra, curvature, train, query = fitted("ekfac", examples, queries)
    pre = curvature.preconditioner(CurvatureConfig())
    plain = InfluenceScorer(query, pre).stream([train], keep_scores=True, self_influence=True)
    normed = InfluenceScorer(query, pre, normalize=normalize).stream(train.split(4), keep_scores=True)
    expected = plain.scores.double() / plain.self_influence.sqrt()[:, None]
    if normalize == "cosine":
        q_self = (query.double() * pre(query.double())).sum(1)
        expected = expected / q_self.sqrt()[None, :]
        assert expected.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(normed.scores.double(), expected, rtol=1e-4, atol=1e-6)


def test_self_influence_is_the_quadratic_form():
    examples = regression_examples(6)
    model, task, _, curvature, train, _ = fitted("raw", examples, examples[:1])
    result = InfluenceScorer(train[:1], curvature.preconditioner(CurvatureConfig(kind="raw", damping=0.1))).stream(
        [train], self_influence=True
    )
    hessians, grads = explicit_hessians(model, task, examples, "raw")
    expected = explicit_scores(hessians, grads, grads, 0.1).diagonal()
    torch.testing.assert_close(result.self_influence, expected, rtol=1e-4, atol=1e-8)


def test_statistics_merged_from_three_shards_equal_one_pass():
    examples = regression_examples(15)
    logra = LoGra(TokenMLP(), RegressionTask(), ProjectionConfig(rank_in=3, rank_out=2), batch_size=4)
    whole = logra.new_statistics()
    logra.capture(examples, statistics=whole)
    shards = []
    for part in (examples[:4], examples[4:11], examples[11:]):
        stats = logra.new_statistics()
        logra.capture(part, statistics=stats)
        shards.append(CurvatureStatistics.from_tensors(logra.projection.layout, stats.to_tensors()))
    merged = shards[0].merge(shards[1]).merge(shards[2])
    assert (merged.tokens, merged.examples) == (whole.tokens, whole.examples)
    for name, sums in whole.sums.items():
        for key, value in sums.items():
            torch.testing.assert_close(merged.sums[name][key], value, rtol=1e-12, atol=1e-12)


def test_sampled_fisher_differs_from_empirical_and_is_reproducible():
    examples = regression_examples(8)
    logra = LoGra(TokenMLP(), RegressionTask(), ProjectionConfig(rank_in=3, rank_out=2))
    emp = logra.statistics(examples)
    sampled = [logra.statistics(examples, fisher="sampled") for _ in range(2)]
    key = ("fc2", "output_grad")
    assert not torch.allclose(emp.sums[key[0]][key[1]], sampled[0].sums[key[0]][key[1]])
    assert torch.equal(sampled[0].sums[key[0]][key[1]], sampled[1].sums[key[0]][key[1]])


def test_damping_is_per_layer_and_idempotent():
    examples = regression_examples(10)
    _, _, _, curvature, train, _ = fitted("ekfac", examples, examples[:2])
    before = {k: v.clone() for k, v in curvature.to_tensors().items()}
    config = CurvatureConfig(damping=0.1, per_layer_damping={"fc2": 0.5})
    first = curvature.preconditioner(config)
    again = curvature.preconditioner(config)
    assert first.damping == again.damping
    ratio = first.damping["fc2"] / curvature.factors["fc2"]["eigenvalues"].mean().item()
    assert ratio == pytest.approx(0.5)
    assert first.damping["fc1"] / curvature.factors["fc1"]["eigenvalues"].mean().item() == pytest.approx(0.1)
    torch.testing.assert_close(first(train), again(train), rtol=0, atol=0)
    for k, v in curvature.to_tensors().items():
        assert torch.equal(v, before[k])


def test_topk_and_group_sums_equal_the_full_matrix():
    examples, queries = regression_examples(23), regression_examples(4, seed=2)
    logra = LoGra(TokenMLP(), RegressionTask(), ProjectionConfig(rank_in=3, rank_out=3))
    stats = logra.new_statistics()
    train = logra.capture(examples, statistics=stats)
    scorer = logra.scorer(queries, Curvature.fit(stats, "kfac"), CurvatureConfig(kind="kfac"))
    docs = torch.arange(23) // 3
    providers = torch.arange(23) % 4
    result = scorer.stream(train.split(5), top_k=4, groups={"doc": docs, "provider": providers}, keep_scores=True)
    full = result.scores  # (N, Q)
    top = full.T.topk(4, dim=1)
    torch.testing.assert_close(result.top_scores, top.values)
    assert torch.equal(result.top_indices, top.indices)
    torch.testing.assert_close(result.example_totals, full.double().sum(1))
    torch.testing.assert_close(
        result.group_sums["doc"], torch.zeros(8, 4, dtype=torch.float64).index_add_(0, docs, full.double())
    )
    torch.testing.assert_close(
        result.group_sums["provider"], torch.zeros(4, 4, dtype=torch.float64).index_add_(0, providers, full.double())
    )


def test_mixing_projections_and_bad_damping_are_refused():
    examples = regression_examples(4)
    _, _, _, curvature, train, _ = fitted("kfac", examples, examples)
    with pytest.raises(MismatchError, match="different projections"):
        InfluenceScorer(train[:, :5], curvature.preconditioner(CurvatureConfig(kind="kfac")))
    with pytest.raises(ConfigError, match="damping"):
        CurvatureConfig(damping=0)
    with pytest.raises(ConfigError, match="damping"):
        CurvatureConfig(damping=-1.0)
    with pytest.raises(ConfigError, match="non-empty"):
        InfluenceScorer(train[:0], curvature.preconditioner(CurvatureConfig(kind="kfac")))


def test_results_of_row_ranges_merge_to_the_one_stream():
    """Three consecutive row ranges scored apart, merged: the same top-k, totals and group sums as one
    stream over every row, with a group (row 11's and row 12's) that spans two ranges."""
    examples, queries = regression_examples(20), regression_examples(4, seed=1)
    _, _, _, curvature, train, query = fitted("ekfac", examples, queries)
    scorer = InfluenceScorer(query, curvature.preconditioner(CurvatureConfig()))
    groups = torch.arange(20) // 3  # 7 groups of 3 rows (the last of 2)
    whole = scorer.stream(train.split(4), top_k=5, groups={"g": groups}, self_influence=True, keep_scores=True)
    bounds = [0, 7, 12, 20]
    parts, codes = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        local, part_codes = torch.unique(groups[start:end], return_inverse=True)  # sorted, as the rows are
        part = scorer.stream(
            train[start:end].split(4), top_k=5, groups={"g": part_codes}, self_influence=True, keep_scores=True
        )
        parts.append(part)
        codes.append(local)
    merged = merge_results(parts, top_k=5, group_codes={"g": codes})

    torch.testing.assert_close(merged.top_scores, whole.top_scores)
    assert torch.equal(merged.top_indices, whole.top_indices)
    assert merged.top_scores.shape == (4, 5)
    torch.testing.assert_close(merged.example_totals, whole.example_totals, rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.group_sums["g"], whole.group_sums["g"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.self_influence, whole.self_influence)
    torch.testing.assert_close(merged.scores, whole.scores)


def test_merge_refuses_parts_that_do_not_fit():
    examples, queries = regression_examples(6), regression_examples(3, seed=1)
    _, _, _, curvature, train, query = fitted("raw", examples, queries)
    pre = curvature.preconditioner(CurvatureConfig(kind="raw"))
    three = InfluenceScorer(query, pre).stream([train], groups={"g": torch.zeros(6, dtype=torch.int64)})
    two = InfluenceScorer(query[:2], pre).stream([train], groups={"g": torch.zeros(6, dtype=torch.int64)})
    with pytest.raises(MismatchError, match="different numbers of queries"):
        merge_results([three, two], top_k=3)
    with pytest.raises(MismatchError, match="grouping 'g': a part has 1 group sums but 2 codes"):
        merge_results([three], top_k=3, group_codes={"g": [torch.tensor([0, 1])]})
    with pytest.raises(ConfigError, match="at least one part"):
        merge_results([], top_k=3)
