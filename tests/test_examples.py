"""The examples run as a user would run them, and what they print is right."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_custom_training_loop_values_its_training_data():
    out = run_example("custom_training_loop.py")
    # A query copied from training example 7 ranks that example first.
    copy_block = out.split("query 'copy of train[7]'")[1]
    assert re.search(r"top 1: train\[(\d+)\]", copy_block).group(1) == "7"
    # The held-out queries' top examples come from the source that teaches their rule.
    for query, source in [("counting (held out)", "counting"), ("skip3 (held out)", "skip3")]:
        block = out.split(f"query {query!r}")[1].split("\n\n")[0]
        assert re.findall(r"top \d: train\[\d+\] \((\w+)\)", block) == [source] * 3
    # Value per source: each rule's source helps its own query most; the conflicting rule hurts it.
    table = out.split("value per data source")[1].splitlines()
    columns = table[1].split()[1:]
    assert columns == ["counting", "skip3", "noise"]
    values = {
        line[:24].strip(): dict(zip(columns, map(float, line[24:].split()))) for line in table[2:] if line.strip()
    }
    assert set(values) == {"counting (held out)", "skip3 (held out)", "copy of train[7]"}
    for query, own, other in [("counting (held out)", "counting", "skip3"), ("skip3 (held out)", "skip3", "counting")]:
        assert values[query][own] > 0 > values[query][other]
        assert max(values[query], key=values[query].get) == own
