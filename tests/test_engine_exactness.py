"""Exactness against brute force where hooks are easy to get wrong: in-place ops after tracked layers,
embeddings with a padding_idx, layers that see different token counts (a pooled head), and a curvature
used with a config of another kind."""

import pytest
import torch
from torch import nn

from dataworth import ConfigError, Curvature, CurvatureConfig, CurvatureStatistics, LoGra, ProjectionConfig, batches
from dataworth.capture import GradientCapture, input_output_covariances
from tests.engine_models import (
    InplaceNet,
    PaddedEmbeddingNet,
    PooledNet,
    PooledTask,
    RegressionTask,
    TokenMLP,
    id_examples,
    per_example_weight_grads,
    pooled_examples,
    regression_examples,
)
from tests.test_engine_capture import explicit_projection


@pytest.mark.parametrize("first", [False, True])
def test_inplace_ops_after_tracked_layers_capture_exact_gradients(first):
    """ReLU(inplace=True) on fc1's output and `h += a` on fc2's output, with and without fc1 first."""
    model, task, examples = InplaceNet(first), RegressionTask(), regression_examples(9)
    logra = LoGra(model, task, ProjectionConfig(rank_in=3, rank_out=2, bias=True), batch_size=4)
    captured = logra.capture(examples)
    names = list(logra.projection.layers)
    expected = explicit_projection(logra.projection, per_example_weight_grads(model, task, examples, names))
    assert all(b.view(expected).abs().sum() > 0 for b in logra.projection.layout.blocks)
    torch.testing.assert_close(captured.double(), expected, rtol=1e-5, atol=1e-6)
    # The PCA pass goes through the same hooks: every layer gets an output-gradient covariance.
    covariances = input_output_covariances(model, task, logra.projection.layers, batches(task, examples, 4), bias=False)
    assert all(c_out.abs().sum() > 0 for _, c_out in covariances.values())


