"""Bad input reaches the real pipeline: each gets a named error or a quarantine, and nothing stored is lost.

One tiny home is materialized per module (with one document far longer than the context). Landing
files are planned against it; failing runs execute the real Dagster job on it (or on a clone of it when
the test has to break something first) and must leave every table at its version.
"""

import json
import re
import shutil

import numpy as np
import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake
from safetensors.torch import load_file, save_file
from transformers import T5Config

from dataworth import ConfigError
from domain.artifacts import latest_row
from domain.settings import Settings
from domain.staging import plan_landing, staged_dir
from tests.pipeline_harness import landing_records
from tests.reliability_support import LONG_DOC_ID, changed, clone, failure, materialized_setup, run, versions


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield materialized_setup(tmp_path_factory.mktemp("input"), monkeypatch, long_document=True)


def started_steps(result) -> list[str]:
    return [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]


# --- landing files -------------------------------------------------------------------------------


def _doc(doc_id, text="a new document about arrays", provider="newco", **extra):
    return {"provider_id": provider, "doc_id": doc_id, "text": text, "license": "MIT", **extra}


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _parquet(frame: pl.DataFrame, tmp_path) -> bytes:
    frame.write_parquet(tmp_path / "x.parquet")
    return (tmp_path / "x.parquet").read_bytes()


EXISTING = landing_records("numpy", 0, 1)[0]  # a document the base corpus holds

LANDING_CASES = {
    "empty_text": (
        ".jsonl",
        lambda t: _jsonl([_doc("e1", text=""), _doc("e2", text=" \n\t ")]),
        r"doc_id='e1'.*text is empty or whitespace only",
    ),
    "invalid_utf8": (
        ".jsonl",
        lambda t: (
            _jsonl([_doc("u1")]) + b'{"provider_id": "newco", "doc_id": "u2", "text": "caf\xe9", "license": "MIT"}\n'
        ),
        r"line 2 is not valid UTF-8.*re-export the file as UTF-8",
    ),
    "missing_provider_id": (
        ".jsonl",
        lambda t: _jsonl([{"doc_id": "m1", "text": "x", "license": "MIT"}]),
        r"lacks required field\(s\) \['provider_id'\]",
    ),
    "empty_provider_id": (
        ".jsonl",
        lambda t: _jsonl([_doc("p1", provider=""), _doc("p2", provider=" ")]),
        r"doc_id='p1'.*provider_id is missing",
    ),
    "same_doc_id_twice_in_file": (
        ".jsonl",
        lambda t: _jsonl([_doc("d1", text="one"), _doc("d1", text="two")]),
        r"doc_id d1 already exists with different text; give the new version a new doc_id",
    ),
    "doc_id_of_the_corpus_with_new_text": (
        ".jsonl",
        lambda t: _jsonl([{**EXISTING, "text": "rewritten"}]),
        rf"doc_id {EXISTING['doc_id']} already exists with different text",
    ),
    "truncated_jsonl": (
        ".jsonl",
        lambda t: _jsonl([_doc("t1"), _doc("t2")])[:-25],
        r"line 2 is not valid JSON.*one complete JSON object per line",
    ),
    "truncated_parquet": (
        ".parquet",
        lambda t: _parquet(pl.DataFrame([_doc("t1")]), t)[:-40],
        r"cannot be read as Parquet",
    ),
    "unknown_format": (
        ".csv",
        lambda t: b"provider_id,doc_id,text,license\nnewco,c1,x,MIT\n",
        r"unknown format '\.csv'; send JSON Lines \(\.jsonl\) or Parquet",
    ),
    "extra_column": (
        ".jsonl",
        lambda t: _jsonl([_doc("x1", score="0.9")]),
        r"unknown field\(s\) \['score'\]; remove them",
    ),
    "missing_column": (
        ".parquet",
        lambda t: _parquet(pl.DataFrame([_doc("x1")]).drop("license"), t),
        r"lacks required field\(s\) \['license'\]",
    ),
    "provider_with_every_document_rejected": (
        ".jsonl",
        lambda t: _jsonl(
            [
                _doc("g1", provider="goodco"),
                _doc("b1", text="", provider="badco"),
                _doc("b2", text=" ", provider="badco"),
            ]
        ),
        r"providers with every document rejected: badco",
    ),
}


