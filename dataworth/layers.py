"""Discovery of the layers whose gradients LoGra logs: nn.Linear, HF Conv1D and nn.Embedding."""

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from dataworth.errors import ConfigError


@dataclass(frozen=True)
class LayerSpec:
    """One tracked layer. Its gradient is treated as an (n_out x n_in) matrix.

    kind: "linear" (y = x W^T + b), "conv1d" (HF GPT-2, y = x W + b, W stored n_in x n_out)
    or "embedding" (y = W[ids], so n_in is the vocabulary size and n_out the embedding width).
    """

    name: str
    kind: str
    n_in: int
    n_out: int
    has_bias: bool


def _is_conv1d(module: nn.Module) -> bool:
    """HF `transformers.pytorch_utils.Conv1D`, detected without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def layer_spec(name: str, module: nn.Module) -> LayerSpec | None:
    """The LayerSpec of a supported module, or None for any other module."""
    if isinstance(module, nn.Linear):
        return LayerSpec(name, "linear", module.in_features, module.out_features, module.bias is not None)
    if _is_conv1d(module):
        n_in, n_out = module.weight.shape
        return LayerSpec(name, "conv1d", n_in, n_out, module.bias is not None)
    if isinstance(module, nn.Embedding):
        return LayerSpec(name, "embedding", module.num_embeddings, module.embedding_dim, False)
    return None


def embedding_padding(model: nn.Module, layers: dict[str, LayerSpec]) -> dict[str, int]:
    """layer -> padding_idx of each tracked nn.Embedding that has one. PyTorch gives that row no
    gradient, so its occurrences carry none, even where the id is also real text (pad = eos)."""
    modules = dict(model.named_modules())
    padding = {n: getattr(modules.get(n), "padding_idx", None) for n, s in layers.items() if s.kind == "embedding"}
    return {n: p for n, p in padding.items() if p is not None}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def tied_layers(model: nn.Module) -> dict[str, list[str]]:
    """Name of each module with a weight -> the other modules holding that same weight (tied weights, e.g.
    lm_head and the input embedding); modules whose weight is their own are left out."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    tied = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        holders = owners.get(id(weight), []) if isinstance(weight, nn.Parameter) else []
        if len(holders) > 1:
            tied[name] = [o for o in holders if o != name]
    return tied


def find_layers(
    model: nn.Module,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = (),
    embeddings: bool = False,
    shared_weights: str = "refuse",
) -> dict[str, LayerSpec]:
    """Supported layers of `model` in module order, filtered by glob patterns on their names.

    Embeddings are tracked only when `embeddings=True` (their input width is the vocabulary). A layer whose
    weight another module also holds is refused unless `shared_weights="module_use"` (its own use is captured).
    """
    found = {}
    for name, module in model.named_modules():
        spec = layer_spec(name, module)
        if spec is None or (spec.kind == "embedding" and not embeddings):
            continue
        if _matches(name, include) and not _matches(name, exclude):
            found[name] = spec
    tied = tied_layers(model) if shared_weights == "refuse" else {}
    for name in found:
        if others := tied.get(name):  # e.g. lm_head tied to the input embedding: the gradient sums both uses
            raise ConfigError(
                f"layer {name!r} shares its weight with {others} (tied weights, e.g. tied input/output "
                "embeddings): its gradient is the sum over every use of that weight, and the engine captures "
                f"one module's use only, so it would be inexact; exclude it (exclude=({name!r},)), untie the weights, "
                "or capture this module's use only (shared_weights='module_use')"
            )
    if not found:
        raise ConfigError(
            f"no supported layer (nn.Linear, Conv1D{', nn.Embedding' if embeddings else ''}) of "
            f"{type(model).__name__} matches include={list(include)} exclude={list(exclude)}; "
            "widen the module filter"
        )
    return found


def batch_shared_layers(model: nn.Module, names: list[str]) -> list[str]:
    """Those of `names` whose input has one row for the whole batch (GPT-2's position embedding: ids (1, T)
    broadcast over the batch), so their per-example gradient cannot be separated. Found by hooking them
    through one forward of a causal LM on a (2, 3) batch of token id 0."""
    if not names:
        return []
    modules = dict(model.named_modules())
    rows: dict[str, int] = {}

    def record(name: str):
        def hook(_module, args, _output) -> None:
            rows.setdefault(name, args[0].shape[0])

        return hook

    hooks = [modules[n].register_forward_hook(record(n)) for n in names]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(2, 3, dtype=torch.long, device=device))
    except Exception as error:
        raise ConfigError(
            f"a probe forward of {type(model).__name__} on input_ids (2, 3), run to find which of the embeddings "
            f"{names} see one input for the whole batch, failed ({type(error).__name__}: {error}); leave "
            "embeddings out (embeddings = false)"
        ) from error
    finally:
        for hook in hooks:
            hook.remove()
    return [n for n in names if rows.get(n, 2) != 2]
