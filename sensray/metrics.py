"""Perplexity and agreement with the unperturbed model, on fixed token batches.

    nll            token-weighted mean negative log-likelihood (nats), ppl = exp(nll)
    kl             mean over positions of KL(baseline || perturbed) of the next-token distributions
    top1_agreement share of positions whose argmax prediction equals the baseline's
    seq_nll        per eval sequence, its mean NLL (nats/token), in batch order: what a bootstrap over
                   sequences resamples for an interval on ppl (None once any logit is non-finite)
                   (KL and top-1 use every position of a window, the NLL every position with a target)
    nonfinite      a position's logits hold NaN or +inf (found through the row max, which propagates
                   both): then nll = ppl = kl = inf. A result, never a crash.

Exactness. The model's logits are float32; everything computed from them is float64, and every
sum over positions is `math.fsum` (exactly rounded, so independent of order, threads and executor).
KL is not taken as a difference of two log-softmaxes, which cancels catastrophically when the
perturbation is small (float32 gave negative KLs and 1e-4 relative errors). With d = z_ref - z per
position (exact in float64), c = sum_v p_ref d and d' = d - c:

    KL  = log1p(S),   S = sum_v p_ref * (exp(-d') - 1 + d')      every term >= 0: no cancellation
    LSE(z) = LSE(z_ref) - c + KL                                  so the NLL needs no log-softmax

(derivation: sum_v exp(z) = exp(LSE_ref) * sum_v p_ref * exp(-d), and sum_v p_ref * d' = 0). A row whose
logits moved up by more than ~700 nats somewhere overflows exp; it takes the log-sum-exp route instead.
The work is done in row chunks that fit in cache, so float64 costs little more than float32 did.

The baseline's logits and probabilities (float32: 8 bytes per logit, as before) and log-sum-exps
(float64) are computed once per replica and kept on the model's device. Rounding p_ref to float32
costs nothing in accuracy: every term of S is >= 0, so a relative error of 6e-8 in p is one of
6e-8 in KL, and the identities above hold to first order for any p that sums to 1 within 1e-7.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from sensray.prefix import PrefixCache

CPU_CHUNK = 2**17  # float64 elements per row chunk on a CPU: 1 MiB buffers, cache-resident
GPU_CHUNK = 2**25  # on a GPU: fewer, larger kernels
OVERFLOW = 700.0  # exp(x) overflows a double past ~709


@dataclass
class Reference:
    """The unperturbed model's predictions on the eval batches."""

    logits: list[torch.Tensor]  # per batch: (batch, seq, vocab) float32
    probs: list[torch.Tensor]  # per batch: (batch, seq, vocab) float32, softmax of logits (rounded once)
    lse: list[torch.Tensor]  # per batch: (batch, seq) float64, log-sum-exp of logits
    top1: list[torch.Tensor]  # per batch: (batch, seq)


@dataclass(frozen=True)
class Scores:
    nll: float
    ppl: float
    kl: float | None
    top1_agreement: float | None
    nonfinite: bool
    tokens: int
    seq_nll: tuple[float, ...] | None = None


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    # (batch, seq, vocab), contiguous, float32. Every position is kept: the last one has no target
    # for the NLL but its prediction still counts for KL and top-1.
    return model(input_ids=batch, use_cache=False).logits.float()


