"""The projection the pipeline makes for a model, and the curvature it fits from stored gradients.

The default `[projection]` tracks lm_head with its vocabulary side at rank 1024 (benchmarks/RESULTS.md),
a tied lm_head through its own (output) use, or left out with shared_weights = "refuse"; a rank wider than
its layer is cut to the width, and the EK-FAC eigenvalues of the empirical Fisher come from one pass over the stored
gradients instead of per-shard (D_l x D_l) second moments.
"""

from dataclasses import replace

import polars as pl
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dataworth import CausalLMTask, ConfigError, Curvature, LoGra, ProjectionConfig, batch_shared_layers
from domain.artifacts import load_model, load_projection
from domain.gradients import capture_shard, examples_of, pipeline_projection_config
from domain.settings import Settings
from resources.codecs import binary_to_gradients, frame_gradients, frame_to_tensors
from tests.pipeline_harness import TINY_SETTINGS, make_tiny_setup
from tests.test_engine_architectures import VOCAB, build

LLAMA_LINEARS = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]


def blocks(config: ProjectionConfig, model) -> dict[str, tuple[int, int]]:
    projection = LoGra(model, CausalLMTask(pad_token_id=0), config).projection
    return {b.name: (b.k_in, b.k_out) for b in projection.layout.blocks}


def test_a_tied_head_is_tracked_through_its_output_use_or_left_out_and_ranks_are_cut_to_the_widths():
    default = Settings().projection
    assert default.ranks == {"lm_head": (16, 1024)} and default.exclude == () and default.shared_weights == "module_use"

    tied = build("llama", tie_word_embeddings=True)
    config = pipeline_projection_config(default, tied, adapter=False)
    assert config.exclude == () and blocks(config, tied)["lm_head"] == (16, VOCAB)  # its output use, cut to 64
    exact = replace(default, shared_weights="refuse")
    with pytest.raises(ConfigError, match="shares its weight"):  # the engine alone refuses it
        LoGra(tied, CausalLMTask(pad_token_id=0), exact)
    config = pipeline_projection_config(exact, tied, adapter=False)
    assert config.exclude == ("model.embed_tokens", "lm_head")  # both hold the tied weight
    assert set(blocks(config, tied)) == {f"model.layers.{i}.{m}" for i in range(2) for m in LLAMA_LINEARS}

    untied = build("llama")  # hidden 16, MLP 24, vocabulary 64: every rank of 32 or 1024 is cut
    config = pipeline_projection_config(default, untied, adapter=False)
    assert config.exclude == ()
    got = blocks(config, untied)
    assert got["lm_head"] == (16, VOCAB)
    assert got["model.embed_tokens"] == (VOCAB, 16)  # 1024 (vocabulary) x 16 asked, 64 x 16 wide
    assert got["model.layers.0.self_attn.q_proj"] == (16, 16)  # 32 x 32 asked, 16 x 16 wide
    assert got["model.layers.0.self_attn.k_proj"] == (16, 8)  # 2 key/value heads of 4 dimensions
    assert got["model.layers.0.mlp.down_proj"] == (24, 16)
    # what fits is left as asked
    narrow = ProjectionConfig(rank_in=4, rank_out=4, ranks={"lm_head": (2, 8)})
    assert pipeline_projection_config(narrow, untied, adapter=False) == narrow


def test_the_token_embedding_is_tracked_and_a_position_embedding_shared_by_the_batch_is_left_out():
    shape = dict(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**shape))  # tied
    assert batch_shared_layers(gpt2, ["transformer.wte", "transformer.wpe"]) == ["transformer.wpe"]
    task = CausalLMTask(pad_token_id=0)
    examples = [[5, 6, 7, 8], [9, 10, 11]]
    everything = ProjectionConfig(rank_in=4, rank_out=4, embeddings=True, include=("transformer.wpe",))
    with pytest.raises(ConfigError, match="one input for the whole batch"):  # the engine alone refuses wpe
        LoGra(gpt2, task, everything).capture(examples)
    config = pipeline_projection_config(Settings().projection, gpt2, adapter=False)
    assert config.exclude == ("transformer.wpe",)
    got = blocks(config, gpt2)
    assert got["transformer.wte"] == (VOCAB, 16) and got["lm_head"] == (16, VOCAB)  # the tied weight's two uses
    assert "transformer.wpe" not in got and len(got) == 2 + 4  # c_attn, c_proj, c_fc, mlp.c_proj
    gradients = LoGra(gpt2, task, config).capture(examples)
    assert gradients.shape == (2, sum(k_in * k_out for k_in, k_out in got.values()))
    assert batch_shared_layers(build("llama"), ["model.embed_tokens"]) == []  # rotary: no position embedding


