"""A one-line progress report: trials done / total, rate, ETA, failures.

On a terminal the line rewrites itself; in a log (CI, a cluster job) it prints a new line
every `every` seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    def __init__(self, total: int, done: int = 0, stream: TextIO | None = None, every: float = 5.0):
        self.total, self.done, self.failed = total, done, 0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.every = 0.2 if self.live else every
        self.start = time.perf_counter()
        self.first = done  # trials resumed from an earlier run do not count toward the rate
        self.last_print = 0.0
        self.replicas = 1

    def update(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        now = time.perf_counter()
        if now - self.last_print >= self.every or self.done == self.total:
            self.last_print = now
            self._print(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else "?"
        width = len(str(self.total))
        return (
            f"[{self.done:>{width}}/{self.total}] {100 * self.done / max(self.total, 1):5.1f}%  "
            f"{rate:6.2f} trials/s  ETA {eta}  elapsed {_duration(elapsed)}  "
            f"replicas {self.replicas}  failures {self.failed}"
        )

    def _print(self, line: str) -> None:
        end = "\n" if not self.live or self.done == self.total else ""
        self.stream.write(("\r" if self.live else "") + line + end)
        self.stream.flush()
