"""Progress of a long loop for people watching the logs: when to say something, and how long is left.

`Progress(total, "step").update(done)` returns a line such as "step 120/250, 45 s elapsed, ~50 s left" on the
first update, then at most once every `every_s` seconds of wall time, and always when `done` reaches `total`
("step 250/250, done in 1 min 35 s"); otherwise None. The estimate of time left is linear in the work done
so far. `done` may be fractional (3.5 of 12 shards) when the caller names the position itself with `label`.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """`7 s`, `2 min 05 s`, `1 h 03 min`: short, and precise enough for a log line."""
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Decides when a loop of `total` units reports, and words the report (elapsed time, estimate of time left)."""

    def __init__(
        self, total: float, what: str = "step", every_s: float = 12.0, clock: Callable[[], float] = time.monotonic
    ):
        self.total, self.what, self.every_s, self.clock = total, what, every_s, clock
        self.started = clock()
        self.last_report: float | None = None

    def update(self, done: float, label: str | None = None) -> str | None:
        """The report line if one is due after `done` units (see the module docstring), else None."""
        now = self.clock()
        finished = done >= self.total
        if not finished and self.last_report is not None and now - self.last_report < self.every_s:
            return None
        self.last_report = now
        return self.message(done, label, now)

    def message(self, done: float, label: str | None = None, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.started
        head = label if label is not None else f"{self.what} {done:g}/{self.total:g}"
        if done >= self.total:
            return f"{head}, done in {duration(elapsed)}"
        if done <= 0 or elapsed < 1:
            return f"{head}, {duration(elapsed)} elapsed"
        left = elapsed / done * (self.total - done)
        return f"{head}, {duration(elapsed)} elapsed, ~{duration(left)} left"