def test_sampled_fisher_refuses_a_layer_whose_second_moment_would_not_fit(monkeypatch):
    model = build("llama")
    config = ProjectionConfig(rank_in=4, rank_out=4, ranks={"lm_head": (16, 64)})  # 1024 dimensions
    logra = LoGra(model, CausalLMTask(pad_token_id=0), config)
    monkeypatch.setattr("domain.gradients.SAMPLED_BLOCK_LIMIT", 1000)
    sequences = pl.DataFrame(
        {
            "shard_id": ["s"],
            "seq_id": [0],
            "doc_id": ["d"],
            "provider_id": ["p"],
            "n_tokens": [5],
            "input_ids": [[1, 2, 3, 4, 5]],
        }
    )
    with pytest.raises(ConfigError, match=r"fisher = \"sampled\".*\['lm_head'\].*empirical"):
        capture_shard(logra, sequences, "sampled", {"projection_hash": "x", "model_hash": "y"})
    rows, stats = capture_shard(logra, sequences, "empirical", {"projection_hash": "x", "model_hash": "y"})
    assert rows.height == 1 and not any(name.endswith("|second_moment") for name in stats["name"])


def test_pipeline_tracks_the_untied_head_and_fits_ekfac_from_the_stored_gradients(tmp_path, monkeypatch):
    settings = TINY_SETTINGS.replace('exclude = ["lm_head"]\n', "")  # the default: lm_head tracked, untied
    settings = "checkpoint_blocks = true\n" + settings  # capture under activation checkpointing: same gradients
    setup = make_tiny_setup(tmp_path, monkeypatch, settings)
    setup.stage()
    assert all(r.success for r in setup.run_stale())
    delta = setup.delta
    model, tokenizer, _ = load_model(delta)
    assert model.lm_head.weight is not model.transformer.wte.weight  # the embedded model is untied
    projection, _ = load_projection(delta)
    assert {b.name: (b.k_in, b.k_out) for b in projection.layout.blocks}["lm_head"] == (16, 320)  # cut: vocab 320

    # brute force: every sequence captured again in one pass, second moments kept, EK-FAC fitted from them
    sequences = delta.read("token_shards").sort("shard_id", "seq_index")
    logra = LoGra(model, CausalLMTask(pad_token_id=tokenizer.pad_token_id), projection=projection, batch_size=8)
    stats = logra.new_statistics(second_moment=True)
    gradients = logra.capture(examples_of(sequences), statistics=stats)
    stored_rows = (
        sequences.select("seq_id")
        .with_row_index("order")
        .join(delta.read("projected_gradients"), on="seq_id")
        .sort("order")
    )
    assert stored_rows.height == sequences.height
    torch.testing.assert_close(binary_to_gradients(stored_rows["gradient"]), gradients, rtol=1e-5, atol=1e-6)
    expected = Curvature.fit(stats, "ekfac")
    stored = Curvature.from_tensors("ekfac", projection.layout, frame_to_tensors(delta.read("hessian_factors")))
    for name, factors in expected.factors.items():
        torch.testing.assert_close(
            stored.factors[name]["eigenvalues"],
            factors["eigenvalues"],
            rtol=1e-4,
            atol=1e-9 * factors["eigenvalues"].max(),
        )
    statistics = delta.read("projected_gradients_statistics")
    assert not statistics.filter(statistics["name"].str.ends_with("|second_moment")).height


def test_pipeline_stores_bfloat16_gradients_when_asked(tmp_path, monkeypatch):
    setup = make_tiny_setup(tmp_path, monkeypatch, 'gradient_dtype = "bfloat16"\n' + TINY_SETTINGS)
    setup.stage()
    assert all(r.success for r in setup.run_stale())  # the blocking schema checks passed on bfloat16 blobs
    delta = setup.delta
    model, tokenizer, _ = load_model(delta)
    projection, _ = load_projection(delta)
    sequences = delta.read("token_shards").sort("shard_id", "seq_index")
    logra = LoGra(model, CausalLMTask(pad_token_id=tokenizer.pad_token_id), projection=projection, batch_size=8)
    gradients = logra.capture(examples_of(sequences))
    stored = sequences.select("seq_id").join(delta.read("projected_gradients"), on="seq_id", maintain_order="left")
    assert stored["gradient_dtype"].unique().to_list() == ["bfloat16"]
    assert stored["gradient"].bin.size().unique().to_list() == [2 * projection.layout.dim]  # half of float32
    # bfloat16 keeps 8 significant bits: within 2^-8 of the float32 capture, relative to each value
    torch.testing.assert_close(frame_gradients(stored), gradients, rtol=2**-8, atol=1e-6 * gradients.abs().max())
    assert delta.read("influence_scores").height > 0


def test_a_model_the_embedding_probe_cannot_run_is_refused_naming_the_fix():
    class Scorer(torch.nn.Module):  # an embedding, but no causal-LM forward(input_ids=...)
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(8, 4)
            self.out = torch.nn.Linear(4, 1)

        def forward(self, tokens):
            return self.out(self.emb(tokens))

    with pytest.raises(ConfigError, match=r"probe forward of Scorer.*\['emb'\].*embeddings = false"):
        pipeline_projection_config(ProjectionConfig(embeddings=True), Scorer(), adapter=False)
    assert batch_shared_layers(Scorer(), []) == []  # nothing to find: no forward
