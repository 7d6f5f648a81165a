"""Candidate edits from one gradient: GCG's sampled swaps and HotFlip's best-ranked ones (driver side, no model).

    allowed = allowed_tokens(tokenizer, rows=grad.shape[1], allow_non_ascii=False)
    edits = propose_gcg(grad, ids, allowed, positions, top_k=256, count=512, rng=keyed_rng(seed, ...))
    edits = propose_hotflip(grad, ids, allowed, positions, count=16)
    edits = edits[retokenizes(tokenizer, edits)]

GCG (Zou et al. 2023): per position the top-k tokens by -gradient (the largest first-order loss
decrease); each candidate swaps one position drawn uniformly for one of its top-k drawn uniformly.
HotFlip (Ebrahimi et al. 2018): every single swap ranked by its first-order change
grad[p, v] - grad[p, current], the `count` best taken in order; no randomness. Both drop
swaps that change nothing and duplicates. The exact losses decide (sensray.adversarial.objective).

Which positions may change: every suffix position; for a substitution with budget k, any prompt
position while fewer than k differ from the original, and then only those k (a changed position
may also go back to its original token).
"""

from __future__ import annotations

import numpy as np
import torch


def allowed_tokens(tokenizer, rows: int, allow_non_ascii: bool) -> torch.Tensor:
    """(rows,) bool: tokens a swap may use. Never special tokens, ids the tokenizer does not know (padding
    rows of the embedding), or tokens that decode to nothing; unless allowed, only printable ASCII
    (nanoGCG's default: attacks that survive being typed)."""
    known = min(rows, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(known)])
    special = set(tokenizer.all_special_ids)
    ok = torch.zeros(rows, dtype=torch.bool)
    for i, text in enumerate(texts):
        ok[i] = i not in special and bool(text) and (allow_non_ascii or (text.isascii() and text.isprintable()))
    return ok


def positions(ids: list[int], original: tuple[int, ...] | None, budget: int) -> list[int]:
    """The positions a swap may change (see the module docstring)."""
    if original is None:
        return list(range(len(ids)))
    changed = [p for p, (now, was) in enumerate(zip(ids, original)) if now != was]
    return changed if len(changed) >= budget else list(range(len(ids)))


def _scores(grad: torch.Tensor, allowed: torch.Tensor, where: list[int], original) -> torch.Tensor:
    """(E, V) first-order scores (lower is better); +inf where a swap is not allowed."""
    scores = grad.clone()
    scores[:, ~allowed] = torch.inf
    blocked = torch.ones(len(grad), dtype=torch.bool)
    blocked[where] = False
    scores[blocked] = torch.inf
    if original is not None:  # going back to the original token is always allowed
        for p in where:
            scores[p, original[p]] = grad[p, original[p]]
    return scores


def propose_gcg(grad: torch.Tensor, ids: list[int], allowed: torch.Tensor, where: list[int], top_k: int,
                count: int, rng: np.random.Generator, original=None) -> torch.Tensor:
    """(n, E) candidates, n <= count: one swap each, a uniform position and one of its top-k tokens."""
    scores = _scores(grad, allowed, where, original)
    k = min(top_k, int(torch.isfinite(scores[where]).sum(-1).min()))
    if k == 0:
        return torch.empty((0, len(ids)), dtype=torch.long)
    top = (-scores).topk(k, dim=-1).indices  # (E, k), best first
    pos = rng.choice(np.array(where), size=count)
    rank = rng.integers(0, k, size=count)
    edits = torch.tensor(ids, dtype=torch.long).repeat(count, 1)
    edits[torch.arange(count), torch.from_numpy(pos)] = top[torch.from_numpy(pos), torch.from_numpy(rank)]
    return distinct(edits, ids)


def propose_hotflip(grad: torch.Tensor, ids: list[int], allowed: torch.Tensor, where: list[int], count: int,
                    original=None) -> torch.Tensor:
    """(n, E) candidates, n <= count: the single swaps with the best first-order scores, best first."""
    current = torch.tensor(ids, dtype=torch.long)
    scores = _scores(grad, allowed, where, original) - grad.gather(1, current[:, None])
    scores[torch.arange(len(ids)), current] = torch.inf  # no-op swaps
    best = scores.flatten().topk(min(count, scores.numel()), largest=False)
    picks = best.indices[torch.isfinite(best.values)]
    edits = current.repeat(len(picks), 1)
    edits[torch.arange(len(picks)), picks // scores.shape[1]] = picks % scores.shape[1]
    return edits


def distinct(edits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The rows of `edits` that differ from `ids`, each once, in first-seen order."""
    seen, keep = {tuple(ids)}, []
    for i, row in enumerate(edits.tolist()):
        if tuple(row) not in seen:
            seen.add(tuple(row))
            keep.append(i)
    return edits[keep]


def retokenizes(tokenizer, edits: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the edit's text encodes back to the same tokens, so the string reported *is* the attack."""
    if len(edits) == 0:
        return torch.zeros(0, dtype=torch.bool)
    texts = tokenizer.batch_decode(edits.tolist())
    again = tokenizer(texts, add_special_tokens=False).input_ids
    return torch.tensor([back == row for back, row in zip(again, edits.tolist())], dtype=torch.bool)
