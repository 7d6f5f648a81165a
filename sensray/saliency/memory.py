"""The peak memory of a block of work: what a gradient pass costs beyond the resident model.

    with PeakMemory(device) as memory:
        backward_pass(model, batches, consume)
    memory.peak, memory.start, memory.above          # bytes

On a GPU: torch's allocator (`max_memory_allocated` after `reset_peak_memory_stats`). On a CPU: the
process's resident set. tracemalloc cannot see it (torch allocates outside Python's allocator), so
Linux's own high-water mark is used: VmHWM from /proc/self/status, reset at the start by writing 5
to /proc/self/clear_refs; where that is not possible, RSS sampled every millisecond by a thread.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

STATUS, CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


class PeakMemory:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.start = self.peak = 0
        self._sampler: _Sampler | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = rss()
            if not _reset_high_water():
                self._sampler = _Sampler()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self.peak = self._sampler.stop()
        else:
            self.peak = _status("VmHWM")

    @property
    def above(self) -> int:
        return max(0, self.peak - self.start)

    @property
    def how(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "RSS sampled every ms" if self._sampler is not None else "RSS high-water mark (VmHWM)"


def rss() -> int:
    value = _status("VmRSS")
    if value:
        return value
    import psutil

    return psutil.Process().memory_info().rss


def _status(key: str) -> int:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_high_water() -> bool:
    try:
        CLEAR.write_text("5")
    except OSError:
        return False
    return _status("VmHWM") > 0


class _Sampler:
    def __init__(self) -> None:
        self.peak, self._done = rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, rss())
