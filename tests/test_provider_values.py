"""Provider values in nats: the unit against exact retraining of a linear regression, the intervals and
verdicts, query files with reference completions, the chart and the MLflow metric names."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from dataworth import CurvatureConfig, ProjectionConfig, Task
from domain import quality
from domain.queries import QueryFileError, fit_reference, read_prompts
from domain.valuation import (
    HELPS,
    HURTS,
    UNCLEAR,
    VALUE_LABEL,
    group_table,
    metric_name,
    provider_chart,
    provider_table,
    summary_lines,
    tracking_metrics,
)


class HalfSquaredError(Task):
    """Example = (x (1, d), y (1, 1)); loss = sum of 0.5 (w.x - y)^2: its Hessian is x x^T."""

    def collate(self, examples):
        x, y = zip(*examples)
        return {"x": torch.stack(x), "y": torch.stack(y)}

    def loss(self, model, batch, *, sample_labels=False):
        return 0.5 * ((model(batch["x"]) - batch["y"]) ** 2).sum()


def regression_with_unit_residuals(n: int, d: int, seed: int):
    """X (n, d), y (n,) and the least-squares w whose residuals y - X w are exactly +-1: then the
    empirical Fisher mean_i r_i^2 x_i x_i^T equals the Hessian X^T X / n of the mean loss."""
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=n)
    x0 = rng.normal(size=(n, d))
    x = x0 - np.outer(signs, signs @ x0) / n  # X^T signs = 0: the signs are orthogonal to X's columns
    w = rng.normal(size=d)
    return x, x @ w + signs, w


def test_value_nats_is_the_first_order_rise_of_the_mean_query_loss_under_exact_retraining():
    n, d, per_provider, q = 3000, 5, 30, 6
    x, y, w = regression_with_unit_residuals(n, d, seed=0)
    assert np.allclose(np.linalg.lstsq(x, y, rcond=None)[0], w) and np.allclose(np.abs(y - x @ w), 1)
    rng = np.random.default_rng(1)
    xq, yq = rng.normal(size=(q, d)), rng.normal(size=q) * 3
    providers = np.full(n, 4)  # providers 0..3 own 30 rows each, provider 4 the rest
    providers[: 4 * per_provider] = np.repeat(np.arange(4), per_provider)

    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w, dtype=torch.float32)[None])
    task = HalfSquaredError()
    as_examples = [
        (torch.tensor(a, dtype=torch.float32)[None], torch.tensor([[b]], dtype=torch.float32)) for a, b in zip(x, y)
    ]
    queries = [
        (torch.tensor(a, dtype=torch.float32)[None], torch.tensor([[b]], dtype=torch.float32)) for a, b in zip(xq, yq)
    ]
    gradients = quality.capture(model, task, as_examples, queries, ProjectionConfig(init="identity"))
    scores = quality.score_matrix(gradients, CurvatureConfig(kind="raw", damping=1e-9, damping_mode="absolute"))
    sums = quality.group_sums(scores, torch.tensor(providers), 5).numpy()  # (P, Q)
    losses = 0.5 * (xq @ w - yq) ** 2
    table = provider_table(
        sums,
        [f"p{i}" for i in range(5)],
        {},
        {},
        training_rows=n,
        query_losses=losses,
        completion_tokens=np.ones(q),
        bootstrap_samples=200,
        seed=0,
    )
    for p in range(4):
        keep = providers != p
        refit = np.linalg.lstsq(x[keep], y[keep], rcond=None)[0]  # exact retraining without provider p
        measured = 0.5 * (xq @ refit - yq) ** 2 - losses  # (Q,) rise of each query's loss
        predicted = sums[p] / n
        np.testing.assert_allclose(predicted, measured, rtol=0.05, atol=0.02 * np.abs(measured).max())
        row = table.row(by_predicate=pl.col("provider_id") == f"p{p}", named=True)
        assert row["value_nats"] == pytest.approx(predicted.mean())
        assert row["value_nats"] == pytest.approx(measured.mean(), rel=0.05, abs=0.02 * np.abs(measured).max())
        assert row["value_relative"] == pytest.approx(predicted.mean() / losses.mean())
        assert row["training_rows"] == n and row["mean_query_loss"] == pytest.approx(losses.mean())


def test_intervals_verdicts_and_disagreement_are_reported_apart():
    rng = np.random.default_rng(0)
    q = 40
    values = np.vstack(
        [
            rng.normal(5.0, 1.0, q),  # helps every query
            rng.normal(-5.0, 1.0, q),  # hurts every query
            np.where(np.arange(q) % 2 == 0, 10.0, -10.0) + rng.normal(0, 0.1, q),  # helps half, hurts half
        ]
    )
    tokens = np.full(q, 10)
    table = provider_table(
        values,
        ["good", "bad", "split"],
        {"good": 2},
        {"good": 100},
        training_rows=100,
        query_losses=np.full(q, 20.0),
        completion_tokens=tokens,
        bootstrap_samples=500,
        seed=0,
    )
    assert table["provider_id"].to_list() == ["good", "split", "bad"]  # helps, not distinguishable, hurts
    rows = {r["provider_id"]: r for r in table.iter_rows(named=True)}
    assert rows["good"]["verdict"] == HELPS and rows["bad"]["verdict"] == HURTS and rows["split"]["verdict"] == UNCLEAR
    assert rows["good"]["ci_low"] > 0 and rows["split"]["ci_low"] < 0 < rows["split"]["ci_high"]
    assert rows["split"]["queries_helped"] == pytest.approx(0.5) and rows["good"]["queries_helped"] == 1.0
    assert rows["split"]["query_p10"] < -0.09 and rows["split"]["query_p90"] > 0.09  # real disagreement, in nats
    assert sum(abs(r["share"]) for r in rows.values()) == pytest.approx(1.0)
    assert np.sign(rows["bad"]["share"]) == -1
    assert rows["good"]["value_nats"] == pytest.approx(values[0].mean() / 100)
    assert rows["good"]["value_nats_per_token"] == pytest.approx(values[0].mean() / 100 / 10)
    assert rows["good"]["value_relative"] == pytest.approx(values[0].mean() / 100 / 20)
    assert rows["good"]["value_per_training_token"] == pytest.approx(rows["good"]["value_nats"] / 100)
    text = "\n".join(summary_lines(table))
    assert "not distinguishable from 0:" in text and "split" in text and "nats" in text

    groups = group_table(
        values,
        ["good", "bad", "split"],
        ["even" if i % 2 == 0 else "odd" for i in range(q - 1)] + [None],
        training_rows=100,
        query_losses=np.full(q, 20.0),
        completion_tokens=tokens,
        bootstrap_samples=200,
        seed=0,
    )
    split = {r["query_group"]: r for r in groups.filter(pl.col("provider_id") == "split").iter_rows(named=True)}
    assert split["even"]["verdict"] == HELPS and split["odd"]["verdict"] == HURTS
    assert split["even"]["queries"] == 20 and split["odd"]["queries"] == 19


def test_metric_names_are_sanitised_and_one_per_provider():
    assert metric_name("value_nats", "acme:data/v2 (eu)") == "value_nats.acme_data/v2 _eu_"
    table = provider_table(
        np.array([[1.0, 2.0], [-1.0, 0.5]]),
        ["a", "b$c"],
        {},
        {},
        training_rows=10,
        query_losses=np.array([1.0, 2.0]),
        completion_tokens=np.array([2, 0]),
        bootstrap_samples=50,
        seed=0,
    )
    metrics = tracking_metrics(table)
    assert metrics["value_nats.a"] == pytest.approx(0.15) and "value_nats.b_c" in metrics
    assert table.row(by_predicate=pl.col("provider_id") == "a", named=True)["value_nats_per_token"] == pytest.approx(
        0.05
    )  # the query with no completion token is left out of the per-token mean


def test_chart_labels_its_axis_and_its_tick_labels_do_not_overlap():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 3e5, size=(10, 20))
    table = provider_table(
        values,
        [f"provider_{i}$" for i in range(10)],
        {},
        {},
        training_rows=7,
        query_losses=np.full(20, 30.0),
        completion_tokens=np.full(20, 5),
        bootstrap_samples=100,
        seed=0,
    )
    figure = provider_chart(table, "title with $ sign")
    axes = figure.axes[0]
    assert VALUE_LABEL in axes.get_xlabel()
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in axes.get_xticklabels() if t.get_text()]
    assert len(boxes) >= 2
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))


def test_query_file_with_reference_completions_and_groups(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [
        {"query_id": "a", "prompt": "x", "completion": " y", "group": "numpy"},
        {"query_id": "b", "prompt": "z"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_prompts(path) == lines
    for bad, message in [
        ({"query_id": "c", "prompt": "x", "completion": ""}, "completion must be a non-empty string"),
        ({"query_id": "c", "prompt": "x", "group": 3}, "group must be a non-empty string"),
        ({"query_id": "c", "prompt": "x", "group": "all"}, "reserved"),
    ]:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(QueryFileError, match=message):
            read_prompts(path)


def test_a_reference_completion_is_cut_to_the_context():
    from domain.lm import QueryTooLongError, train_tokenizer

    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    prompt, completion = "the quick", " brown fox jumps over the lazy dog" * 5
    n_prompt = len(tokenizer.encode(prompt))
    cut = fit_reference(tokenizer, prompt, completion, context=n_prompt + 7)
    assert len(tokenizer.encode(cut)) == 7 and completion.startswith(cut)
    assert fit_reference(tokenizer, prompt, " brown", context=64) == " brown"
    with pytest.raises(QueryTooLongError):
        fit_reference(tokenizer, prompt, completion, context=n_prompt)
