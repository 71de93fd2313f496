"""Kronfluence EK-FAC as an anchor: full (unprojected) per-layer EK-FAC on the same model, data and
queries. GPT-2's Conv1D layers are rewritten as nn.Linear (Kronfluence tracks Linear/Conv2d only).
Returns scores (N, Q) with our sign convention (positive: the example lowers the query's loss)."""

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dataworth import CausalLMTask


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """A copy of `model` whose Conv1D layers (y = x W + b, W: n_in x n_out) are nn.Linear."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data = child.weight.data.T.contiguous()
                linear.bias.data = child.bias.data.clone()
                setattr(module, child_name, linear)
    return model


class _Examples(torch.utils.data.Dataset):
    def __init__(self, task: CausalLMTask, examples):
        self.rows = [{k: v[0] for k, v in task.collate([e]).items()} for e in examples]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def scores(model: nn.Module, task: CausalLMTask, train, queries, output_dir: Path, seq_len: int) -> torch.Tensor:
    """(N, Q) Kronfluence EK-FAC pairwise scores with its defaults: sampled Fisher, damping 1e-8 (absolute),
    every Linear but lm_head."""
    return damped_scores(model, task, train, queries, output_dir, seq_len)[0]


def damped_scores(
    model: nn.Module,
    task: CausalLMTask,
    train,
    queries,
    output_dir: Path,
    seq_len: int,
    *,
    lm_head: bool = False,
    empirical: bool = False,
    dampings: Sequence[float | None] = (None,),
) -> list[torch.Tensor]:
    """(N, Q) Kronfluence EK-FAC pairwise scores on every Linear (lm_head too if `lm_head`), with the sampled
    (default) or empirical Fisher, one per damping, the factors fitted once. A damping of None is Kronfluence's
    default (1e-8, absolute); a float is relative, that x each layer's mean eigenvalue (Kronfluence's heuristic
    uses 0.1, dataworth's default is 0.01)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.factor import config as kronfluence_config
    from kronfluence.task import Task

    def pad(examples):
        return [
            (ids + [task.pad_token_id] * (seq_len - len(ids)), n)
            for ids, n in (e if isinstance(e, tuple) else (e, 0) for e in examples)
        ]

    def fix_labels(dataset, examples):  # padded positions are not targets
        for row, e in zip(dataset.rows, examples):
            ids, _ = e if isinstance(e, tuple) else (e, 0)
            row["attention_mask"][len(ids) :] = 0
            row["labels"][len(ids) :] = -100
        return dataset

    linear = conv1d_to_linear(model).eval()
    tracked = [n for n, m in linear.named_modules() if isinstance(m, nn.Linear) and (lm_head or n != "lm_head")]

    sampler = CausalLMTask(task.pad_token_id, seed=1)  # its own label-sampling generator

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return sampler.loss(model, batch, sample_labels=sample)

        def compute_measurement(self, batch, model):
            return task.loss(model, batch)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    train_ds = fix_labels(_Examples(task, pad(train)), train)
    query_ds = fix_labels(_Examples(task, pad(queries)), queries)
    lm_task = LMTask()
    prepared = prepare_model(linear, lm_task)
    analyzer = Analyzer(
        analysis_name="quality", model=prepared, task=lm_task, cpu=True, output_dir=str(output_dir), disable_tqdm=True
    )
    analyzer.fit_all_factors(
        "ekfac",
        train_ds,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=empirical),
        per_device_batch_size=16,
        overwrite_output_dir=True,
    )
    heuristic, out = kronfluence_config.HEURISTIC_DAMPING_SCALE, []
    for i, damping in enumerate(dampings):
        if damping is not None:  # its damping_factor=None damps each layer by this scale x its mean eigenvalue
            kronfluence_config.HEURISTIC_DAMPING_SCALE = damping
        try:
            analyzer.compute_pairwise_scores(
                f"pairwise{i}",
                "ekfac",
                query_ds,
                train_ds,
                per_device_query_batch_size=len(queries),
                per_device_train_batch_size=32,
                score_args=ScoreArguments() if damping is None else ScoreArguments(damping_factor=None),
                overwrite_output_dir=True,
            )
        finally:
            kronfluence_config.HEURISTIC_DAMPING_SCALE = heuristic
        out.append(analyzer.load_pairwise_scores(f"pairwise{i}")["all_modules"].T.float())  # (Q, N) -> (N, Q)
    return out
