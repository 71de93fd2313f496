"""Captured projected gradients equal brute force: torch.func per-example gradients times explicit
P_out (x) P_in matrices, on an MLP with masked tokens and on a GPT-2 with padding."""

import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dataworth import CausalLMTask, ConfigError, LoGra, NonFiniteError, Projection, ProjectionConfig, find_layers
from tests.engine_models import (
    RegressionTask,
    TokenMLP,
    hf_per_example_grads,
    per_example_weight_grads,
    regression_examples,
)


def explicit_projection(projection: Projection, brute: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, D): vec(P_out dW P_in^T) per layer, via the explicit Kronecker matrix P_out (x) P_in."""
    blocks = []
    for name, dw in brute.items():
        kron = torch.kron(projection.p_out[name].double(), projection.p_in[name].double())  # (k_out k_in, n_out n_in)
        blocks.append(dw.reshape(dw.shape[0], -1).double() @ kron.T)
    return torch.cat(blocks, dim=1)


@pytest.mark.parametrize("bias", [False, True])
def test_mlp_capture_equals_brute_force(bias):
    model, task, examples = TokenMLP(), RegressionTask(), regression_examples()
    logra = LoGra(model, task, ProjectionConfig(rank_in=3, rank_out=2, ranks={"fc2": (4, 3)}, bias=bias), batch_size=5)
    captured = logra.capture(examples)
    brute = per_example_weight_grads(model, task, examples, ["fc1", "fc2"])
    if not bias:
        brute = {k: v[..., :-1] for k, v in brute.items()}
    expected = explicit_projection(logra.projection, brute)
    assert captured.shape == (12, 3 * 2 + 4 * 3)
    torch.testing.assert_close(captured.double(), expected, rtol=1e-5, atol=1e-6)


def test_capture_leaves_model_as_it_was():
    model, task = TokenMLP(), RegressionTask()
    model.fc1.weight.requires_grad_(False)  # a mixed state must be restored, not reset
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    LoGra(model, task, ProjectionConfig(rank_in=2, rank_out=2)).capture(regression_examples(4))
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def tiny_gpt2(vocab: int = 40) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=False)
    return GPT2LMHeadModel(config).eval()


def test_gpt2_capture_with_padding_equals_brute_force():
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(3)
    sequences = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (9, 5, 12, 3, 7)]
    config = ProjectionConfig(rank_in=6, rank_out=5, embeddings=True, exclude=("*wpe", "lm_head"))
    logra = LoGra(model, CausalLMTask(pad_token_id=0), config, batch_size=3)
    kinds = {n: s.kind for n, s in logra.projection.layers.items()}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d" and kinds["transformer.wte"] == "embedding"
    captured = logra.capture(sequences)  # batches of 3 padded to different lengths
    expected = explicit_projection(logra.projection, hf_per_example_grads(model, sequences, kinds))
    torch.testing.assert_close(captured.double(), expected, rtol=1e-4, atol=1e-5)


def test_prompt_tokens_are_not_targets():
    """A query (ids, n_prompt) equals the brute-force gradient of the completion tokens' loss only."""
    model = tiny_gpt2()
    ids, n_prompt = list(range(1, 11)), 6
    logra = LoGra(model, CausalLMTask(pad_token_id=0), ProjectionConfig(init="identity", include=("*mlp.c_fc",)))
    captured = logra.capture([(ids, n_prompt)], query=True)
    full = logra.capture([ids])
    assert not torch.allclose(captured, full)  # prompt targets were excluded
    # Brute force: loss over completion targets only.
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        logits = torch.func.functional_call(model, p, (), {"input_ids": torch.tensor([ids])}).logits[
            0, n_prompt - 1 : -1
        ]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[n_prompt:]), reduction="sum")

    grads = torch.func.grad(loss)(params)
    expected = torch.cat([grads[f"transformer.h.{i}.mlp.c_fc.weight"].T.reshape(1, -1) for i in range(2)], dim=1)
    torch.testing.assert_close(captured, expected, rtol=1e-4, atol=1e-6)


def test_shared_position_embedding_is_refused_with_a_clear_error():
    logra = LoGra(
        tiny_gpt2(),
        CausalLMTask(pad_token_id=0),
        ProjectionConfig(rank_in=2, rank_out=2, embeddings=True, include=("*wpe",)),
    )
    with pytest.raises(ConfigError, match="wpe"):
        logra.capture([[1, 2, 3], [4, 5, 6]])