@pytest.mark.parametrize("case", sorted(LANDING_CASES))
def test_bad_landing_file_is_quarantined_with_its_reason(base, tmp_path, case):
    suffix, content, reason = LANDING_CASES[case]
    name = case + suffix
    (base.landing / name).write_bytes(content(tmp_path))
    before, staged = versions(base.delta), sorted(staged_dir().iterdir())
    plan = plan_landing(base.landing, base.settings.corpus.docs_per_shard)
    assert plan.batches == [] and list(plan.quarantined) == [name]
    assert re.search(reason, plan.quarantined[name], flags=re.S)
    assert (base.landing / "_rejected" / f"{name}.reason.txt").read_text().strip() == plan.quarantined[name].strip()
    assert not (base.landing / name).exists()
    assert versions(base.delta) == before and sorted(staged_dir().iterdir()) == staged  # nothing stored changed


def test_document_longer_than_the_context_is_split_into_sequences(base):
    context = base.settings.model.n_positions
    seqs = base.delta.read("token_shards", where={"doc_id": LONG_DOC_ID}).sort("token_start")
    assert seqs["token_end"][-1] > 10 * context  # far longer than the context, and not rejected
    assert seqs["n_tokens"].max() <= base.settings.shards.seq_len
    assert seqs["token_start"].to_list() == [0, *seqs["token_end"][:-1]]  # contiguous windows, no gap
    gradients = base.delta.read("projected_gradients", where={"doc_id": LONG_DOC_ID})
    assert sorted(gradients["seq_id"]) == sorted(seqs["seq_id"])


# --- queries -------------------------------------------------------------------------------------


def _run_queries(base, tmp_path, lines: list[str]):
    path = base.home / f"queries-{tmp_path.name}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    before = versions(base.delta)
    result = run(
        base,
        "valuation_queries",
        "influence_scores",
        settings=changed(base.settings, queries={"queries_file": str(path)}),
    )
    assert versions(base.delta) == before and started_steps(result) == ["valuation_queries"]
    return failure(result), path


def test_query_longer_than_the_context_fails_naming_the_query(base, tmp_path):
    long_prompt = " ".join(["Compute the eigenvalues of a sparse matrix"] * 40)
    error, path = _run_queries(
        base,
        tmp_path,
        [json.dumps({"query_id": "ok", "prompt": "Compute"}), json.dumps({"query_id": "huge", "prompt": long_prompt})],
    )
    assert "QueryTooLongError" in error and f"query 'huge' of {path}" in error
    assert "shorten the prompt or lower max_new_tokens" in error


QUERY_FILE_CASES = {
    "empty": ([], r"holds no query; add lines like"),
    "blank_lines_only": (["", "   "], r"holds no query"),
    "invalid_json": (['{"query_id": "q0", "prompt": "x"'], r"line 1 is not valid JSON"),
    "missing_prompt": (['{"query_id": "q0"}'], r"line 1 needs a non-empty string query_id and a string prompt"),
    "repeated_query_id": (
        ['{"query_id": "q0", "prompt": "a"}', '{"query_id": "q0", "prompt": "b"}'],
        r"line 2 repeats query_id 'q0'",
    ),
}


@pytest.mark.parametrize("case", sorted(QUERY_FILE_CASES))
def test_empty_or_malformed_query_file_fails_naming_file_and_line(base, tmp_path, case):
    lines, message = QUERY_FILE_CASES[case]
    error, path = _run_queries(base, tmp_path, lines)
    assert f"query file {path}" in error
    assert re.search(message, error)


# --- model, projection and curvature settings ----------------------------------------------------


def _model_dir(base, tmp_path, kind: str):
    model = latest_row(base.delta, "model_checkpoint")["path"]
    target = base.home / "models" / f"{kind}-{tmp_path.name}"
    if kind == "missing":
        return target
    shutil.copytree(model, target)
    if kind == "incomplete":
        (target / "model.safetensors").unlink()
    elif kind == "pickle_only":
        (target / "model.safetensors").rename(target / "pytorch_model.bin")
    elif kind == "unsupported_architecture":
        (target / "config.json").unlink()
        T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8).save_pretrained(target)
    return target


MODEL_CASES = {
    "missing": r"does not exist",
    "incomplete": r"has no \*\.safetensors weights",
    "pickle_only": r"only pickle weights \(pytorch_model\.bin\).*convert them to safetensors",
    "unsupported_architecture": r"'t5' model, which is not a causal language model",
}


