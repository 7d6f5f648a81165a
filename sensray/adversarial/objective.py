"""What an attack measures on a resident model: exact losses of candidate inputs, and their gradient.

    problem = Problem(head=..., clean=(), after=(), target=..., objective="nll")
    losses(model, problem, edits)          # (B,) float64: the exact loss of each candidate edit
    gradient(model, problem, edit)         # (E, V): d loss / d one-hot of each edited position
    measure(model, problem, edit)          # nll, kl, exact match, top-1 agreement: one input, in full

An input is `head + edit + after + target`; the loss is scored on the target positions only (the
logits of the last len(target) + 1 positions are all that is computed). Every objective is a loss
to *minimise*: `target` is the target's mean NLL, `nll` minus the true continuation's mean NLL,
`kl` minus the mean KL(clean || attacked) of its next-token distributions, the clean input being
the case with the edit undone (`clean`: the original prompt tokens, or no suffix).

The one-hot gradient is taken through the embedding: with e = E[onehot] the edited positions'
input embeddings, d loss / d onehot = (d loss / d e) . E^T, E = model.get_input_embeddings().weight.
Differentiating the embeddings the model really computed (and projecting) is exact for any
embedding module, scaled ones included (a positive scale leaves every per-position ranking as it
is), and costs one (E, d) x (d, V) product instead of a (E, V) one-hot input. The weights are
frozen while it runs, so no weight gradient is computed or stored, whatever the model's size.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

CLEAN_CACHE = 64  # clean log-probs kept per replica (one per case being attacked)


@dataclass(frozen=True)
class Problem:
    """What a replica needs to score edits of one case (token ids; small, sent with every work item)."""

    head: tuple[int, ...]  # fixed tokens before the edit
    clean: tuple[int, ...]  # what the edit replaces: the original prompt tokens (substitute), () for a suffix
    after: tuple[int, ...]  # fixed tokens after the edit
    target: tuple[int, ...]  # scored tokens
    objective: str  # "target" | "nll" | "kl"


def inputs(problem: Problem, edits: torch.Tensor) -> torch.Tensor:
    """(B, E) edits -> (B, L) full inputs `head + edit + after + target`."""
    rows = edits.shape[0]
    fixed = lambda ids: torch.tensor(ids, dtype=torch.long, device=edits.device).expand(rows, -1)  # noqa: E731
    return torch.cat([fixed(problem.head), edits, fixed(problem.after + problem.target)], dim=1)


def prompt(problem: Problem, edit) -> list[int]:
    """The input without its target, `head + edit + after`: what a model continues (generation)."""
    return [*problem.head, *edit, *problem.after]


def _target_logprobs(model: nn.Module, problem: Problem, batch: dict) -> torch.Tensor:
    """(B, T, V) log-probabilities (float32 or wider) at the positions that predict the target tokens."""
    t = len(problem.target)
    if _keeps_logits(model):
        logits = model(**batch, use_cache=False, logits_to_keep=t + 1).logits[:, :t]
    else:  # a model whose forward cannot cut its logits (remote code): compute all, keep the last
        logits = model(**batch, use_cache=False).logits[:, -t - 1: -1]
    # At least float32 (a bf16 model's logits are upcast; a float64 model's stay exact).
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _keeps_logits(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def objective_loss(problem: Problem, logprobs: torch.Tensor, clean: torch.Tensor | None) -> torch.Tensor:
    """(B, T, V) log-probs -> (B,) loss to minimise."""
    if problem.objective == "kl":
        return -kl_divergence(clean, logprobs)
    nll = target_nll(problem, logprobs)
    return nll if problem.objective == "target" else -nll


def target_nll(problem: Problem, logprobs: torch.Tensor) -> torch.Tensor:
    """(B,) mean NLL (nats per token) of the target tokens."""
    target = torch.tensor(problem.target, device=logprobs.device)
    return -logprobs.gather(-1, target.expand(logprobs.shape[0], -1)[..., None]).squeeze(-1).mean(-1)


def kl_divergence(clean: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """(B,) mean over target positions of KL(clean || attacked); clean is (1, T, V)."""
    return (clean.exp() * (clean - logprobs)).sum(-1).mean(-1)


class Scorer:
    """The attack's computations on one resident model; caches the clean log-probs of each problem."""

    def __init__(self, model: nn.Module, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.device = next(model.parameters()).device
        self._clean: OrderedDict[Problem, torch.Tensor] = OrderedDict()

    def clean(self, problem: Problem) -> torch.Tensor:
        """(1, T, V) log-probs of the target positions on the clean input (computed once per problem)."""
        if problem not in self._clean:
            with torch.inference_mode():
                ids = inputs(problem, torch.tensor([problem.clean], dtype=torch.long, device=self.device))
                self._clean[problem] = _target_logprobs(self.model, problem, {"input_ids": ids})
            while len(self._clean) > CLEAN_CACHE:
                self._clean.popitem(last=False)
        self._clean.move_to_end(problem)
        return self._clean[problem]

    @torch.inference_mode()
    def losses(self, problem: Problem, edits: torch.Tensor) -> torch.Tensor:
        """(B, E) candidate edits -> (B,) float64 exact losses, in sub-batches of batch_size."""
        clean = self.clean(problem) if problem.objective == "kl" else None
        out = []
        for chunk in edits.to(self.device).split(self.batch_size):
            logprobs = _target_logprobs(self.model, problem, {"input_ids": inputs(problem, chunk)})
            out.append(objective_loss(problem, logprobs, clean).double().cpu())
        return torch.cat(out)

    def gradient(self, problem: Problem, edit: torch.Tensor) -> torch.Tensor:
        """(E,) edit -> (E, V) float32: d loss / d one-hot of each edited position (V: embedding rows)."""
        clean = self.clean(problem) if problem.objective == "kl" else None
        embedding = self.model.get_input_embeddings()
        ids = inputs(problem, edit.to(self.device)[None])
        start = len(problem.head)
        with frozen(self.model), torch.enable_grad():
            embeds = embedding(ids).detach().requires_grad_()  # (1, L, d)
            logprobs = _target_logprobs(self.model, problem, {"inputs_embeds": embeds})
            loss = objective_loss(problem, logprobs, clean).sum()
            (grad,) = torch.autograd.grad(loss, embeds)
        weight = embedding.weight.detach()  # (V, d)
        return (grad[0, start: start + len(edit)].to(weight.dtype) @ weight.T).float().cpu()

    @torch.inference_mode()
    def measure(self, problem: Problem, edit: torch.Tensor) -> dict:
        """One input in full: loss, target NLL, KL and top-1 agreement with the clean input, exact match."""
        clean = self.clean(problem)
        logprobs = _target_logprobs(self.model, problem, {"input_ids": inputs(problem, edit.to(self.device)[None])})
        top = logprobs.argmax(-1)[0]
        target = torch.tensor(problem.target, device=top.device)
        return {"loss": float(objective_loss(problem, logprobs, clean)[0]),
                "nll": float(target_nll(problem, logprobs)[0]),
                "kl": float(kl_divergence(clean, logprobs)[0]),
                "top1_agreement": float((top == clean.argmax(-1)[0]).double().mean()),
                "exact_match": bool((top == target).all())}


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Weights need no gradient while the input's is taken: none is computed, none is stored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
