"""Unclear errors an outside red team found (issue 12): settings files and `dataworth audit` arguments.

Every settings problem is refused when the file loads, as one `SettingsError` line naming the file, the
key, the value and the fix; the CLI prints it without a traceback and exits 2.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from dagster._utils.schedules import is_valid_cron_string

from domain.settings import Settings, SettingsError, cron_problem
from pipelines.cli import main
from tests.pipeline_harness import TINY_SETTINGS

SCRIPT = Path(sys.executable).parent / "dataworth"

BAD_SETTINGS = {
    "unknown_key": ("[scores]\ntopk = 3\n", r"\[scores\] topk: unknown key; .*top_k"),
    "unknown_section": ("[scorez]\ntop_k = 3\n", r"\[scorez\]: unknown section; "),
    "rank_as_string": ('[projection]\nrank_in = "32"\n', r"\[projection\] rank_in = '32': must be an integer"),
    "rank_zero": ("[projection]\nrank_in = 0\n", r"\[projection\] rank_in = 0: must be >= 1"),
    "damping_mode_typo": (
        '[curvature]\ndamping_mode = "relativ"\n',
        r"\[curvature\] damping_mode = 'relativ': must be one of \('relative', 'absolute'\)",
    ),
    "damping_zero": ("[curvature]\ndamping = 0\n", r"\[curvature\] damping = 0: must be > 0"),
    "malformed_toml": ("[scores\ntop_k = 3\n", r"is not valid TOML \(.*line 1.*\); fix the syntax"),
    "invalid_cron": (
        '[automation]\nrevaluation_cron = "0 25 * * *"\n',
        r"\[automation\] revaluation_cron = '0 25 \* \* \*': hour 25 is out of range 0-23",
    ),
    "cron_with_six_fields": (
        '[automation]\nrevaluation_cron = "0 0 3 * * *"\n',
        r"revaluation_cron = '0 0 3 \* \* \*': .*5 fields",
    ),
    "empty_queries_file": ('[queries]\nqueries_file = " "\n', r"queries_file = ' ': must name a query file"),
    "negative_top_k": ("[scores]\ntop_k = -1\n", r"\[scores\] top_k = -1: must be >= 1"),
    "normalize_typo": ('[scores]\nnormalize = "cosin"\n', r"\[scores\] normalize = 'cosin': must be one of"),
    "bool_as_number": ("[corpus]\nseed_embedded_corpus = 1\n", r"seed_embedded_corpus = 1: must be true or false"),
    "section_as_value": ("scores = 3\n", r"scores = 3: must be a \[scores\] section"),
    "embedding_ranks_not_a_pair": (
        "[projection]\nembedding_ranks = [1024]\n",
        r"\[projection\] embedding_ranks = \[1024\]: must be \[rank_in, rank_out\], two integers >= 1",
    ),
    "rank_pair_with_zero": (
        "[projection]\nranks = { lm_head = [0, 8] }\n",
        r"ranks = .*entry 'lm_head' must be \[rank_in, rank_out\], two integers >= 1",
    ),
    "no_scoring_worker": (
        "[deployment]\nscoring_workers = 0\n",
        r"\[deployment\] scoring_workers = 0: must be >= 1",
    ),
    "exclude_as_string": ('[projection]\nexclude = "lm_head"\n', r"exclude = 'lm_head': must be a list of strings"),
    "seq_len_above_context": (
        "[model]\nn_positions = 64\n[shards]\nseq_len = 128\n",
        r"\[shards\] seq_len = 128: must be <= \[model\] n_positions = 64",
    ),
    "heads_not_dividing_width": ("[model]\nn_head = 3\n", r"n_embd = 128: must be a multiple of \[model\] n_head = 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_every_bad_setting_is_one_line_naming_file_key_value_and_fix(tmp_path, monkeypatch, case):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "home"))
    text, pattern = BAD_SETTINGS[case]
    path = tmp_path / "settings.toml"
    path.write_text(text)
    with pytest.raises(SettingsError) as error:
        Settings.load(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"settings file {path}: ")
    assert re.search(pattern, message), message


def test_good_settings_load(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text(TINY_SETTINGS + '[automation]\nrevaluation_cron = "*/15 9-17 * jan-jun mon-fri"\n')
    assert Settings.load(path).automation.revaluation_cron.startswith("*/15")
    assert Settings.from_dict(Settings().to_dict()) == Settings()


CRONS = [
    "0 3 * * *",
    "*/15 * * * *",
    "0 9-17/2 * * mon-fri",
    "5 4 1,15 jan,jul *",
    "0 0 * * 7",
    "@daily",
    "@hourly",
    "0 3 * *",
    "0 3 * * * *",
    "60 3 * * *",
    "0 24 * * *",
    "0 0 0 * *",
    "0 0 32 * *",
    "0 0 * 13 *",
    "0 0 * * 8",
    "5-1 * * * *",
    "*/0 * * * *",
    "x * * * *",
    "",
    "0 0 30 2 *",
]


@pytest.mark.parametrize("cron", CRONS)
def test_cron_check_agrees_with_dagster(cron):
    assert (cron_problem(cron) is None) == is_valid_cron_string(cron), cron_problem(cron)


def test_cli_prints_a_settings_error_without_a_traceback_and_exits_2(tmp_path, monkeypatch):
    path = tmp_path / "settings.toml"
    path.write_text("[scores]\ntop_k = -1\n")
    env = {**__import__("os").environ, "DATAWORTH_HOME": str(tmp_path / "home"), "DATAWORTH_SETTINGS": str(path)}
    result = subprocess.run([SCRIPT, "run"], check=False, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"settings file {path}: [scores] top_k = -1: must be >= 1" in result.stderr


def test_code_location_shows_the_same_message(tmp_path, monkeypatch):
    path = tmp_path / "settings.toml"
    path.write_text('[curvature]\ndamping_mode = "relativ"\n')
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATAWORTH_SETTINGS", str(path))
    from pipelines.definitions import build_definitions

    with pytest.raises(SettingsError, match=rf"settings file {re.escape(str(path))}: \[curvature\] damping_mode"):
        build_definitions()


@pytest.mark.parametrize("sample", ["0", "-1", "two"])
def test_audit_refuses_a_sample_below_one(tmp_path, monkeypatch, capsys, sample):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as exit:
        main(["audit", "v-0123456789abcdef", "--verify", "--sample", sample])
    assert exit.value.code == 2
    assert f"--sample: must be a whole number >= 1, got {sample!r}" in capsys.readouterr().err