@pytest.mark.parametrize("kind", sorted(MODEL_CASES))
def test_bad_model_directory_fails_model_checkpoint(base, tmp_path, kind):
    directory = _model_dir(base, tmp_path, kind)
    before = versions(base.delta)
    result = run(
        base,
        "model_checkpoint",
        "gradient_projection",
        settings=changed(base.settings, model={"checkpoint_dir": str(directory)}),
    )
    error = failure(result)
    assert "CheckpointError" in error and str(directory) in error and re.search(MODEL_CASES[kind], error, flags=re.S)
    assert started_steps(result) == ["model_checkpoint"] and versions(base.delta) == before


def test_rank_larger_than_a_layer_width_is_cut_to_the_width_and_recorded(base, tmp_path, monkeypatch):
    home = clone(base, tmp_path, monkeypatch)
    result = run(
        home, "gradient_projection", settings=changed(base.settings, projection={"rank_in": 64, "rank_out": 4})
    )
    assert result.success
    row = latest_row(home.delta, "gradient_projection")
    ranks = json.loads(row["config"])["ranks"]
    assert ranks["transformer.h.0.attn.c_attn"] == [32, 4]  # n_embd 32: 64 asked
    assert "transformer.h.0.mlp.c_proj" not in ranks  # 4 x n_embd = 128 wide: left to rank_in 64
    (event,) = result.get_asset_materialization_events()
    cut = event.materialization.metadata["ranks_cut_to_width"].value
    assert "transformer.h.0.attn.c_attn" in cut and "transformer.h.0.mlp.c_proj" not in cut


@pytest.mark.parametrize("damping", [0, -0.5])
def test_zero_or_negative_damping_is_refused_when_the_settings_load(tmp_path, damping):
    path = tmp_path / "settings.toml"
    path.write_text(f"[curvature]\ndamping = {damping}\n")
    with pytest.raises(ConfigError, match=rf"\[curvature\] damping = {damping}: must be > 0"):
        Settings.load(path)


# --- non-finite values ---------------------------------------------------------------------------


