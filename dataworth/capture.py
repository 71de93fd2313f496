"""Passes over data with layer hooks: projected per-example gradients, and the covariances PCA needs.

Per layer and token t: u_t = P_in x_t (k_in), v_t = P_out g_t (k_out), and example b's projected
gradient is G_b = sum_t v_t u_t^T (k_out x k_in) = P_out dW_b P_in^T. The weight gradient dW_b is
never formed.
"""

from dataclasses import dataclass

import torch
from torch import nn

from dataworth.errors import ConfigError, NonFiniteError
from dataworth.hooks import LayerHooks
from dataworth.layers import LayerSpec
from dataworth.projection import Projection
from dataworth.task import Task


@dataclass
class BatchCapture:
    """What one batch's capture yields."""

    gradients: torch.Tensor  # (B, D) float32 projected per-example gradients, layout order
    inputs: dict[str, torch.Tensor]  # layer -> (B, T, k_in) float32 projected inputs u
    output_grads: dict[str, torch.Tensor]  # layer -> (B, T, k_out) float32 projected output grads v
    mask: torch.Tensor  # (B, T) bool: tokens counted in activation statistics


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """(B, T, n) -> (B, T, n + 1): the bias gradient is the weight gradient of a constant input."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def _token_mask(task: Task, batch: dict, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) bool; every token when the task does not say, with T taken from the layers' inputs."""
    mask = task.token_mask(batch)
    if mask is not None:
        return mask.bool()
    widest = max(inputs.values(), key=lambda u: u.shape[0])
    return torch.ones(widest.shape[:2], dtype=torch.bool, device=widest.device)


class GradientCapture:
    """Context manager: while open, `capture(batch)` returns projected per-example gradients."""

    def __init__(self, model: nn.Module, projection: Projection, task: Task):
        self.model, self.projection, self.task = model, projection, task
        device = next(model.parameters()).device
        self.p_in = {n: p.to(device) for n, p in projection.p_in.items()}  # (k_in, n_in[+1])
        self.p_in_rows = {  # embeddings: (V, k_in), u_t is row ids_t
            n: p.T.contiguous() for n, p in self.p_in.items() if projection.layers[n].kind == "embedding"
        }
        self.p_out = {n: p.to(device) for n, p in projection.p_out.items()}  # (k_out, n_out)
        self.with_bias = {n: p.shape[1] == s.n_in + 1 for (n, s), p in zip(projection.layers.items(), self.p_in.values())}
        self._inputs, self._grads = {}, {}
        self._hooks = LayerHooks(model, projection.layers, self._on_input, self._on_output_grad)

    def __enter__(self) -> "GradientCapture":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _on_input(self, name: str, x: torch.Tensor) -> None:
        if name in self.p_in_rows:
            self._inputs[name] = self.p_in_rows[name][x]  # (B, T, k_in)
            return
        if self.with_bias[name]:
            x = _with_ones(x)
        p = self.p_in[name]
        self._inputs[name] = (x @ p.T.to(x.dtype)).float()  # (B, T, k_in)

    def _on_output_grad(self, name: str, g: torch.Tensor) -> None:
        self._grads[name] = (g @ self.p_out[name].T.to(g.dtype)).float()  # (B, T, k_out)

    def capture(self, batch: dict, *, query: bool = False, sample_labels: bool = False) -> BatchCapture:
        """One forward + backward of the task's summed loss (query measurement if `query`)."""
        self._inputs, self._grads = {}, {}
        self._hooks.new_pass()
        with torch.enable_grad():
            loss = self.task.query_loss(self.model, batch) if query else self.task.loss(self.model, batch, sample_labels=sample_labels)
            loss.backward()
        inputs, grads = self._inputs, self._grads
        mask = _token_mask(self.task, batch, inputs)
        n_examples = mask.shape[0]
        shared = [n for n, u in inputs.items() if u.shape[0] != n_examples]
        if shared:
            raise ConfigError(
                f"layers {shared} see one input for the whole batch (e.g. position embeddings), so their "
                "per-example gradient cannot be separated; exclude them from the projection"
            )
        blocks = []
        for block in self.projection.layout.blocks:
            if block.name in grads:  # a layer the loss does not depend on has zero gradient
                g = torch.einsum("btk,btj->bkj", grads[block.name], inputs[block.name])  # (B, k_out, k_in)
                blocks.append(g.reshape(n_examples, -1))
            else:
                blocks.append(inputs[block.name].new_zeros(n_examples, block.size))
                grads[block.name] = inputs[block.name].new_zeros(*inputs[block.name].shape[:2], block.k_out)
        gradients = torch.cat(blocks, dim=1)  # (B, D)
        if not torch.isfinite(gradients).all():
            bad = [b.name for b in self.projection.layout.blocks if not torch.isfinite(b.view(gradients)).all()]
            raise NonFiniteError(
                f"projected gradients contain NaN/Inf in layers {bad} (loss={loss.item():.4g}); "
                "capture in fp32, or lower the learning rate / check the inputs of this batch"
            )
        return BatchCapture(gradients, inputs, grads, mask)


def input_output_covariances(
    model: nn.Module, task: Task, layers: dict[str, LayerSpec], batches, *, bias: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (E[x x^T] over counted tokens, E[g g^T] per example) at full width, float64.

    Feeds PCA initialisation. An embedding's input covariance is diagonal: its token counts.
    """
    sums_in, sums_out, tokens, examples = {}, {}, 0, 0
    current_mask = {}

    def on_input(name, x):
        mask = current_mask["mask"]
        spec = layers[name]
        if spec.kind == "embedding":
            counts = torch.bincount(x[mask[:, : x.shape[1]]].flatten(), minlength=spec.n_in).double()
            sums_in[name] = sums_in.get(name, 0) + torch.diag(counts.cpu())
            return
        x = _with_ones(x) if bias and spec.has_bias else x
        rows = x[mask].double()  # (tokens, n_in)
        sums_in[name] = sums_in.get(name, 0) + (rows.T @ rows).cpu()

    def on_output_grad(name, g):
        rows = g.reshape(-1, g.shape[-1]).double()  # (B*T, n_out)
        sums_out[name] = sums_out.get(name, 0) + (rows.T @ rows).cpu()

    with LayerHooks(model, layers, on_input, on_output_grad) as hooks:
        for batch in batches:
            hooks.new_pass()
            mask = task.token_mask(batch)
            if mask is None:
                mask = torch.ones(batch[next(iter(batch))].shape[:2], dtype=torch.bool)
            current_mask["mask"] = mask.bool()
            with torch.enable_grad():
                task.loss(model, batch).backward()
            tokens += int(mask.sum())
            examples += mask.shape[0]
    return {n: (sums_in[n] / tokens, sums_out.get(n, torch.zeros(s.n_out, s.n_out, dtype=torch.float64)) / examples) for n, s in layers.items()}