def _step(flat: torch.Tensor) -> int:
    """Rows per chunk of the float64 work on (rows, vocab) logits."""
    return max(1, (GPU_CHUNK if flat.device.type == "cuda" else CPU_CHUNK) // flat.shape[-1])


@torch.inference_mode()
def reference(model: nn.Module, batches: list[torch.Tensor]) -> Reference:
    logits, probs, lse, top1 = [], [], [], []
    for batch in batches:
        z = _logits(model, batch)
        flat = z.reshape(-1, z.shape[-1])
        p = torch.empty(flat.shape, dtype=torch.float32, device=z.device)
        row_lse = torch.empty(flat.shape[0], dtype=torch.float64, device=z.device)
        for s in range(0, flat.shape[0], _step(flat)):
            chunk = flat[s: s + _step(flat)].double()
            e = s + len(chunk)
            row_lse[s:e] = torch.logsumexp(chunk, -1)
            p[s:e] = chunk.sub_(row_lse[s:e, None]).exp_()
        logits.append(z)
        probs.append(p.view(z.shape))
        lse.append(row_lse.view(z.shape[:-1]))
        top1.append(z.argmax(dim=-1))
    return Reference(logits, probs, lse, top1)


def row_lse_kl(z: torch.Tensor, ref: Reference | None, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per position (flattened): the log-sum-exp of the logits `z`, and KL(ref || softmax(z)) (float64)."""
    flat = z.reshape(-1, z.shape[-1])
    rows, step = flat.shape[0], _step(flat)
    lse = torch.empty(rows, dtype=torch.float64, device=z.device)
    if ref is None:
        for s in range(0, rows, step):
            lse[s: s + step] = torch.logsumexp(flat[s: s + step].double(), -1)
        return lse, None
    kl = torch.empty_like(lse)
    zr, p, lse_ref = ref.logits[i].view(flat.shape), ref.probs[i].view(flat.shape), ref.lse[i].view(-1)
    d = torch.empty((min(step, rows), flat.shape[1]), dtype=torch.float64, device=z.device)
    g = torch.empty_like(d)
    for s in range(0, rows, step):
        e = min(rows, s + step)
        dd, gg, pp = d[: e - s], g[: e - s], p[s:e]
        dd.copy_(zr[s:e]).sub_(flat[s:e])  # d = z_ref - z, exact in float64
        c = torch.mul(pp, dd, out=gg).sum(-1)
        dd.sub_(c[:, None])  # d' = d - c: sum_v p d' = 0
        torch.neg(dd, out=gg).expm1_().add_(dd).mul_(pp)  # p * (exp(-d') - 1 + d') >= 0
        kl[s:e] = torch.log1p(gg.sum(-1))
        steep = (dd.amin(-1) < -OVERFLOW).nonzero().flatten()
        if len(steep):  # exp(-d') overflowed: log sum_v p exp(-d') as a log-sum-exp of log p - d'
            log_p = zr[s:e][steep].double() - lse_ref[s:e][steep, None]
            kl[s + steep] = torch.logsumexp(log_p - dd[steep], -1)
        lse[s:e] = lse_ref[s:e] - c + kl[s:e]
    return lse, kl


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
        totals.tokens += batch[:, 1:].numel()
        totals.positions += top1.numel()
        if ref is not None:
            totals.agree += int(((top1 == ref.top1[i]) & finite).sum())
        if not bool(finite.all()):
            totals.nonfinite = True  # nll and kl are inf: nothing more to compute for them
        elif not totals.nonfinite:
            lse, kl = row_lse_kl(logits, ref, i)
            seq = batch.shape[1]
            target_logit = logits[:, :-1].gather(-1, batch[:, 1:, None]).squeeze(-1)  # (batch, seq - 1)
            nll = lse.view(-1, seq)[:, :-1] - target_logit.double()
            totals.nll_terms.append(math.fsum(nll.flatten().tolist()))
            totals.seq_nll.extend(math.fsum(row) / len(row) for row in nll.tolist())
            if kl is not None:
                totals.kl_terms.append(math.fsum(kl.tolist()))
        del logits
        if stop is not None and i + 1 < len(batches) and stop(i + 1, totals.scores()):
            break
    return totals.scores()


@dataclass
class _Totals:
    """Running sums over the batches evaluated so far."""

    has_ref: bool
    nll_terms: list[float] = field(default_factory=list)  # per batch: exact sums, added exactly at the end
    kl_terms: list[float] = field(default_factory=list)
    seq_nll: list[float] = field(default_factory=list)  # per sequence, kept apart so nll stays one exact sum
    agree: int = 0
    tokens: int = 0
    positions: int = 0
    nonfinite: bool = False

    def scores(self) -> Scores:
        if self.nonfinite:
            nll = kl = math.inf
        else:
            nll, kl = math.fsum(self.nll_terms) / self.tokens, math.fsum(self.kl_terms) / self.positions
        return Scores(
            nll=nll,
            ppl=math.exp(nll) if nll < 709 else math.inf,  # exp overflows a double past ~709
            kl=kl if self.has_ref else None,
            top1_agreement=self.agree / self.positions if self.has_ref else None,
            nonfinite=self.nonfinite,
            tokens=self.tokens,
            seq_nll=None if self.nonfinite else tuple(self.seq_nll),
        )
