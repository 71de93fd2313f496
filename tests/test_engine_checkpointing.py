"""Capture under activation checkpointing (dataworth.checkpointing): the projected gradients are the brute
force ones, the blocks really are recomputed, the model is left as it was, and reentrant checkpointing
(which would hand the hooks a second graph) is refused."""

import pytest
import torch
from torch import nn

from dataworth import CausalLMTask, ConfigError, LoGra, ProjectionConfig, checkpointed_blocks
from dataworth.capture import input_output_covariances
from tests.engine_models import TokenMLP
from tests.test_engine_architectures import brute_force, build, sequences
from tests.test_engine_capture import explicit_projection

CONFIG = ProjectionConfig(rank_in=4, rank_out=3, embeddings=True, bias=True)


@pytest.mark.parametrize("arch", ["gpt-neox", "llama"])
def test_checkpointed_capture_equals_brute_force(arch):
    model = build(arch)
    seqs = sequences()
    logra = LoGra(model, CausalLMTask(pad_token_id=0), CONFIG, batch_size=3, checkpoint_blocks=True)
    captured = logra.capture(seqs)
    expected = explicit_projection(logra.projection, brute_force(model, seqs, logra.projection.layers, bias=True))
    torch.testing.assert_close(captured.double(), expected, rtol=1e-4, atol=1e-5)


def test_blocks_are_recomputed_in_backward_and_restored_after():
    model = build("llama")
    assert model.config.use_cache
    calls = []
    probe = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    task = CausalLMTask(pad_token_id=0)
    plain = LoGra(model, task, CONFIG, batch_size=5).capture(sequences())
    plain_calls = len(calls)
    calls.clear()
    logra = LoGra(model, task, CONFIG, batch_size=5, checkpoint_blocks=True)
    checkpointed = logra.capture(sequences())
    probe.remove()
    assert plain_calls == 1 and len(calls) == 2  # one batch: the forward, then its recomputation in backward
    # (recomputation stops early once the saved tensors backward needs are back: probe an early layer)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)  # same seed, same ops: bit for bit
    assert all("forward" not in block.__dict__ for block in model.model.layers)
    assert model.config.use_cache


def test_pca_covariances_are_unchanged_by_checkpointing():
    model = build("gpt-neox")
    task = CausalLMTask(pad_token_id=0)
    logra = LoGra(model, task, CONFIG, batch_size=3)
    batches = list(logra._batches(sequences()))
    layers = logra.projection.layers
    plain = input_output_covariances(model, task, layers, batches, bias=True)
    checkpointed = input_output_covariances(model, task, layers, batches, bias=True, checkpoint_blocks=True)
    assert plain.keys() == checkpointed.keys()
    for name, (inputs, outputs) in plain.items():
        torch.testing.assert_close(checkpointed[name][0], inputs)
        torch.testing.assert_close(checkpointed[name][1], outputs)


def test_hugging_face_checkpointing_non_reentrant_is_exact_and_reentrant_is_refused_naming_the_layer():
    model = build("llama")
    logra = LoGra(model, CausalLMTask(pad_token_id=0), CONFIG, batch_size=5)
    plain = logra.capture(sequences())
    model.train()  # Hugging Face checkpoints in training mode only; this Llama has no dropout
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.testing.assert_close(logra.capture(sequences()), plain, rtol=0, atol=0)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ConfigError, match=r"model\.layers\.\d+\.\S+ ran without autograd.*reentrant"):
        logra.capture(sequences())


def test_model_without_repeated_blocks_is_refused():
    with pytest.raises(ConfigError, match="TokenMLP has no nn.ModuleList"), checkpointed_blocks(TokenMLP()):
        pass
    with pytest.raises(ConfigError, match="no nn.ModuleList"), checkpointed_blocks(nn.Linear(2, 2)):
        pass


def test_embedding_output_made_a_leaf_by_hugging_face_is_captured():
    """enable_input_require_grads (called by activation_checkpointing_enable for adapters) turns the input
    embedding's output into a leaf that requires grad: it is tapped through a copy, with the same result."""
    model = build("llama")
    logra = LoGra(model, CausalLMTask(pad_token_id=0), CONFIG, batch_size=5)
    plain = logra.capture(sequences())
    model.enable_input_require_grads()
    torch.testing.assert_close(logra.capture(sequences()), plain, rtol=0, atol=0)
