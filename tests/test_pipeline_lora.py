"""A LoRA adapter valued through the real pipeline: `[model] adapter_dir` applies a PEFT adapter on the
embedded GPT-2, the projection tracks only the adapter's lora_A / lora_B layers, the stored projected
gradients equal brute force, and a changed adapter makes the model stale.

One tiny home is materialized per module with an adapter saved outside it; the tests run in file order
(the last one changes a byte of the adapter).
"""

import json
import re
import sys

import polars as pl
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dataworth import MismatchError
from dataworth.adapters import lora_include
from domain.artifacts import latest_row, load_model, load_projection, record_checkpoint
from domain.lm import ADAPTER_WEIGHTS, CheckpointError, apply_adapter, check_adapter, checkpoint_hash, combined_hash
from domain.settings import Settings, SettingsError
from pipelines.automation import REASON_TAG, code_versions, stale_work
from resources.codecs import binary_to_gradients
from resources.delta import DeltaStore
from resources.schemas import validate
from tests.pipeline_harness import TINY_SETTINGS, make_tiny_setup
from tests.reliability_support import changed, failure, run, versions
from tests.test_engine_capture import explicit_projection
from tests.test_engine_lora import DEVICE, brute_force
from tests.test_schemas import VALID

peft = pytest.importorskip("peft")
RANK = 2
TARGETS = ["c_attn", "c_proj"]  # GPT-2's Conv1D attention and projections (attn.c_proj and mlp.c_proj)


def save_adapter(folder) -> None:
    """A LoRA adapter (r=2) for the tiny setup's GPT-2 shape, both factors random (B is zero when PEFT
    initialises it, which would make every gradient of A zero), saved with save_pretrained."""
    torch.manual_seed(3)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_layer=1, n_head=2, n_embd=32, n_positions=64))
    config = peft.LoraConfig(
        r=RANK, lora_alpha=4, target_modules=TARGETS, fan_in_fan_out=True, lora_dropout=0.1, init_lora_weights=False
    )
    peft.get_peft_model(base, config).save_pretrained(folder)


@pytest.fixture(scope="module")
def valued(tmp_path_factory):
    adapter = tmp_path_factory.mktemp("operator") / "adapter"  # outside the project and the state folder
    save_adapter(adapter)
    settings = TINY_SETTINGS.replace("[model]\n", f'[model]\nadapter_dir = "{adapter}"\n')
    with pytest.MonkeyPatch.context() as monkeypatch:
        setup = make_tiny_setup(tmp_path_factory.mktemp("lora"), monkeypatch, settings)
        assert setup.settings.model.adapter_dir == str(adapter)
        setup.stage()
        assert all(result.success for result in setup.run_stale())
        yield setup, adapter


def test_checkpoint_row_records_the_adapter_and_the_combined_hash(valued):
    setup, adapter = valued
    row = latest_row(setup.delta, "model_checkpoint")
    assert row["adapter_path"] == str(adapter) and row["source"] == "embedded"
    assert row["checkpoint_hash"] == combined_hash(checkpoint_hash(row["path"]), adapter)
    assert row["checkpoint_hash"] != checkpoint_hash(row["path"])
    model, _, _ = load_model(setup.delta)
    assert isinstance(model, peft.PeftModel)
    assert not any(module.training for module in model.modules())  # LoRA dropout off, as capture needs


def test_projection_tracks_only_the_adapter_factors(valued):
    setup, _ = valued
    model, _, model_row = load_model(setup.delta)
    projection, row = load_projection(setup.delta, model_row["checkpoint_hash"])
    layers = list(projection.layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"{n}.weight" for n in layers} == trainable  # the adapter's factors, none of the frozen base
    assert len(layers) == 2 * 3 and all(n.endswith((".lora_A.default", ".lora_B.default")) for n in layers)
    for name in layers:  # rank 4 clipped to the adapter rank on its r-wide side
        k_in, k_out = projection.p_in[name].shape[0], projection.p_out[name].shape[0]
        assert (k_in, k_out) == ((4, RANK) if name.endswith("lora_A.default") else (RANK, 4))
    assert tuple(json.loads(row["config"])["include"]) == lora_include()


