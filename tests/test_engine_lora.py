"""LoRA adapters (PEFT) on a frozen base: only the adapter's lora_A / lora_B layers are tracked, and
their projected per-example gradients equal the explicit projection of brute-force (torch.func)
per-example gradients with respect to lora_A.weight and lora_B.weight.

DATAWORTH_TEST_DEVICE=cuda runs the models on a GPU (benchmarks/gpu_check.sh); CPU by default."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from transformers import GPT2Config, GPT2LMHeadModel

from dataworth import CausalLMTask, ConfigError, LoGra, ProjectionConfig
from dataworth.adapters import lora_include, lora_layers, lora_projection_config
from tests.test_engine_architectures import VOCAB, build
from tests.test_engine_capture import explicit_projection

peft = pytest.importorskip("peft")
DEVICE = torch.device(os.environ.get("DATAWORTH_TEST_DEVICE", "cpu"))


def base_model(arch: str):
    """The tiny seeded Llama of the architecture tests, or a tiny GPT-2 (tied embeddings, Conv1D layers)."""
    if arch == "llama":
        return build("llama")
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2))


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def adapted(arch: str, r: int = 4, **lora_kwargs):
    """A PEFT model whose lora_B is not zero (as after fine-tuning; PEFT initialises it to zero)."""
    config = peft.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=TARGETS[arch],
        lora_dropout=0.1,
        fan_in_fan_out=arch == "gpt2",
        **lora_kwargs,
    )
    model = peft.get_peft_model(base_model(arch), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.to(DEVICE).eval()  # eval: LoRA dropout off, as when valuing data


def sequences(seed: int = 4, lengths=(8, 5, 11, 3)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def brute_force(model, seqs, names) -> dict[str, torch.Tensor]:
    """layer -> (N, n_out, n_in): each example alone, gradient w.r.t. `layer.weight`."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, ids):
        logits = functional_call(model, p, (), {"input_ids": ids[None]}).logits[0, :-1]
        return F.cross_entropy(logits, ids[1:], reduction="sum")

    rows = [grad(loss)(params, torch.tensor(s, device=DEVICE)) for s in seqs]
    return {n: torch.stack([g[f"{n}.weight"] for g in rows]).cpu() for n in names}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_capture_equals_brute_force(arch):
    model = adapted(arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    config = lora_projection_config(model, rank_in=6, rank_out=6)
    logra = LoGra(model, CausalLMTask(pad_token_id=0), config, batch_size=3)
    layers = logra.projection.layers
    # exactly the adapter's factors: two per adapted module, none of the frozen base
    assert {f"{n}.weight" for n in layers} == trainable
    assert all(n.endswith((".lora_A.default", ".lora_B.default")) for n in layers)
    r = 4
    for name in layers:  # ranks are clipped to the adapter side's width r
        k_out, k_in = logra.projection.p_out[name].shape[0], logra.projection.p_in[name].shape[0]
        assert (k_in, k_out) == ((6, r) if name.endswith("lora_A.default") else (r, 6))
    captured = logra.capture(sequences())
    expected = explicit_projection(logra.projection, brute_force(model, sequences(), layers))
    assert expected.abs().max() > 1e-3  # non-trivial gradients on both factors
    torch.testing.assert_close(captured.double(), expected, rtol=1e-4, atol=1e-5)
    # the base stays frozen and the adapter trainable after capture
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_include_patterns_by_hand_match_the_helper():
    model = adapted("llama")
    helper = lora_projection_config(model, rank_in=4, rank_out=4)
    by_hand = ProjectionConfig(
        rank_in=4, rank_out=4, include=("*lora_A*", "*lora_B*"), ranks={"*lora_A*": (4, 4), "*lora_B*": (4, 4)}
    )
    assert lora_include() == ("*.lora_A.default", "*.lora_B.default")
    a = LoGra(model, CausalLMTask(pad_token_id=0), helper).capture(sequences())
    b = LoGra(model, CausalLMTask(pad_token_id=0), by_hand).capture(sequences())
    torch.testing.assert_close(a, b)


def test_saved_adapter_reloads_to_the_same_gradients(tmp_path):
    """Valuing a fine-tuned adapter loaded from disk onto its base gives the same rows."""
    model = adapted("llama")
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path / "adapter").to(DEVICE).eval()
    config = lora_projection_config(model, rank_in=4, rank_out=4)
    a = LoGra(model, CausalLMTask(pad_token_id=0), config).capture(sequences())
    b = LoGra(reloaded, CausalLMTask(pad_token_id=0), config).capture(sequences())
    torch.testing.assert_close(a, b)


def test_dora_is_refused_naming_the_module():
    model = adapted("llama", use_dora=True)
    with pytest.raises(
        ConfigError, match=r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj' uses a LoRA variant"
    ):
        lora_layers(model)


def test_merged_adapter_is_refused():
    model = adapted("llama")
    model.merge_adapter()
    with pytest.raises(ConfigError, match="merged into the base weight"):
        lora_projection_config(model)
    # a config made before merging fails at capture, naming the silent layers
    model.unmerge_adapter()
    logra = LoGra(model, CausalLMTask(pad_token_id=0), lora_projection_config(model, 2, 2))
    model.merge_adapter()
    with pytest.raises(ConfigError, match="lora_A.default.*did not run"):
        logra.capture(sequences())


def test_embedding_lora_and_missing_adapter_are_refused():
    model = adapted("llama")
    with pytest.raises(ConfigError, match="no LoRA layer of adapter 'other'"):
        lora_layers(model, adapter="other")
    embedded = peft.get_peft_model(base_model("llama"), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ConfigError, match=r"'base_model\.model\.model\.embed_tokens' adapts an embedding"):
        lora_layers(embedded)