class AuxMLP(TokenMLP):
    """TokenMLP plus `aux`, run on the input but not used by the output, and `never`, not run."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(4, 2)
        self.never = nn.Linear(4, 2)

    def forward(self, x):
        self.aux(x)
        return super().forward(x)


def test_a_layer_outside_the_loss_graph_is_zero_and_a_lost_gradient_is_refused(monkeypatch):
    model, task, examples = AuxMLP(), RegressionTask(), regression_examples(5)
    logra = LoGra(model, task, ProjectionConfig(rank_in=2, rank_out=2, exclude=("never",)))
    captured = logra.capture(examples)
    aux = logra.projection.layout.by_name["aux"]
    assert torch.equal(aux.view(captured), torch.zeros(5, 2, 2))  # truly independent of the loss
    brute = per_example_weight_grads(model, task, examples, ["fc1", "fc2"])
    expected = explicit_projection(logra.projection, {k: v[..., :-1] for k, v in brute.items()})
    torch.testing.assert_close(captured[:, : aux.offset].double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="never"):
        LoGra(model, task, ProjectionConfig(rank_in=2, rank_out=2)).capture(examples)
    # A layer in the loss's graph whose gradient never arrives is an error, not a zero.
    original = GradientCapture._on_output_grad

    def lose_fc1(self, name, g):
        if name != "fc1":
            original(self, name, g)

    monkeypatch.setattr(GradientCapture, "_on_output_grad", lose_fc1)
    with pytest.raises(ConfigError, match=r"\['fc1'\].*hook did not fire"):
        logra.capture(examples)


def padded_brute_force(model, task, examples):
    """(dW_emb (N, 4, 7), per token output grads g (N, T, 4), counted mask (N, T)) by plain autograd."""
    brute = per_example_weight_grads(model, task, examples, ["emb"])["emb"].transpose(1, 2)
    batch = task.collate(examples)
    e = model.emb(batch["x"]).detach().requires_grad_()
    loss = (((model.fc(e) - batch["y"]) ** 2).sum(-1) * batch["mask"]).sum()
    (g,) = torch.autograd.grad(loss, e)
    return brute, g, batch["mask"].bool() & (batch["x"] != 2), batch["x"]


def test_padding_idx_occurrences_carry_no_gradient_nor_statistics():
    model, task, examples = PaddedEmbeddingNet(), RegressionTask(), id_examples(8)
    brute, g, counted, ids = padded_brute_force(model, task, examples)
    assert ((ids == 2) & task.collate(examples)["mask"].bool()).sum() >= 3  # the padding id is real text here
    assert torch.equal(brute[:, :, 2], torch.zeros(8, 4))  # autograd gives row 2 nothing
    config = ProjectionConfig(rank_in=3, rank_out=2, embeddings=True, include=("emb",))
    logra = LoGra(model, task, config, batch_size=3)
    captured = logra.capture(examples)
    expected = explicit_projection(logra.projection, {"emb": brute})
    torch.testing.assert_close(captured.double(), expected, rtol=1e-5, atol=1e-6)
    # Statistics at full width: only tokens whose row gets a gradient count.
    full = LoGra(model, task, ProjectionConfig(init="identity", embeddings=True, include=("emb",)), batch_size=3)
    stats = full.new_statistics()
    full.capture(examples, statistics=stats)
    counts = torch.bincount(ids[counted], minlength=7).double()
    rows = g[ids != 2].double()  # (tokens, 4): output grads of the tokens whose row gets a gradient
    assert stats.layer_tokens["emb"] == int(counted.sum())
    torch.testing.assert_close(stats.sums["emb"]["activation"], torch.diag(counts))
    torch.testing.assert_close(stats.sums["emb"]["output_grad"], rows.T @ rows, rtol=1e-5, atol=1e-6)
    # And the PCA covariances.
    layers = full.projection.layers
    c_in, c_out = input_output_covariances(model, task, layers, batches(task, examples, 3), bias=False)["emb"]
    torch.testing.assert_close(c_in, torch.diag(counts) / counted.sum())
    torch.testing.assert_close(c_out, rows.T @ rows / 8, rtol=1e-5, atol=1e-6)


def test_curvature_used_with_a_config_of_another_kind_is_refused():
    model, task, examples = TokenMLP(), RegressionTask(), regression_examples(6)
    logra = LoGra(model, task, ProjectionConfig(rank_in=2, rank_out=2))
    stats = logra.new_statistics()
    logra.capture(examples, statistics=stats)
    kfac = Curvature.fit(stats, "kfac")
    with pytest.raises(ConfigError, match=r"fitted as 'kfac'.*CurvatureConfig\(kind='ekfac'\)"):
        kfac.preconditioner(CurvatureConfig())  # the default config says ekfac
    with pytest.raises(ConfigError, match="fitted as 'raw'"):
        logra.scorer(examples[:2], Curvature.fit(stats, "raw"), CurvatureConfig(kind="kfac"))
    logra.scorer(examples[:2], kfac, CurvatureConfig(kind="kfac"))  # matching kinds are accepted


def test_pooled_head_next_to_token_layers_has_exact_gradients_and_statistics():
    """fc1 sees (B, T, 4) under the task's mask; the head sees (B, 1, 5) and counts its one position."""
    model, task, examples = PooledNet(), PooledTask(), pooled_examples(10)
    logra = LoGra(model, task, ProjectionConfig(rank_in=3, rank_out=2), batch_size=4)
    stats = logra.new_statistics()
    captured = logra.capture(examples, statistics=stats)
    brute = {k: v[..., :-1] for k, v in per_example_weight_grads(model, task, examples, ["fc1", "head"]).items()}
    torch.testing.assert_close(captured.double(), explicit_projection(logra.projection, brute), rtol=1e-5, atol=1e-6)
    batch = task.collate(examples)
    mask = batch["mask"].bool()
    pooled = torch.tanh(model.fc1(batch["x"])).mean(1).detach().double()  # (N, 5): the head's inputs
    assert stats.layer_tokens == {"fc1": int(mask.sum()), "head": 10} and stats.tokens == int(mask.sum())
    u_head = pooled @ logra.projection.p_in["head"].double().T
    torch.testing.assert_close(stats.sums["head"]["activation"], u_head.T @ u_head, rtol=1e-5, atol=1e-6)
    u_fc1 = batch["x"][mask].double() @ logra.projection.p_in["fc1"].double().T
    torch.testing.assert_close(stats.sums["fc1"]["activation"], u_fc1.T @ u_fc1, rtol=1e-5, atol=1e-6)
    # KFAC divides each layer's activation sum by its own token count.
    a, _ = torch.linalg.eigh(u_head.T @ u_head / 10)
    s, _ = torch.linalg.eigh(stats.sums["head"]["output_grad"] / 10)
    lam = Curvature.fit(stats, "kfac").factors["head"]["eigenvalues"]
    torch.testing.assert_close(lam, torch.outer(s.clamp_min(0), a.clamp_min(0)))
    # Per-layer counts survive storage; maps saved without them give every layer the task's count.
    flat = stats.to_tensors()
    assert CurvatureStatistics.from_tensors(stats.layout, flat).layer_tokens == stats.layer_tokens
    old = CurvatureStatistics.from_tensors(stats.layout, {k: v for k, v in flat.items() if k != "__layer_tokens__"})
    assert old.layer_tokens == {"fc1": stats.tokens, "head": stats.tokens}
    # The PCA pass counts the same tokens.
    layers = logra.projection.layers
    c_in, _ = input_output_covariances(model, task, layers, batches(task, examples, 4), bias=False)["head"]
    torch.testing.assert_close(c_in, pooled.T @ pooled / 10, rtol=1e-5, atol=1e-6)
    LoGra(model, task, ProjectionConfig(init="pca", rank_in=2, rank_out=2), pca_examples=examples).capture(examples)
