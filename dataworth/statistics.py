"""Curvature statistics in the projected space: sums plus counts, so shards merge exactly.

Per layer, over the data seen:
    activation    = sum over the layer's counted tokens of u u^T   (k_in x k_in)
    output_grad   = sum over tokens of v v^T                       (k_out x k_out)
    second_moment = sum over examples of vec(G) vec(G)^T           (k_out k_in square, optional)
with `layer_tokens[layer]` counted tokens (capture.layer_masks: a pooled head counts its own positions)
and `examples` examples; `tokens` counts the task's tokens. KFAC normalises the activation sum by the
layer's tokens and the output-gradient sum by examples, so S (x) A has the scale of E[vec(G) vec(G)^T].
"""

import torch

from dataworth.capture import BatchCapture
from dataworth.errors import MismatchError, NonFiniteError
from dataworth.projection import GradientLayout

NAMES = ("activation", "output_grad", "second_moment")


class CurvatureStatistics:
    """Accumulates per-layer sums in `dtype` (float64 by default, float32 to save memory)."""

    def __init__(self, layout: GradientLayout, *, second_moment: bool = True, dtype: torch.dtype = torch.float64):
        self.layout = layout
        self.dtype = dtype
        self.tokens = 0
        self.examples = 0
        self.layer_tokens = {b.name: 0 for b in layout.blocks}  # tokens counted in each activation sum
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        for b in layout.blocks:
            self.sums[b.name] = {
                "activation": torch.zeros(b.k_in, b.k_in, dtype=dtype),
                "output_grad": torch.zeros(b.k_out, b.k_out, dtype=dtype),
            }
            if second_moment:
                self.sums[b.name]["second_moment"] = torch.zeros(b.size, b.size, dtype=dtype)

    @property
    def has_second_moment(self) -> bool:
        return all("second_moment" in s for s in self.sums.values())

    def activation_tokens(self, name: str) -> int:
        """Tokens in layer `name`'s activation sum (at least 1, to divide by)."""
        return max(self.layer_tokens[name], 1)

    def update(self, capture: BatchCapture) -> None:
        """Add one batch's projected inputs, output gradients and per-example gradients."""
        for block in self.layout.blocks:
            sums = self.sums[block.name]
            mask = capture.masks[block.name]  # (B, T_l)
            u = capture.inputs[block.name][mask].to(self.dtype)  # (tokens, k_in)
            v = capture.output_grads[block.name].reshape(-1, block.k_out).to(self.dtype)  # (B*T, k_out)
            sums["activation"] += (u.T @ u).cpu()
            sums["output_grad"] += (v.T @ v).cpu()
            if "second_moment" in sums:
                g = block.view(capture.gradients).reshape(-1, block.size).to(self.dtype)  # (B, k_out k_in)
                sums["second_moment"] += (g.T @ g).cpu()
            self.layer_tokens[block.name] += int(mask.sum())
        self.tokens += capture.tokens
        self.examples += capture.gradients.shape[0]

    def merge(self, other: "CurvatureStatistics") -> "CurvatureStatistics":
        """Add another shard's statistics into this one (exact: sums and counts add)."""
        if [b.name for b in other.layout.blocks] != [b.name for b in self.layout.blocks]:
            raise MismatchError("cannot merge statistics of different layers or projections")
        for name, sums in self.sums.items():
            for key in sums:
                if key not in other.sums[name]:
                    raise MismatchError(f"statistics to merge lack {key!r} for layer {name!r}")
                sums[key] += other.sums[name][key].to(self.dtype)
        self.tokens += other.tokens
        self.examples += other.examples
        for name, count in other.layer_tokens.items():
            self.layer_tokens[name] += count
        return self

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map ('layer|activation', ..., '__counts__', '__layer_tokens__' in layout
        order), e.g. for safetensors."""
        flat = {f"{n}|{k}": t for n, sums in self.sums.items() for k, t in sums.items()}
        flat["__counts__"] = torch.tensor([self.tokens, self.examples], dtype=torch.int64)
        counts = [self.layer_tokens[b.name] for b in self.layout.blocks]
        flat["__layer_tokens__"] = torch.tensor(counts, dtype=torch.int64)
        return flat

    @classmethod
    def from_tensors(cls, layout: GradientLayout, flat: dict[str, torch.Tensor]) -> "CurvatureStatistics":
        """Inverse of `to_tensors`; refuses NaN/Inf (an overflowed shard must be recomputed). Maps
        saved before per-layer token counts give every layer the task's count."""
        second = all(f"{b.name}|second_moment" in flat for b in layout.blocks)
        dtype = flat[f"{layout.blocks[0].name}|activation"].dtype
        stats = cls(layout, second_moment=second, dtype=dtype)
        for name, sums in stats.sums.items():
            for key in sums:
                tensor = flat[f"{name}|{key}"]
                if not torch.isfinite(tensor).all():
                    raise NonFiniteError(f"statistic {key!r} of layer {name!r} contains NaN/Inf; recompute its shard")
                sums[key] = tensor.clone()
        stats.tokens, stats.examples = (int(c) for c in flat["__counts__"])
        counts = flat.get("__layer_tokens__", torch.full((len(layout.blocks),), stats.tokens)).tolist()
        stats.layer_tokens = {b.name: int(c) for b, c in zip(layout.blocks, counts, strict=True)}
        return stats
