"""Passes over data with layer hooks: projected per-example gradients, and the covariances PCA needs.

Per layer and token t: u_t = P_in x_t (k_in), v_t = P_out g_t (k_out), and example b's projected
gradient is G_b = sum_t v_t u_t^T (k_out x k_in) = P_out dW_b P_in^T. The weight gradient dW_b is
never formed. Occurrences of an embedding's padding_idx get v_t = 0: PyTorch gives that row no gradient.
"""

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from dataworth.checkpointing import checkpointed_blocks
from dataworth.errors import ConfigError, NonFiniteError
from dataworth.hooks import LayerHooks
from dataworth.layers import LayerSpec, embedding_padding
from dataworth.projection import Projection
from dataworth.task import Task


@dataclass
class BatchCapture:
    """What one batch's capture yields."""

    gradients: torch.Tensor  # (B, D) float32 projected per-example gradients, layout order
    inputs: dict[str, torch.Tensor]  # layer -> (B, T_l, k_in) float32 projected inputs u
    output_grads: dict[str, torch.Tensor]  # layer -> (B, T_l, k_out) float32 projected output grads v
    masks: dict[str, torch.Tensor]  # layer -> (B, T_l) bool: its tokens counted in statistics (layer_masks)
    tokens: int  # tokens the task counts: its mask's sum, else B x the most positions any layer sees


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """(B, T, n) -> (B, T, n + 1): the bias gradient is the weight gradient of a constant input."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def layer_masks(
    task_mask: torch.Tensor | None, inputs: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """layer -> (B, T_l) bool: the tokens counted in that layer's activation statistics.

    task_mask: (B, T) or None (every token); inputs: layer -> (B, T_l, ...) or ids (B, T_l). A layer
    that sees the task's T positions uses the task's mask; a layer that sees another number (a pooled
    head, T_l = 1) counts all its positions. `keep` (layer -> (B, T_l) bool) drops the occurrences of
    an embedding's padding_idx, which carry no weight gradient.
    """
    masks = {}
    for name, x in inputs.items():
        shape = tuple(x.shape[:2])
        if task_mask is not None and tuple(task_mask.shape) == shape:
            mask = task_mask.bool().to(x.device)
        else:
            mask = torch.ones(shape, dtype=torch.bool, device=x.device)
        masks[name] = mask & keep[name] if name in keep else mask
    return masks


def _check_no_lost_gradient(hooks: LayerHooks, loss: torch.Tensor, silent: list[str]) -> None:
    """A layer without a gradient is zero only if its output is not in the loss's graph; else its
    gradient hook was bypassed, and a zero would be wrong."""
    lost = hooks.in_graph(loss, silent) if silent else []
    if lost:
        raise ConfigError(
            f"layers {lost} feed the loss but their output-gradient hook did not fire, so their gradient is "
            "unknown; exclude them from the projection"
        )


class GradientCapture:
    """Context manager: while open, `capture(batch)` returns projected per-example gradients; with
    `checkpoint_blocks`, the model's blocks run under activation checkpointing (`checkpointed_blocks`)."""

    def __init__(self, model: nn.Module, projection: Projection, task: Task, *, checkpoint_blocks: bool = False):
        self.model, self.projection, self.task = model, projection, task
        self.checkpoint_blocks = checkpoint_blocks
        device = next(model.parameters()).device
        self.p_in = {n: p.to(device) for n, p in projection.p_in.items()}  # (k_in, n_in[+1])
        self.p_in_rows = {  # embeddings: (V, k_in), u_t is row ids_t
            n: p.T.contiguous() for n, p in self.p_in.items() if projection.layers[n].kind == "embedding"
        }
        self.p_out = {n: p.to(device) for n, p in projection.p_out.items()}  # (k_out, n_out)
        self.with_bias = {
            n: p.shape[1] == s.n_in + 1 for (n, s), p in zip(projection.layers.items(), self.p_in.values())
        }
        self.padding = embedding_padding(model, projection.layers)  # layer -> padding_idx
        self._inputs, self._grads, self._keep = {}, {}, {}
        self._hooks = LayerHooks(model, projection.layers, self._on_input, self._on_output_grad)
        self._open = ExitStack()

    def __enter__(self) -> "GradientCapture":
        with ExitStack() as stack:
            if self.checkpoint_blocks:
                stack.enter_context(checkpointed_blocks(self.model))
            stack.enter_context(self._hooks)
            self._open = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._open.close()

    def _on_input(self, name: str, x: torch.Tensor) -> None:
        if name in self.p_in_rows:
            self._inputs[name] = self.p_in_rows[name][x]  # (B, T, k_in)
            if name in self.padding:
                self._keep[name] = x != self.padding[name]  # (B, T): tokens whose row gets a gradient
            return
        if self.with_bias[name]:
            x = _with_ones(x)
        p = self.p_in[name]
        self._inputs[name] = (x @ p.T.to(x.dtype)).float()  # (B, T, k_in)

    def _on_output_grad(self, name: str, g: torch.Tensor) -> None:
        v = (g @ self.p_out[name].T.to(g.dtype)).float()  # (B, T, k_out)
        self._grads[name] = v * self._keep[name][..., None] if name in self._keep else v

    def capture(self, batch: dict, *, query: bool = False, sample_labels: bool = False) -> BatchCapture:
        """One forward + backward of the task's summed loss (query measurement if `query`)."""
        self._inputs, self._grads, self._keep = {}, {}, {}
        self._hooks.new_pass()
        with torch.enable_grad():
            loss = (
                self.task.query_loss(self.model, batch)
                if query
                else self.task.loss(self.model, batch, sample_labels=sample_labels)
            )
            if loss.requires_grad:  # False when no tracked layer ran: the check below names them
                self._hooks.backward(loss)
        inputs, grads = self._inputs, self._grads
        silent = [b.name for b in self.projection.layout.blocks if b.name not in inputs]
        if silent:  # the module never ran: its weight, if used at all, is used outside its forward
            raise ConfigError(
                f"layers {silent} did not run their forward in this pass (unused, merged into another weight, or "
                "their weight is used outside the module's forward, e.g. by a fused kernel), so their gradient "
                "cannot be captured; exclude them from the projection"
            )
        task_mask = self.task.token_mask(batch)
        n_examples = task_mask.shape[0] if task_mask is not None else max(u.shape[0] for u in inputs.values())
        shared = [n for n, u in inputs.items() if u.shape[0] != n_examples]
        if shared:
            raise ConfigError(
                f"layers {shared} see one input for the whole batch (e.g. position embeddings), so their "
                "per-example gradient cannot be separated; exclude them from the projection"
            )
        _check_no_lost_gradient(self._hooks, loss, [n for n in inputs if n not in grads])
        masks = layer_masks(task_mask, inputs, self._keep)
        blocks = []
        for block in self.projection.layout.blocks:
            if block.name in grads:  # else its output is not in the loss's graph: its gradient is zero
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
        tokens = int(task_mask.sum()) if task_mask is not None else max(m.numel() for m in masks.values())
        return BatchCapture(gradients, inputs, grads, masks, tokens)


