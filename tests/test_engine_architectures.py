"""Modern decoder architectures capture exactly: projected per-example gradients equal the explicit
projection of brute-force (torch.func) per-example weight gradients, for tiny random-init GPT-NeoX
(Pythia), Llama, Mistral and Qwen2 models (rotary embeddings, grouped-query attention, biases,
right padding). Tied input/output embeddings and weights used outside a module's forward are refused
with an error naming the module; a model loaded in bf16 matches fp32 within bf16 precision.

DATAWORTH_TEST_DEVICE=cuda runs the models on a GPU (benchmarks/gpu_check.sh); CPU by default."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dataworth import CausalLMTask, ConfigError, LoGra, ProjectionConfig, find_layers
from tests.test_engine_capture import explicit_projection

VOCAB = 64
DEVICE = torch.device(os.environ.get("DATAWORTH_TEST_DEVICE", "cpu"))
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)

ARCHITECTURES = {
    # Pythia: fused query_key_value with bias, partial rotary, parallel residual
    "gpt-neox": lambda **kw: GPTNeoXForCausalLM(
        GPTNeoXConfig(**COMMON | kw, rotary_pct=0.25, use_parallel_residual=True)
    ),
    # grouped-query attention (4 query heads, 2 key/value heads), RoPE, SwiGLU
    "llama": lambda **kw: LlamaForCausalLM(LlamaConfig(**COMMON | kw, num_key_value_heads=2)),
    # as Llama, with a sliding attention window shorter than the longest sequence
    "mistral": lambda **kw: MistralForCausalLM(MistralConfig(**COMMON | kw, num_key_value_heads=2, sliding_window=4)),
    # as Llama, with biases on q/k/v
    "qwen2": lambda **kw: Qwen2ForCausalLM(Qwen2Config(**COMMON | kw, num_key_value_heads=2)),
}


def build(arch: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[arch](**overrides).to(DEVICE).eval()


def sequences(seed: int = 5, lengths=(9, 4, 7, 12, 3)) -> list[list[int]]:
    """Token ids >= 1 (0 pads) of different lengths, so every batch is right-padded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def brute_force(model: nn.Module, seqs: list[list[int]], layers: dict, bias: bool) -> dict[str, torch.Tensor]:
    """Each example alone (no padding) through torch.func.grad: layer -> (N, n_out, n_in[+1]) in the
    engine's convention (an embedding's gradient transposed; the bias gradient as a last column)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, ids):
        logits = functional_call(model, p, (), {"input_ids": ids[None]}).logits[0, :-1]
        return F.cross_entropy(logits.float(), ids[1:], reduction="sum")

    out = {name: [] for name in layers}
    for seq in seqs:
        g = grad(loss)(params, torch.tensor(seq, device=DEVICE))
        for name, spec in layers.items():
            w = g[f"{name}.weight"]
            w = w.T if spec.kind == "embedding" else w
            if bias and spec.has_bias:
                w = torch.cat([w, g[f"{name}.bias"][:, None]], dim=1)
            out[name].append(w)
    return {k: torch.stack(v).cpu() for k, v in out.items()}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_capture_equals_brute_force(arch):
    """Every Linear of every block, the untied lm_head and the input embedding, biases included."""
    model = build(arch)
    seqs = sequences()
    config = ProjectionConfig(rank_in=4, rank_out=3, embeddings=True, bias=True, ranks={"lm_head": (5, 6)})
    logra = LoGra(model, CausalLMTask(pad_token_id=0), config, batch_size=3)  # batches of 3, then 2
    layers = logra.projection.layers
    assert {s.kind for s in layers.values()} == {"linear", "embedding"}
    assert "lm_head" in layers and sum(s.kind == "embedding" for s in layers.values()) == 1
    assert len([n for n in layers if ".layers.1." in n]) >= 4  # both blocks' projections are tracked
    if arch in ("gpt-neox", "qwen2"):
        assert any(s.has_bias for s in layers.values())  # the bias column is exercised
    captured = logra.capture(seqs)
    expected = explicit_projection(logra.projection, brute_force(model, seqs, layers, bias=True))
    assert captured.shape == (len(seqs), logra.projection.layout.dim)
    torch.testing.assert_close(captured.double(), expected, rtol=1e-4, atol=1e-5)


def test_padding_and_batching_do_not_change_the_gradients():
    """The same examples captured one by one and in padded batches give the same rows (Qwen2)."""
    model = build("qwen2")
    seqs = sequences(seed=9)
    config = ProjectionConfig(rank_in=4, rank_out=4)
    batched = LoGra(model, CausalLMTask(pad_token_id=0), config, batch_size=5).capture(seqs)
    alone = LoGra(model, CausalLMTask(pad_token_id=0), config, batch_size=1).capture(seqs)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
def test_tied_embeddings_are_refused_naming_the_module(arch):
    model = build(arch, tie_word_embeddings=True)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embedding.weight
    embedding_name = next(n for n, m in model.named_modules() if m is embedding)
    head_name = next(n for n, m in model.named_modules() if m is head)
    with pytest.raises(ConfigError, match=rf"layer '{head_name}' shares its weight with \['{embedding_name}'\]"):
        LoGra(model, CausalLMTask(pad_token_id=0), ProjectionConfig(rank_in=2, rank_out=2))
    # tracking the embedding instead is refused for the same reason
    with pytest.raises(ConfigError, match=rf"layer '{embedding_name}' shares its weight.*tied"):
        find_layers(model, exclude=(head_name,), embeddings=True)


def test_tied_model_without_its_head_captures_exactly():
    """Excluding the tied head (as the pipeline's default does) leaves every other layer exact."""
    model = build("llama", tie_word_embeddings=True)
    seqs = sequences(lengths=(6, 10, 5))
    logra = LoGra(
        model, CausalLMTask(pad_token_id=0), ProjectionConfig(rank_in=4, rank_out=3, exclude=("lm_head",)), batch_size=3
    )
    expected = explicit_projection(logra.projection, brute_force(model, seqs, logra.projection.layers, bias=False))
    torch.testing.assert_close(logra.capture(seqs).double(), expected, rtol=1e-4, atol=1e-5)


def test_tied_head_module_use_is_exactly_the_output_use_of_the_weight():
    """shared_weights="module_use" captures lm_head's own use of the tied weight: equal to the gradient of an
    untied copy's lm_head (the input embedding's use is not in it), as Kronfluence tracks it."""
    tied = build("llama", tie_word_embeddings=True)
    untied = build("llama", tie_word_embeddings=True)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    seqs = sequences(lengths=(6, 10, 5))
    config = ProjectionConfig(rank_in=4, rank_out=3, shared_weights="module_use")
    logra = LoGra(tied, CausalLMTask(pad_token_id=0), config, batch_size=3)
    assert "lm_head" in logra.projection.layers
    expected = explicit_projection(logra.projection, brute_force(untied, seqs, logra.projection.layers, bias=False))
    torch.testing.assert_close(logra.capture(seqs).double(), expected, rtol=1e-4, atol=1e-5)


class WeightOutsideForward(nn.Module):
    """A toy LM whose output layer is an nn.Linear whose weight is applied with F.linear, as a fused
    kernel would: the module's own forward never runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mix(self.embed(input_ids)))
        return type("Output", (), {"logits": F.linear(h, self.out.weight)})()


def test_weight_used_outside_its_module_is_refused_naming_the_module():
    logra = LoGra(
        WeightOutsideForward().to(DEVICE), CausalLMTask(pad_token_id=0), ProjectionConfig(rank_in=2, rank_out=2)
    )
    with pytest.raises(ConfigError, match=r"\['out'\] did not run their forward"):
        logra.capture(sequences(lengths=(5, 3)))
    # without it, the remaining layer is captured
    ok = LoGra(
        WeightOutsideForward().to(DEVICE),
        CausalLMTask(pad_token_id=0),
        ProjectionConfig(rank_in=2, rank_out=2, exclude=("out",)),
    )
    assert ok.capture(sequences(lengths=(5, 3))).shape == (2, 4)


def test_module_reused_twice_in_one_forward_is_refused():
    class Twice(WeightOutsideForward):
        def forward(self, input_ids, attention_mask=None):
            h = self.mix(torch.tanh(self.mix(self.embed(input_ids))))
            return type("Output", (), {"logits": self.out(h)})()

    logra = LoGra(Twice().to(DEVICE), CausalLMTask(pad_token_id=0), ProjectionConfig(rank_in=2, rank_out=2))
    with pytest.raises(ConfigError, match=r"layer 'mix' ran twice"):
        logra.capture(sequences(lengths=(4,)))


def test_llama_loaded_in_bf16_matches_fp32_within_bf16_precision(tmp_path):
    """A checkpoint saved in fp32 and loaded with dtype=bfloat16 captures through the same hooks;
    its projected gradients agree with the fp32 model's to bf16 precision (8 mantissa bits)."""
    reference_model = build("llama")
    reference_model.save_pretrained(tmp_path / "llama")
    low_model = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.bfloat16).to(DEVICE).eval()
    assert next(low_model.parameters()).dtype == torch.bfloat16
    seqs = sequences(seed=2, lengths=(10, 6, 12, 8))
    config = ProjectionConfig(rank_in=6, rank_out=5, exclude=("lm_head",))
    reference = LoGra(reference_model, CausalLMTask(pad_token_id=0), config, batch_size=4)
    fp32 = reference.capture(seqs)
    low = LoGra(low_model, CausalLMTask(pad_token_id=0), projection=reference.projection, batch_size=4)
    stats = low.new_statistics()
    bf16 = low.capture(seqs, statistics=stats)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    cosine = F.cosine_similarity(bf16, fp32, dim=1)
    assert cosine.min() > 0.98, cosine
    assert (bf16 - fp32).norm() / fp32.norm() < 0.1
    # the parameters keep their dtype and requires_grad flags
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in low_model.parameters())
