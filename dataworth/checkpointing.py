"""Activation checkpointing of a model's repeated blocks: capture of long sequences in bounded memory.

While `checkpointed_blocks(model)` is open, each block (a module of the model's longest nn.ModuleList:
GPT-2's transformer.h, Llama's model.layers, ...) runs under non-reentrant `torch.utils.checkpoint`: the
forward keeps each block's input only, and backward recomputes the block just before differentiating it.
Capture memory then grows with layers x tokens x width (the block inputs) plus one block's activations,
instead of with every activation of every block. The projected gradients do not change: the recomputation
runs the same operations on the same inputs, and the capture hooks ignore it (`LayerHooks.backward`).
"""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.checkpoint import checkpoint

from dataworth.errors import ConfigError


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, modules) of the longest nn.ModuleList in `model` (the first of equal length); ConfigError if
    it has no non-empty one."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ConfigError(
            f"{type(model).__name__} has no nn.ModuleList of repeated blocks to checkpoint; capture it without "
            "activation checkpointing"
        )
    return max(lists, key=lambda item: len(item[1]))


@contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[str]:
    """While open, every module of `repeated_blocks(model)` runs under non-reentrant activation
    checkpointing, and a Hugging Face model's `config.use_cache` is off (a recomputed block would write its
    key/value cache twice); yields the ModuleList's name."""
    name, blocks = repeated_blocks(model)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    for block in blocks:
        block.forward = _checkpointed(block.forward)  # an instance attribute, shadowing the class's forward
    if use_cache is not None:
        config.use_cache = False
    try:
        yield name
    finally:
        for block in blocks:
            del block.forward
        if use_cache is not None:
            config.use_cache = use_cache


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
