"""Perplexity and agreement with the unperturbed model, on fixed token batches.

    nll            token-weighted mean negative log-likelihood (nats), ppl = exp(nll)
    kl             mean over positions of KL(baseline || perturbed) of the next-token distributions
    top1_agreement share of positions whose argmax prediction equals the baseline's
                   (KL and top-1 use every position of a window, the NLL every position with a target)
    nonfinite      a position's logits hold NaN or +inf (found through the row max, which propagates
                   both): then nll = ppl = kl = inf. A result, never a crash.

The baseline's log-probabilities are computed once per replica and kept on the model's
device (tokens x vocab floats, twice: log-probabilities and probabilities), so every trial compares
against the same reference without recomputing it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sensray.prefix import PrefixCache


@dataclass
class Reference:
    """The unperturbed model's predictions on the eval batches."""

    logprobs: list[torch.Tensor]  # per batch: (batch, seq, vocab)
    probs: list[torch.Tensor]  # per batch: exp(logprobs), kept so each trial's KL needs no exp pass
    top1: list[torch.Tensor]  # per batch: (batch, seq)


@dataclass(frozen=True)
class Scores:
    nll: float
    ppl: float
    kl: float | None
    top1_agreement: float | None
    nonfinite: bool
    tokens: int


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    # (batch, seq, vocab), contiguous, float32 for a stable softmax. Every position is kept: the
    # last one has no target for the NLL but its prediction still counts for KL and top-1.
    return model(input_ids=batch, use_cache=False).logits.float()


@torch.inference_mode()
def reference(model: nn.Module, batches: list[torch.Tensor]) -> Reference:
    logprobs, top1 = [], []
    for batch in batches:
        logits = _logits(model, batch)
        logprobs.append(F.log_softmax(logits, dim=-1))
        top1.append(logits.argmax(dim=-1))
    return Reference(logprobs, [lp.exp() for lp in logprobs], top1)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: list[torch.Tensor],
    ref: Reference | None = None,
    prefix: PrefixCache | None = None,
    start: int = 0,
    stop: Callable[[int, Scores], bool] | None = None,
) -> Scores:
    """Scores on `batches`; with `prefix`, blocks before `start` replay their baseline outputs.

    `stop(batches_done, partial_scores)` is asked after each batch (early stopping): when it says
    True the remaining batches are skipped and the scores cover the batches evaluated.
    """
    totals = _Totals(has_ref=ref is not None)
    for i, batch in enumerate(batches):
        with prefix.resume_at(start, i) if prefix is not None else contextlib.nullcontext():
            logits = _logits(model, batch)
        # One pass gives the argmax and, since max propagates NaN and +inf, whether a row is finite.
        top, top1 = logits.max(dim=-1)  # (batch, seq) each
        finite = torch.isfinite(top)
        totals.nonfinite |= not bool(finite.all())
        logprobs = F.log_softmax(logits, dim=-1)
        del logits  # the largest buffers of a trial are (batch, seq, vocab): keep at most two alive
        targets = batch[:, 1:, None]
        totals.nll_sum -= float(logprobs[:, :-1].gather(-1, targets).sum())
        totals.tokens += targets.numel()
        totals.positions += top1.numel()
        if ref is not None:
            # KL(ref || p) = sum p_ref * (logp_ref - logp), the difference taken per element (in place)
            # so a tiny KL is not lost to cancellation between two large sums.
            totals.kl_sum += float(torch.dot(ref.probs[i].view(-1), logprobs.neg_().add_(ref.logprobs[i]).view(-1)))
            totals.agree += int(((top1 == ref.top1[i]) & finite).sum())
        if stop is not None and i + 1 < len(batches) and stop(i + 1, totals.scores()):
            break
    return totals.scores()


@dataclass
class _Totals:
    """Running sums over the batches evaluated so far."""

    has_ref: bool
    nll_sum: float = 0.0
    kl_sum: float = 0.0
    agree: int = 0
    tokens: int = 0
    positions: int = 0
    nonfinite: bool = False

    def scores(self) -> Scores:
        if self.nonfinite:
            nll = kl = math.inf
        else:
            nll, kl = self.nll_sum / self.tokens, self.kl_sum / self.positions
        return Scores(
            nll=nll,
            ppl=math.exp(nll) if nll < 709 else math.inf,  # exp overflows a double past ~709
            kl=kl if self.has_ref else None,
            top1_agreement=self.agree / self.positions if self.has_ref else None,
            nonfinite=self.nonfinite,
            tokens=self.tokens,
        )