def test_stored_gradients_equal_brute_force(valued):
    setup, _ = valued
    model, _, model_row = load_model(setup.delta)
    projection, _ = load_projection(setup.delta, model_row["checkpoint_hash"])
    shard = setup.instance.get_dynamic_partitions("shards")[0]
    seqs = setup.delta.read("token_shards", where={"shard_id": shard}).sort("seq_index").head(4)
    stored = setup.delta.read("projected_gradients", where={"shard_id": shard})
    stored = seqs.select("seq_id").join(stored, on="seq_id", how="left", maintain_order="left")
    assert stored["model_hash"].to_list() == [model_row["checkpoint_hash"]] * seqs.height
    examples = [list(ids) for ids in seqs["input_ids"].to_list()]
    expected = explicit_projection(projection, brute_force(model.to(DEVICE), examples, list(projection.layers)))
    for block in projection.layout.blocks:  # non-trivial gradients on both factors of every adapted module
        assert block.view(expected).abs().max() > 1e-4, block.name
    captured = binary_to_gradients(stored["gradient"]).double()
    torch.testing.assert_close(captured, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_the_graph_values_data_through_the_adapter(valued):
    setup, _ = valued
    model_hash = latest_row(setup.delta, "model_checkpoint")["checkpoint_hash"]
    queries = setup.delta.read("valuation_queries")
    assert queries.height > 0 and queries["model_hash"].unique().to_list() == [model_hash]
    scores = setup.delta.read("influence_scores")
    assert scores.filter(pl.col("kind") == "provider_query").height > 0
    assert stale_work(setup.instance, setup.delta, code_versions(setup.definitions().assets)) == []


@pytest.mark.parametrize("kind", ["missing", "pickle_only", "no_config"])
def test_bad_adapter_folder_fails_model_checkpoint(valued, tmp_path, kind):
    setup, adapter = valued
    folder = tmp_path / f"adapter-{kind}"
    if kind != "missing":
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    if kind == "pickle_only":
        (folder / "adapter_model.bin").write_bytes(b"not unpickled")
    elif kind == "no_config":
        (folder / ADAPTER_WEIGHTS).write_bytes((adapter / ADAPTER_WEIGHTS).read_bytes())
        (folder / "adapter_config.json").unlink()
    fix = {
        "missing": r"does not exist; set \[model\] adapter_dir to a local folder written by peft_model.save_pretrained",
        "pickle_only": r"only pickle adapter weights \(adapter_model\.bin\).*convert them to adapter_model\.safet",
        "no_config": r"has no adapter_config\.json; pass a PEFT adapter folder written by peft_model\.save_pretrained",
    }[kind]
    before = versions(setup.delta)
    result = run(setup, "model_checkpoint", settings=changed(setup.settings, model={"adapter_dir": str(folder)}))
    error = failure(result)
    assert "CheckpointError" in error and str(folder) in error
    assert re.search(fix, error, flags=re.S), error
    assert versions(setup.delta) == before


def test_missing_peft_names_the_fix(valued, monkeypatch):
    _, adapter = valued
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(CheckpointError, match=rf"adapter_dir = {adapter} needs the peft library.*pip install peft"):
        check_adapter(adapter)


@pytest.mark.parametrize(("shape", "problem"), [({"n_layer": 2}, "do not match"), ({"n_embd": 16}, "size mismatch")])
def test_adapter_for_another_base_is_refused(valued, shape, problem):
    _, adapter = valued
    base = GPT2LMHeadModel(GPT2Config(**{"vocab_size": 320, "n_layer": 1, "n_head": 2, "n_embd": 32, **shape}))
    with pytest.raises(CheckpointError, match=rf"{adapter}: .*{problem}.*use an adapter trained for this base"):
        apply_adapter(base.eval(), "0" * 64, adapter)


def test_a_changed_adapter_byte_makes_the_model_stale(valued):
    """Last: changes the module's adapter in place."""
    setup, adapter = valued
    old = latest_row(setup.delta, "model_checkpoint")["checkpoint_hash"]
    weights = adapter / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x01  # the lowest mantissa byte of the last float: still a finite weight
    weights.write_bytes(bytes(data))
    with pytest.raises(MismatchError, match=f"with adapter {adapter} hashes to .* it changed on disk"):
        load_model(setup.delta)
    (request,) = stale_work(setup.instance, setup.delta, code_versions(setup.definitions().assets))
    assert f"the adapter files at {adapter} changed" in request.tags[REASON_TAG]
    assert run(setup, "model_checkpoint").success
    new = latest_row(setup.delta, "model_checkpoint")
    assert new["checkpoint_hash"] != old
    assert new["checkpoint_hash"] == combined_hash(checkpoint_hash(new["path"]), adapter)


def test_a_table_from_before_adapters_gets_the_column(tmp_path, monkeypatch):
    """model_checkpoint tables written before `adapter_path` existed are rewritten with it ("") on the next row."""
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "home"))
    delta = DeltaStore()
    new = VALID["model_checkpoint"].with_columns(adapter_path=pl.lit("/operator/adapter"))
    old = VALID["model_checkpoint"].drop("adapter_path").with_columns(checkpoint_hash=pl.lit("1" * 64))
    delta.write("model_checkpoint", old, metadata={})
    assert latest_row(delta, "model_checkpoint")["adapter_path"] == ""  # an old row reads as "no adapter"
    record_checkpoint(delta, new, {})
    frame = delta.read("model_checkpoint").sort("checkpoint_hash")
    assert validate("model_checkpoint", frame) == []
    assert frame["adapter_path"].to_list() == ["", "/operator/adapter"]
    record_checkpoint(delta, new, {})  # later rows replace by hash, as before
    assert delta.read("model_checkpoint").height == 2


def test_adapter_dir_is_an_operator_path(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('[model]\nadapter_dir = "s3://bucket/adapter"\n')
    with pytest.raises(SettingsError, match=r"\[model\] adapter_dir = 's3://bucket/adapter' is a URI; give a local"):
        Settings.load(path)
    path.write_text('[model]\nadapter_dir = "~/adapters/mine"\n')  # any local folder, resolved when used
    settings = Settings.load(path)
    assert settings.model.adapter_dir == "~/adapters/mine"
    assert settings.version("model") != Settings().version("model")  # a new adapter re-versions model_checkpoint
