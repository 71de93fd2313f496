"""domain/progress.py: when a long loop reports, and how it words elapsed time and time left."""

from domain.progress import Progress, duration


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_reports_first_then_at_most_every_interval_and_always_at_the_end():
    clock = Clock()
    progress = Progress(250, "step", every_s=10, clock=clock)
    reports = {}
    for step in range(1, 251):
        clock.now += 0.4  # 100 s in all
        if line := progress.update(step):
            reports[step] = line
    assert list(reports)[0] == 1 and list(reports)[-1] == 250
    assert all(b - a >= 25 for a, b in zip(list(reports), list(reports)[1:-1]))  # 25 steps = 10 s
    assert len(reports) <= 12
    assert reports[1] == "step 1/250, 0 s elapsed"
    assert reports[250] == "step 250/250, done in 1 min 40 s"
    step, line = next((step, line) for step, line in reports.items() if step > 100)
    elapsed = round(step * 0.4)
    assert line == f"step {step}/250, {elapsed} s elapsed, ~{100 - elapsed} s left"


def test_fractional_progress_with_a_label():
    clock = Clock()
    progress = Progress(4, "shard", every_s=10, clock=clock)
    clock.now += 30
    assert progress.update(1.5, "shard 2/4: 5/10 sequences") == "shard 2/4: 5/10 sequences, 30 s elapsed, ~50 s left"
    clock.now += 1
    assert progress.update(2.0) is None


def test_duration_words():
    assert [duration(s) for s in (0, 7.4, 89, 90, 125, 3599, 3780)] == [
        "0 s",
        "7 s",
        "89 s",
        "1 min 30 s",
        "2 min 05 s",
        "59 min 59 s",
        "1 h 03 min",
    ]
