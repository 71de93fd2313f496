"""Forward/backward hooks on tracked layers that see inputs and output gradients, nothing else.

Parameters are frozen (requires_grad=False) while the hooks are installed, so backward computes
gradients with respect to activations only and never forms a weight gradient. The output gradient
is read by `_Tap`, an identity autograd node spliced in place onto the layer's output: later in-place
ops (`nn.ReLU(inplace=True)`, `h += ...`) stack on top of it, so it still sees dL/d(output) as the
layer produced it. An anchor leaf makes the output require grad when nothing upstream does (the
first tracked layer). On exit the hooks are removed and every parameter's requires_grad is restored.
A layer that runs again during `LayerHooks.backward` is an activation-checkpointing recomputation: its
input was seen in the forward, and its output gradient reaches the forward's tap.
"""

from collections.abc import Callable

import torch
from torch import nn

from dataworth.errors import ConfigError
from dataworth.layers import LayerSpec

InputFn = Callable[[str, torch.Tensor], None]  # (layer, x: (B, T, n_in) or ids (B, T))
OutputGradFn = Callable[[str, torch.Tensor], None]  # (layer, g: (B, T, n_out))


def _tokens_first(t: torch.Tensor, ids: bool) -> torch.Tensor:
    """Any (B, ..., n) -> (B, T, n), or token ids (B, ...) -> (B, T): every middle axis is a token axis."""
    return t.reshape(t.shape[0], -1) if ids else t.reshape(t.shape[0], -1, t.shape[-1])


class _Tap(torch.autograd.Function):
    """Identity on the layer output y, marked as modified in place: y keeps its storage and gets this
    node as its grad_fn, so every later use of y (in place or not) flows through `backward`."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, anchor: torch.Tensor, on_grad: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.on_grad = on_grad
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        ctx.on_grad(g)
        return g, None, None


class LayerHooks:
    """Context manager calling `on_input` in forward and `on_output_grad` in backward per layer."""

    def __init__(self, model: nn.Module, layers: dict[str, LayerSpec], on_input: InputFn, on_output_grad: OutputGradFn):
        self.model = model
        self.layers = layers
        self.on_input = on_input
        self.on_output_grad = on_output_grad
        self._handles = []
        self._requires_grad = {}
        self._calls = {}
        self._recomputing = False  # inside `backward`: a layer's forward now is a checkpoint's recomputation
        self.nodes = {}  # layer -> its _Tap node in this pass (the graph vertex its gradient passes)
        self._anchors = {}  # device -> scalar leaf that makes a _Tap output require grad; never gets one

    def __enter__(self) -> "LayerHooks":
        self._requires_grad = {p: p.requires_grad for p in self.model.parameters()}
        for p in self._requires_grad:
            p.requires_grad_(False)
        modules = dict(self.model.named_modules())
        for name, spec in self.layers.items():
            if name not in modules:
                raise ConfigError(f"layer {name!r} of the projection is not in {type(self.model).__name__}")
            self._handles.append(modules[name].register_forward_hook(self._forward_hook(name, spec)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.nodes.clear()  # frees this pass's graph even if its backward never ran
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)

    def new_pass(self) -> None:
        """Call before each forward: a layer may run only once per pass."""
        self._calls.clear()
        self.nodes.clear()

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), ignoring the layers that checkpointing (non-reentrant) runs again meanwhile."""
        self._recomputing = True
        try:
            loss.backward()
        finally:
            self._recomputing = False

    def in_graph(self, loss: torch.Tensor, names: list[str]) -> list[str]:
        """Those of `names` whose output is in the graph of `loss` (their gradient hook must have fired)."""
        wanted = {self.nodes[n]: n for n in names if n in self.nodes}
        found, seen, stack = [], set(), [loss.grad_fn]
        while stack and wanted:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in wanted:
                found.append(wanted.pop(node))
            stack.extend(next_node for next_node, _ in node.next_functions)
        return found

    def _forward_hook(self, name: str, spec: LayerSpec):
        def hook(module, args, output):
            if self._recomputing:
                return self._recomputed(name, output)
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._calls[name] > 1:
                raise ConfigError(f"layer {name!r} ran twice in one forward pass (weight sharing); exclude it")
            self.on_input(name, _tokens_first(args[0].detach(), ids=spec.kind == "embedding"))
            if not torch.is_grad_enabled():
                return
            device = output.device
            if device not in self._anchors:
                self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
            leaf = output.requires_grad and output.grad_fn is None  # e.g. Hugging Face's enable_input_require_grads
            output = output.clone() if leaf else output  # a leaf that requires grad cannot be tapped in place
            _Tap.apply(output, self._anchors[device], lambda g: self.on_output_grad(name, _tokens_first(g, ids=False)))
            self.nodes[name] = output.grad_fn
            return output if leaf else None

        return hook

    def _recomputed(self, name: str, output: torch.Tensor) -> None:
        """A tracked layer run again in backward. Non-reentrant checkpointing recomputes only to refill the
        tensors the forward's graph saved, and that graph (with this layer's tap) is what backward walks; a
        silent tap keeps the recomputed ops the same as the forward's, so they save the same tensors.
        Reentrant checkpointing ran the forward without grad (no tap) and differentiates the recomputation
        instead: refused, since its gradients would be read from a second graph."""
        if name not in self.nodes:
            raise ConfigError(
                f"layer {name!r} ran without autograd in the forward and again in backward: reentrant activation "
                "checkpointing (e.g. Hugging Face activation_checkpointing_enable with use_reentrant=True). Turn it "
                "off, or use non-reentrant checkpointing (dataworth.checkpointing.checkpointed_blocks)"
            )
        if torch.is_grad_enabled():
            _Tap.apply(output, self._anchors[output.device], lambda g: None)