def test_rank_larger_than_width_is_refused():
    with pytest.raises(ConfigError, match=r"rank_in=9 exceeds the width 4 of layer 'fc1'"):
        LoGra(TokenMLP(), RegressionTask(), ProjectionConfig(rank_in=9, rank_out=2))


def test_non_finite_gradients_are_refused():
    model, task = TokenMLP(), RegressionTask()
    x, y, m = regression_examples(1)[0]
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        LoGra(model, task, ProjectionConfig(rank_in=2, rank_out=2)).capture([(x, y * float("inf"), m)])


def test_pca_projection_is_top_covariance_eigenvectors():
    model, task, examples = TokenMLP(), RegressionTask(), regression_examples(30)
    logra = LoGra(model, task, ProjectionConfig(init="pca", rank_in=2, rank_out=2), pca_examples=examples)
    batch = task.collate(examples)
    mask = batch["mask"].bool()
    x = batch["x"][mask]  # (tokens, 4): fc1's inputs
    _, vectors = torch.linalg.eigh((x.T @ x).double() / len(x))
    top = vectors[:, -2:].flip(1).T.float()
    # eigenvectors are defined up to sign
    torch.testing.assert_close(logra.projection.p_in["fc1"].abs(), top.abs(), rtol=1e-4, atol=1e-5)
    p = logra.projection.p_out["fc2"]
    torch.testing.assert_close(p @ p.T, torch.eye(2), rtol=1e-5, atol=1e-5)


SEED_SCRIPT = """
import sys; sys.path.insert(0, {root!r})
from dataworth import Projection, ProjectionConfig, find_layers
from tests.engine_models import TokenMLP
model = TokenMLP()
print(Projection.create(ProjectionConfig(rank_in=3, rank_out=2, seed=7), find_layers(model)).content_hash())
"""


def test_same_seed_gives_bit_identical_projections_across_processes(tmp_path):
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    hashes = {
        subprocess.run(
            [sys.executable, "-c", SEED_SCRIPT.format(root=root)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    here = Projection.create(ProjectionConfig(rank_in=3, rank_out=2, seed=7), find_layers(TokenMLP()))
    assert hashes == {here.content_hash()}
    other = Projection.create(ProjectionConfig(rank_in=3, rank_out=2, seed=8), find_layers(TokenMLP()))
    assert other.content_hash() != here.content_hash()
    # save/load keeps every bit and the hash
    digest = here.save(tmp_path / "proj")
    loaded = Projection.load(tmp_path / "proj")
    assert digest == loaded.content_hash() == here.content_hash()


def test_llama_capture_equals_brute_force():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(5)
    sequences = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (8, 4, 11)]
    logra = LoGra(
        model, CausalLMTask(pad_token_id=0), ProjectionConfig(rank_in=5, rank_out=4, exclude=("lm_head",)), batch_size=3
    )
    kinds = {n: s.kind for n, s in logra.projection.layers.items()}
    assert set(kinds) == {
        f"model.layers.0.{m}"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    captured = logra.capture(sequences)
    expected = explicit_projection(logra.projection, hf_per_example_grads(model, sequences, kinds))
    torch.testing.assert_close(captured.double(), expected, rtol=1e-4, atol=1e-5)


def test_bf16_capture_matches_fp32_within_bf16_precision():
    """A bf16 model captures through the same hooks; statistics accumulate in fp32 or fp64."""
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(2)
    sequences = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (10, 6, 12)]
    config = ProjectionConfig(rank_in=6, rank_out=5, exclude=("lm_head",))
    reference = LoGra(model, CausalLMTask(pad_token_id=0), config, batch_size=3)
    fp32 = reference.capture(sequences)
    low = LoGra(
        tiny_gpt2().to(torch.bfloat16), CausalLMTask(pad_token_id=0), projection=reference.projection, batch_size=3
    )
    for dtype in (torch.float32, torch.float64):
        stats = low.new_statistics(dtype=dtype)
        bf16 = low.capture(sequences, statistics=stats)
        assert bf16.dtype == torch.float32 and stats.sums["transformer.h.0.mlp.c_fc"]["activation"].dtype == dtype
        cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1)
        assert cosine.min() > 0.98, cosine
        assert ((bf16 - fp32).norm() / fp32.norm()) < 0.1
