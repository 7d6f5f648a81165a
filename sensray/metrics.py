"""Perplexity and agreement with the unperturbed model, on fixed token batches.

    nll            token-weighted mean negative log-likelihood (nats), ppl = exp(nll)
    kl             mean over tokens of KL(baseline || perturbed) of the next-token distributions
    top1_agreement share of tokens whose argmax prediction equals the baseline's
    nonfinite      any logit is NaN or inf: then nll = ppl = kl = inf. A result, never a crash.

The baseline's log-probabilities are computed once per replica and kept on the model's
device (tokens x vocab floats), so every trial compares against the same reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Reference:
    """The unperturbed model's predictions on the eval batches."""

    logprobs: list[torch.Tensor]  # per batch: (batch, seq-1, vocab)
    top1: list[torch.Tensor]  # per batch: (batch, seq-1)


@dataclass(frozen=True)
class Scores:
    nll: float
    ppl: float
    kl: float | None
    top1_agreement: float | None
    nonfinite: bool
    tokens: int


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    # (batch, seq, vocab) -> predictions for tokens 1..seq-1, in float32 for stable softmax.
    out = model(input_ids=batch, use_cache=False).logits
    return out[:, :-1].float()


@torch.inference_mode()
def reference(model: nn.Module, batches: list[torch.Tensor]) -> Reference:
    logprobs, top1 = [], []
    for batch in batches:
        logits = _logits(model, batch)
        logprobs.append(F.log_softmax(logits, dim=-1))
        top1.append(logits.argmax(dim=-1))
    return Reference(logprobs, top1)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: list[torch.Tensor], ref: Reference | None = None) -> Scores:
    nll_sum = kl_sum = 0.0
    agree = tokens = 0
    nonfinite = False
    for i, batch in enumerate(batches):
        logits = _logits(model, batch)
        targets = batch[:, 1:]
        finite = torch.isfinite(logits).all(dim=-1)  # (batch, seq-1)
        nonfinite |= not bool(finite.all())
        logprobs = F.log_softmax(logits, dim=-1)
        nll_sum += float(F.nll_loss(logprobs.flatten(0, 1), targets.flatten(), reduction="sum"))
        tokens += targets.numel()
        if ref is not None:
            kl_sum += float(F.kl_div(logprobs, ref.logprobs[i], log_target=True, reduction="sum"))
            agree += int(((logits.argmax(dim=-1) == ref.top1[i]) & finite).sum())
    if nonfinite:
        nll = kl = math.inf
    else:
        nll, kl = nll_sum / tokens, kl_sum / tokens
    return Scores(
        nll=nll,
        ppl=math.exp(nll) if nll < 709 else math.inf,  # exp overflows a double past ~709
        kl=kl if ref is not None else None,
        top1_agreement=agree / tokens if ref is not None else None,
        nonfinite=nonfinite,
        tokens=tokens,
    )
