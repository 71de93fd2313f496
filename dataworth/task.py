"""The task protocol: the caller states once what an example's loss is; the engine batches.

A task turns a list of examples into a batch (`collate`) and a batch into a scalar that is the SUM of
per-example losses, so the gradient of that scalar with respect to any activation of example b is
exactly the gradient of example b's own loss (examples never interact in the models we value).
"""

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # label of a token that is not a target (padding, prompt)


class Task:
    """Override `collate` and `loss`; `query_loss` defaults to `loss`, `token_mask` to all tokens."""

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, *, sample_labels: bool = False) -> torch.Tensor:
        """Sum over the batch of each training example's loss; with `sample_labels`, the targets
        are drawn from the model's own predictive distribution (true Fisher)."""
        raise NotImplementedError

    def query_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Sum over the batch of each query's measurement (by default its training loss)."""
        return self.loss(model, batch)

    def token_mask(self, batch: dict) -> torch.Tensor | None:
        """(B, T) bool of tokens that count in activation statistics; None: all of them."""
        return None


def batches(task: Task, examples: Sequence[Any], batch_size: int, device: torch.device | str = "cpu") -> Iterator[dict]:
    """Collated batches of `batch_size` examples, in order, moved to `device`."""
    for start in range(0, len(examples), batch_size):
        batch = task.collate(examples[start : start + batch_size])
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class CausalLMTask(Task):
    """Next-token loss of a Hugging Face causal LM, summed over target tokens.

    An example is a list of token ids, or a pair (ids, n_prompt) whose first n_prompt tokens are
    context only (a query's prompt): they are never targets. Batches are right-padded; padding is
    masked out of attention and of the loss, so it contributes exactly nothing.
    """

    def __init__(self, pad_token_id: int, seed: int = 0):
        self.pad_token_id = pad_token_id
        self.generator = torch.Generator().manual_seed(seed)  # for sampled-Fisher labels

    def collate(self, examples):
        pairs = [e if isinstance(e, tuple) else (e, 0) for e in examples]
        length = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((len(pairs), length), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)  # (B, T)
        labels = torch.full((len(pairs), length), IGNORE, dtype=torch.long)  # (B, T)
        for b, (ids, n_prompt) in enumerate(pairs):
            ids = torch.as_tensor(ids, dtype=torch.long)
            input_ids[b, : len(ids)] = ids
            attention_mask[b, : len(ids)] = 1
            labels[b, n_prompt : len(ids)] = ids[n_prompt:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def loss(self, model, batch, *, sample_labels=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        targets = batch["labels"][:, 1:]  # (B, T-1)
        if sample_labels:
            probs = torch.softmax(logits.detach(), dim=-1).reshape(-1, logits.shape[-1]).cpu()
            drawn = torch.multinomial(probs, 1, generator=self.generator).view_as(targets).to(targets.device)
            targets = torch.where(targets == IGNORE, targets, drawn)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )

    def token_mask(self, batch):
        return batch["attention_mask"].bool()
