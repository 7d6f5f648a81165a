"""One saliency measurement: the gradient pass, the Fisher passes, their time and peak memory.

    measured = measure(model, batches, top_k=16)                # all windows for the Fisher diagonal
    measured = measure(model, batches, fisher_windows=0)        # the gradient only: one backward pass
    tables(measured.scores, fisher=measured.windows > 0)

The gradient pass is one backward over every eval token (sensray.saliency.gradients); the Fisher
diagonal needs a gradient per window of text, so it costs one more (small) backward per window:
`fisher_windows` caps how many windows it averages over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from sensray.saliency.gradients import backward_pass
from sensray.saliency.memory import PeakMemory
from sensray.saliency.scores import Scores


@dataclass
class Measured:
    scores: Scores
    loss: float  # mean NLL of the gradient pass (nats)
    tokens: int
    windows: int  # windows the Fisher diagonal averages over (0: none)
    gradient_seconds: float
    fisher_seconds: float
    memory: PeakMemory

    def summary(self) -> dict:
        m = self.memory
        return {"loss": self.loss, "tokens": self.tokens, "fisher_windows": self.windows,
                "gradient_seconds": self.gradient_seconds, "fisher_seconds": self.fisher_seconds,
                "memory": {"how": m.how, "device": str(m.device), "start_bytes": m.start, "peak_bytes": m.peak,
                           "above_start_bytes": m.above}}


def windows_of(batches: list[torch.Tensor], limit: int | None) -> list[torch.Tensor]:
    """Each eval window as a batch of one, the first `limit` of them (None: all)."""
    every = [batch[i: i + 1] for batch in batches for i in range(len(batch))]
    return every if limit is None else every[:limit]


def measure(model: nn.Module, batches: list[torch.Tensor], top_k: int = 16, fisher_windows: int | None = None,
            checkpoint: bool = False, probes=None) -> Measured:
    scores = Scores(model, top_k=top_k, probes=probes)
    device = next(model.parameters()).device
    windows = windows_of(batches, fisher_windows)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        loss = backward_pass(model, batches, scores.gradient, checkpoint)
        middle = time.perf_counter()
        for window in windows:
            backward_pass(model, [window], scores.fisher_consumer(window[:, 1:].numel(), len(windows)), checkpoint)
        end = time.perf_counter()
    tokens = sum(batch[:, 1:].numel() for batch in batches)
    return Measured(scores, loss, tokens, len(windows), middle - start, end - middle, memory)
