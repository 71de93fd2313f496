"""`dataworth ui`: the instance's dagster.yaml, and stopping the UI with everything it started (real processes)."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import yaml

from pipelines.cli import CODE_SERVER_STARTUP_TIMEOUT_S, tool, use_state_folder
from resources.state import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dagster_yaml(home: Path) -> Path:
    return home / "dagster" / "dagster.yaml"


def test_a_new_instance_waits_long_enough_for_its_code_server(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))  # restored after the test
    use_state_folder()
    config = yaml.safe_load(dagster_yaml(tmp_path).read_text())
    assert config["code_servers"]["local_startup_timeout"] == CODE_SERVER_STARTUP_TIMEOUT_S >= 600
    assert config["telemetry"] == {"enabled": False}


def test_an_older_dagster_yaml_gets_the_timeout_and_keeps_the_users_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    config = dagster_yaml(tmp_path)
    config.parent.mkdir(parents=True)
    older = "telemetry:\n  enabled: false\n# mine\nrun_queue:\n  max_concurrent_runs: 2"  # no final newline
    config.write_text(older)
    use_state_folder()
    text = config.read_text()
    assert text.startswith(older) and "# mine" in text
    assert yaml.safe_load(text) == {
        "telemetry": {"enabled": False},
        "run_queue": {"max_concurrent_runs": 2},
        "code_servers": {"local_startup_timeout": CODE_SERVER_STARTUP_TIMEOUT_S},
    }
    use_state_folder()  # idempotent
    assert config.read_text() == text

    config.write_text("code_servers:\n  reload_timeout: 30\n")  # a code_servers block without the key
    use_state_folder()
    assert yaml.safe_load(config.read_text()) == {
        "code_servers": {"reload_timeout": 30, "local_startup_timeout": CODE_SERVER_STARTUP_TIMEOUT_S}
    }
    config.write_text("code_servers:\n  local_startup_timeout: 1200\n")  # the user's own timeout wins
    use_state_folder()
    assert config.read_text() == "code_servers:\n  local_startup_timeout: 1200\n"


FAMILY = """
import signal, subprocess, sys, time
stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); {more}; time.sleep(600)"
for more in ["pass", "signal.signal(signal.SIGTERM, signal.SIG_IGN)"]:
    subprocess.Popen([sys.executable, "-c", stubborn.format(more=more)])
try:
    print("ready", flush=True)
    time.sleep(600)
except KeyboardInterrupt:
    sys.exit(0)
"""


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # like a background job of a shell script


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(processes: list[psutil.Process]) -> list[str]:
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid}: {' '.join(process.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return left


def test_sigint_stops_the_command_and_every_leftover_of_its_group(tmp_path):
    """The wrapper runs with SIGINT ignored, as in a script's background job: the command must still hear it."""
    family = tmp_path / "family.py"
    family.write_text(FAMILY)
    wrapper = textwrap.dedent(f"""
        import sys
        from pipelines.cli import run_process_group
        sys.exit(run_process_group([sys.executable, {str(family)!r}]))
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", wrapper], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True, preexec_fn=ignore_sigint
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        family_processes = descendants(process.pid)
        assert len(family_processes) == 3
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0  # the command's own exit code
        assert alive(family_processes) == []
    finally:
        if process.poll() is None:
            process.kill()


def test_sigterm_stops_dataworth_ui_while_its_code_server_starts(tmp_path):
    """A real `dataworth ui` on an empty state folder, stopped while it loads the definitions."""
    settings = tmp_path / "settings.toml"
    settings.write_text("[corpus]\nseed_embedded_corpus = false\n")
    env = {**os.environ, "DATAWORTH_HOME": str(tmp_path / "home"), "DATAWORTH_SETTINGS": str(settings)}
    env.pop("DAGSTER_HOME", None)
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        ui = subprocess.Popen(
            [tool("dataworth"), "ui", "--port", str(free_port())],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        started, seen = time.monotonic(), []
        while time.monotonic() - started < 120 and not any("code-server" in " ".join(c) for c in seen):
            time.sleep(0.5)
            seen = [p.cmdline() for p in descendants(ui.pid) if p.is_running()]
        assert any("code-server" in " ".join(c) for c in seen), f"no code server started:\n{log.read_text()}"
        children = descendants(ui.pid)
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=120) in (0, 1, 128 + signal.SIGTERM), log.read_text()
        assert alive(children) == [], log.read_text()
    finally:
        if ui.poll() is None:
            ui.kill()