def input_output_covariances(
    model: nn.Module, task: Task, layers: dict[str, LayerSpec], batches, *, bias: bool, checkpoint_blocks: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (E[x x^T] over its counted tokens (layer_masks), E[g g^T] per example) at full
    width, float64. Feeds PCA initialisation; `checkpoint_blocks` as in `GradientCapture`. An embedding's
    input covariance is diagonal: its token counts; occurrences of its padding_idx count neither there nor
    in E[g g^T] (they get no gradient).
    """
    sums_in, sums_out, tokens, examples = {}, {}, {}, 0
    padding = embedding_padding(model, layers)
    state = {}  # this batch: the task's mask, the batch size, and layer -> (B, T_l) tokens with a gradient

    def on_input(name, x):
        spec = layers[name]
        if name in padding:
            state["keep"][name] = x != padding[name]
        mask = layer_masks(state["mask"], {name: x}, state["keep"])[name]
        state["examples"] = max(state["examples"], x.shape[0])
        tokens[name] = tokens.get(name, 0) + int(mask.sum())
        if spec.kind == "embedding":
            counts = torch.bincount(x[mask], minlength=spec.n_in).double()
            sums_in[name] = sums_in.get(name, 0) + torch.diag(counts.cpu())
            return
        x = _with_ones(x) if bias and spec.has_bias else x
        rows = x[mask].double()  # (tokens, n_in)
        sums_in[name] = sums_in.get(name, 0) + (rows.T @ rows).cpu()

    def on_output_grad(name, g):
        if name in state["keep"]:
            g = g * state["keep"][name][..., None]
        rows = g.reshape(-1, g.shape[-1]).double()  # (B*T, n_out)
        sums_out[name] = sums_out.get(name, 0) + (rows.T @ rows).cpu()
        state["grads"].add(name)

    checkpointing = checkpointed_blocks(model) if checkpoint_blocks else nullcontext()
    with checkpointing, LayerHooks(model, layers, on_input, on_output_grad) as hooks:
        for batch in batches:
            hooks.new_pass()
            mask = task.token_mask(batch)
            state.update(mask=None if mask is None else mask.bool(), keep={}, examples=0, grads=set())
            with torch.enable_grad():
                loss = task.loss(model, batch)
                if loss.requires_grad:  # False when no tracked layer ran: named below
                    hooks.backward(loss)
            _check_no_lost_gradient(hooks, loss, [n for n in hooks.nodes if n not in state["grads"]])
            examples += state["examples"]
    idle = [n for n in layers if n not in sums_in]
    if idle:
        raise ConfigError(f"layers {idle} did not run on the PCA examples; exclude them from the projection")
    for name, spec in layers.items():  # outside the loss's graph: zero output gradient
        sums_out.setdefault(name, torch.zeros(spec.n_out, spec.n_out, dtype=torch.float64))
    return {n: (sums_in[n] / max(tokens[n], 1), sums_out[n] / examples) for n in layers}