def test_model_with_inf_weights_fails_projected_gradients(base, tmp_path, monkeypatch):
    """fp16/bf16 overflow: a weight is inf, so every gradient is NaN; nothing is written."""
    home = clone(base, tmp_path, monkeypatch)
    overflowed = home.home / "models" / "overflowed"
    shutil.copytree(latest_row(home.delta, "model_checkpoint")["path"], overflowed)
    weights = load_file(overflowed / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("inf")
    save_file(weights, overflowed / "model.safetensors", metadata={"format": "pt"})
    before = versions(home.delta)
    shard = home.instance.get_dynamic_partitions("shards")[0]
    settings = changed(base.settings, model={"checkpoint_dir": str(overflowed)})
    result = run(
        home, "model_checkpoint", "gradient_projection", "projected_gradients", settings=settings, shards=[shard]
    )
    error = failure(result)
    assert "NonFiniteError" in error and f"shard {shard} with model" in error and "contain NaN/Inf in layers" in error
    after = versions(home.delta)
    assert after["projected_gradients"] == before["projected_gradients"]
    assert after["projected_gradients_statistics"] == before["projected_gradients_statistics"]


def test_tampered_statistics_blob_with_nan_fails_hessian_factors(base, tmp_path, monkeypatch):
    home = clone(base, tmp_path, monkeypatch)
    shard = home.instance.get_dynamic_partitions("shards")[1]
    path = home.delta.table_path("projected_gradients_statistics")
    stats = home.delta.read("projected_gradients_statistics", where={"shard_id": shard}).sort("name")
    victim = stats["dtype"].to_list().index("float64")
    values = np.frombuffer(stats["data"][victim], dtype="<f8").copy()
    values[0] = np.nan  # what an overflowed fp16/bf16 capture leaves behind
    data = stats["data"].to_list()
    data[victim] = values.tobytes()
    tampered = stats.with_columns(data=pl.Series(data, dtype=pl.Binary))
    write_deltalake(path, tampered.to_arrow(), mode="overwrite", predicate=f"shard_id = '{shard}'")
    before = versions(home.delta)
    result = run(home, "hessian_factors", "influence_scores")
    error = failure(result)
    assert "NonFiniteError" in error and f"projected_gradients_statistics of shard {shard}" in error
    assert "re-materialize projected_gradients for it" in error
    assert started_steps(result) == ["hessian_factors"] and versions(home.delta) == before


# --- artifacts of different projections or models ------------------------------------------------


def test_new_projection_without_new_gradients_is_not_mixed_in(base, tmp_path, monkeypatch):
    home = clone(base, tmp_path, monkeypatch)
    old = latest_row(home.delta, "gradient_projection")["projection_hash"]
    assert run(home, "gradient_projection", settings=changed(base.settings, projection={"seed": 1})).success
    new = latest_row(home.delta, "gradient_projection")["projection_hash"]
    assert new != old
    before = versions(home.delta)
    for assets, what in [(("hessian_factors",), "gradient statistics"), (("influence_scores",), "query gradients")]:
        error = failure(run(home, *assets))
        assert (
            f"MismatchError: {what} were made with projection_hash ['{old[:12]}'] but the current one is {new[:12]}"
            in error
        )
    assert versions(home.delta) == before


def test_training_gradients_of_another_model_are_not_mixed_in(base, tmp_path, monkeypatch):
    home = clone(base, tmp_path, monkeypatch)
    shard = home.instance.get_dynamic_partitions("shards")[0]
    path = home.delta.table_path("projected_gradients")
    rows = home.delta.read("projected_gradients", where={"shard_id": shard}).with_columns(model_hash=pl.lit("e" * 64))
    write_deltalake(path, rows.to_arrow(), mode="overwrite", predicate=f"shard_id = '{shard}'")
    before = versions(home.delta)
    error = failure(run(home, "influence_scores", "provider_valuations"))
    assert (
        "MismatchError: training gradients were made with model_hash" in error
        and "re-materialize the stale partitions" in error
    )
    assert versions(home.delta) == before


# --- Delta tables edited behind our back ---------------------------------------------------------


def test_rows_appended_with_a_wrong_schema_fail_the_next_write(base, tmp_path, monkeypatch):
    home = clone(base, tmp_path, monkeypatch)
    path = home.delta.table_path("training_corpus")
    extra = home.delta.read("training_corpus").head(1).with_columns(note=pl.lit("edited by hand"))
    write_deltalake(path, extra.to_arrow(), mode="append", schema_mode="merge")
    before = versions(home.delta)
    shard = home.instance.get_dynamic_partitions("shards")[0]
    result = run(home, "training_corpus", "token_shards", shards=[shard])
    assert "TableSchemaMismatch: the frame does not fit Delta table 'training_corpus'" in failure(result)
    assert started_steps(result) == ["training_corpus"] and versions(home.delta) == before


def test_invalid_rows_appended_fail_the_blocking_schema_check(base, tmp_path, monkeypatch):
    home = clone(base, tmp_path, monkeypatch)
    row = home.delta.read("gradient_projection").with_columns(
        projection_hash=pl.lit("f" * 64), dim=pl.lit(0, dtype=pl.Int64)
    )
    write_deltalake(home.delta.table_path("gradient_projection"), row.to_arrow(), mode="append")
    shard = home.instance.get_dynamic_partitions("shards")[0]
    before = versions(home.delta)
    result = run(home, "gradient_projection", "projected_gradients", shards=[shard])
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    assert not checks["gradient_projection_schema"].passed
    assert (
        "column 'dim': check greater_than_or_equal_to(1) fails in 1 row(s)"
        in checks["gradient_projection_schema"].metadata["failures"].md_str
    )
    assert not result.success and started_steps(result) == ["gradient_projection"]  # blocking: downstream never ran
    assert versions(home.delta)["projected_gradients"] == before["projected_gradients"]


def test_deleted_data_file_fails_the_read_loudly(base, tmp_path, monkeypatch):
    home = clone(base, tmp_path, monkeypatch)
    shard = home.instance.get_dynamic_partitions("shards")[1]
    table = DeltaTable(home.delta.table_path("token_shards"))
    victim = next(uri for uri in table.file_uris() if f"shard_id={shard}" in uri)
    (home.home / "delta" / "token_shards" / victim.split("/token_shards/", 1)[1]).unlink()
    before = versions(home.delta)
    result = run(home, "projected_gradients", "hessian_factors", shards=[shard])
    error = failure(result)
    assert "TableDataMissing: Delta table 'token_shards'" in error and "lists a data file that is gone" in error
    assert started_steps(result) == ["projected_gradients.capture"] and versions(home.delta) == before
