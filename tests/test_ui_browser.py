"""The newcomer's path through the Dagster UI, in a real browser (Playwright driving Debian's Chromium).

A tiny valuation is materialized into a temporary state folder, `dataworth ui` serves it on a free localhost
port, and the browser opens the asset graph and the provider_valuations page (the table and the chart of its
materialization must render), materializes provider_valuations from the UI and waits for the run to succeed.
Then the UI is stopped with SIGINT and no process it started may be left.

Needs `playwright` (the dev extra; its browser download is never used) and /usr/bin/chromium (`apt-get install
chromium`, done by .ci/run when run as root). About 3 minutes on 2 cores, half of it the UI start.
"""

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.pipeline_harness import PROVIDERS, TINY_SETTINGS, TinySetup, landing_records, write_jsonl
from tests.test_cli_ui import alive, free_port

CHROMIUM = Path(os.environ.get("DATAWORTH_CHROMIUM", "/usr/bin/chromium"))
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]' (no `playwright install`)"
)
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set DATAWORTH_CHROMIUM)"
)
UI_START_TIMEOUT_S = 600
RUN_TIMEOUT_S = 300


def materialize_tiny_valuation(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """A tiny valuation in the state folder's own Dagster instance; returns the environment of the UI."""
    import dagster as dg

    from domain.settings import Settings
    from pipelines.cli import use_state_folder

    home, settings = tmp_path / "home", tmp_path / "settings.toml"
    settings.write_text(TINY_SETTINGS)
    env = {"DATAWORTH_HOME": str(home), "DATAWORTH_SETTINGS": str(settings), "DAGSTER_HOME": str(home / "dagster")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # restored after the test (use_state_folder sets DAGSTER_HOME)
    use_state_folder()
    landing = home / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    for provider in PROVIDERS:
        write_jsonl(landing / f"{provider}.jsonl", landing_records(provider, 0, 3))
    with dg.DagsterInstance.get() as instance:
        setup = TinySetup(home, landing, Settings.load(), instance)
        setup.stage()
        results = setup.run_stale()
        assert results and all(r.success for r in results)
    return env


def wait_for_ui(url: str, ui: subprocess.Popen, log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < UI_START_TIMEOUT_S:
        assert ui.poll() is None, f"dataworth ui exited with {ui.returncode}:\n{log.read_text()[-5000:]}"
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5):
                return time.monotonic() - started
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the UI did not answer within {UI_START_TIMEOUT_S} s:\n{log.read_text()[-5000:]}")


def test_a_newcomer_sees_the_valuation_and_materializes_from_the_ui(tmp_path, monkeypatch):
    import dagster as dg
    import psutil

    from pipelines.cli import tool

    env = materialize_tiny_valuation(tmp_path, monkeypatch)
    port, log = free_port(), tmp_path / "ui.log"
    url = f"http://127.0.0.1:{port}"
    ui_env = {**os.environ, **env}
    ui_env.pop("DAGSTER_HOME")  # `dataworth ui` finds the instance from DATAWORTH_HOME alone
    with open(log, "w") as out:
        ui = subprocess.Popen(
            [tool("dataworth"), "ui", "--port", str(port)], env=ui_env, stdout=out, stderr=subprocess.STDOUT
        )
    children = []
    try:
        seconds = wait_for_ui(url, ui, log)
        print(f"dataworth ui answered after {seconds:.0f} s")
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)  # a busy 2-core machine: actions and assertions wait up to a minute
            sync_api.expect.set_options(timeout=60_000)
            # Dagster greets a new instance with a community dialog: skip it whenever it shows
            page.add_locator_handler(
                page.get_by_text("Join the Dagster community"), lambda: page.get_by_role("button", name="Skip").click()
            )
            expect = sync_api.expect

            # the asset graph: every group of the project is drawn
            page.goto(f"{url}/asset-groups")
            for group in ("corpus", "model", "gradients", "valuation", "quality"):
                expect(page.get_by_text(group, exact=True).first).to_be_visible()

            # the valuation: its table (one row per provider) and its chart (a PNG in the metadata)
            page.goto(f"{url}/assets/provider_valuations")
            table = page.locator("table").filter(has=page.locator("td", has_text="torch"))
            for provider in PROVIDERS:
                expect(table.locator("td", has_text=provider).first).to_be_visible()
            chart_row = page.locator("tr").filter(has=page.get_by_text("chart (picture)", exact=True))
            chart_row.get_by_text("[Show Markdown]", exact=True).click()
            chart = page.locator("img[src^='data:image/png;base64,']").first
            expect(chart).to_be_visible()
            width, height = chart.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert width > 100 and height > 100  # a decoded image, not a broken one
            page.get_by_role("button", name="Close").click()

            # materialize provider_valuations from the UI and wait for the run to succeed
            with dg.DagsterInstance.get() as instance:
                before = {r.run_id for r in instance.get_runs()}
                page.locator("button", has_text=re.compile(r"^Materialize$")).click()
                deadline, launched = time.monotonic() + RUN_TIMEOUT_S, []
                while not launched and time.monotonic() < deadline:
                    launched = [r for r in instance.get_runs() if r.run_id not in before]
                    time.sleep(1)
                assert launched, f"no run launched from the UI:\n{log.read_text()[-5000:]}"
                run_id = launched[0].run_id
                children = psutil.Process(ui.pid).children(recursive=True)  # includes the run's processes
                page.goto(f"{url}/runs/{run_id}")
                while time.monotonic() < deadline and not instance.get_run_by_id(run_id).is_finished:
                    children += [c for c in psutil.Process(ui.pid).children(recursive=True) if c not in children]
                    time.sleep(2)
                status = instance.get_run_by_id(run_id).status
            assert status == dg.DagsterRunStatus.SUCCESS, f"run {run_id}: {status}\n{log.read_text()[-5000:]}"
            expect(page.get_by_text("Success", exact=True).first).to_be_visible()
            browser.close()
    finally:
        if ui.poll() is None:
            children += [c for c in psutil.Process(ui.pid).children(recursive=True) if c not in children]
        ui.send_signal(signal.SIGINT)
        try:
            code = ui.wait(timeout=120)
        except subprocess.TimeoutExpired:
            ui.kill()
            raise
    assert code == 0, log.read_text()[-5000:]
    assert len(children) >= 4  # dagster dev, its code server(s), the webserver, the daemon
    assert alive(children) == [], log.read_text()[-5000:]
