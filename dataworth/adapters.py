"""Value data for a fine-tuned LoRA adapter: track only the adapter's lora_A / lora_B layers.

A PEFT LoRA layer computes base(x) + scaling * lora_B(lora_A(dropout(x))), where lora_A
(r x n_in) and lora_B (n_out x r) are plain nn.Linear modules, so their per-example gradients are
captured exactly by the engine's hooks while the frozen base is never tracked:

    from dataworth.adapters import lora_projection_config
    config = lora_projection_config(peft_model, rank_in=16, rank_out=16)   # ranks clipped to r
    train = LoGra(peft_model, task, config).capture(examples)

or, by hand, ProjectionConfig(include=("*.lora_A.default", "*.lora_B.default"), ranks=...) with
ranks no larger than the adapter rank r on the adapter side (`lora_include` gives the patterns).

PEFT is never imported: LoRA layers are recognised by their `lora_A`/`lora_B` ModuleDicts. What the
engine cannot capture exactly is refused with a ConfigError naming the module: LoRA on embeddings
(its factors are bare parameters, not modules), convolution LoRA, weight-decomposed variants (DoRA
and other `lora_variant`s use the factors' weights outside their forward) and merged adapters.
"""

from torch import nn

from dataworth.config import ProjectionConfig
from dataworth.errors import ConfigError
from dataworth.layers import LayerSpec, find_layers


def lora_include(adapter: str = "default") -> tuple[str, str]:
    """Glob patterns of one adapter's lora_A and lora_B modules, for ProjectionConfig(include=...)."""
    return (f"*.lora_A.{adapter}", f"*.lora_B.{adapter}")


def _lora_modules(model: nn.Module):
    """(name, module) of every PEFT LoRA layer: a module holding lora_A / lora_B ModuleDicts."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and isinstance(
            getattr(module, "lora_B", None), nn.ModuleDict
        ):
            yield name, module


def lora_layers(model: nn.Module, adapter: str = "default") -> dict[str, LayerSpec]:
    """The lora_A and lora_B layers of `adapter`, in module order; ConfigError naming the module for
    any LoRA layer of that adapter the engine cannot capture exactly, or when there is none."""
    for name, module in model.named_modules():
        for kind in ("lora_embedding_A", "lora_embedding_B"):
            if adapter in getattr(module, kind, {}):
                raise ConfigError(
                    f"LoRA layer {name!r} adapts an embedding: its factors {kind} are bare parameters used "
                    "outside any module's forward, so their gradient cannot be captured; leave embeddings out "
                    "of the adapter's target_modules"
                )
    found_any = False
    for name, module in _lora_modules(model):
        if adapter not in module.lora_A:
            continue
        found_any = True
        for side in ("lora_A", "lora_B"):
            factor = getattr(module, side)[adapter]
            if type(factor) is not nn.Linear:
                raise ConfigError(
                    f"LoRA layer {name!r}: {side} is a {type(factor).__name__}, not an nn.Linear; only LoRA on "
                    "linear layers is captured"
                )
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
            raise ConfigError(
                f"LoRA layer {name!r} uses a LoRA variant (e.g. DoRA), whose forward uses lora_B.weight @ "
                "lora_A.weight outside the factors' own forward; its gradient cannot be captured exactly"
            )
        if getattr(module, "merged", False):
            raise ConfigError(
                f"LoRA layer {name!r} has its adapter merged into the base weight, so the factors never run; "
                "unmerge it (model.unmerge_adapter()) before valuing data"
            )
    if not found_any:
        raise ConfigError(f"{type(model).__name__} has no LoRA layer of adapter {adapter!r}")
    return find_layers(model, include=lora_include(adapter))


def lora_projection_config(
    model: nn.Module, rank_in: int = 16, rank_out: int = 16, *, adapter: str = "default", **kwargs
) -> ProjectionConfig:
    """A ProjectionConfig tracking exactly `adapter`'s lora_A / lora_B layers, each projected to at
    most (rank_in, rank_out), clipped to the layer's widths (the adapter side is only r wide).
    Further ProjectionConfig fields (seed, init...) pass through `kwargs`."""
    layers = lora_layers(model, adapter)
    ranks = {name: (min(rank_in, spec.n_in), min(rank_out, spec.n_out)) for name, spec in layers.items()}
    return ProjectionConfig(rank_in=rank_in, rank_out=rank_out, ranks=ranks, include=lora_include(adapter), **kwargs)
