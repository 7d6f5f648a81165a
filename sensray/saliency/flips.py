"""What flipping one bit of every element would do, and the first-order loss change it predicts.

    new = flipped(w, 30)                            # every element of w with bit 30 flipped (w's dtype)
    best = best_flips(w, g, bits_of(w.dtype, "exponent"), k=8)   # g * (w_flipped - w), the 8 largest increases
    best.rows()                                     # index, bit, old, new, grad, predicted

A flip is an XOR of the integer view (as sensray.perturbations.bitflip does it), so the flipped value
is exactly what a trial of that flip writes. The predicted change of the loss is g * (new - old), in
float64 (an exponent flip moves a weight by up to 2^128 of itself, past float32's range). A flip
whose new value is inf or NaN has no first-order meaning: it is predicted +inf (such a weight
turns the model's outputs non-finite), or left out when only finite flips are wanted.

Choosing only flips with g * (new - old) > 0 is BFA's rule "flip a bit only when the gradient's sign
says the change raises the loss" (Rakin et al. 2019), applied exactly rather than per bit value.
Work is done in chunks of CHUNK elements, so a 7B embedding needs a few MiB at a time, not GiBs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from sensray.perturbations.bitflip import LAYOUTS
from sensray.perturbations.edits import as_bits

CHUNK = 2**22  # elements per step
FIELDS = ("sign", "exponent_msb", "exponent", "mantissa")  # the bitflip kind's fields, reported separately


def bits_of(dtype: torch.dtype, field_name: str | None = None, bit: int | None = None) -> tuple[int, ...]:
    """The bit positions a flip restriction allows in `dtype` (a field of the bitflip kind, or one bit)."""
    if bit is not None:
        return (bit,) if bit < torch.finfo(dtype).bits else ()
    return LAYOUTS[dtype][field_name or "any"]


def flipped(w: torch.Tensor, bit: int) -> torch.Tensor:
    """`w` with `bit` flipped in every element (a new tensor of w's dtype)."""
    raw = as_bits(w)
    width = torch.iinfo(raw.dtype).bits
    mask = (1 << bit) - (1 << width) if bit == width - 1 else 1 << bit  # the sign bit as a signed int
    return (raw ^ mask).view(w.dtype)


@dataclass
class Chunk:
    """Part of a flat tensor and its gradient, widened to float64 once for all its bits."""

    w: torch.Tensor  # the weights' own dtype: what gets flipped
    wide: torch.Tensor  # w as float64
    g: torch.Tensor  # the gradient as float64
    offset: int = 0  # flat index of its first element

    @classmethod
    def of(cls, w: torch.Tensor, g: torch.Tensor, offset: int = 0) -> "Chunk":
        return cls(w, w.double(), g.double(), offset)


def chunks(w: torch.Tensor, g: torch.Tensor) -> Iterator[Chunk]:
    for start in range(0, w.numel(), CHUNK):
        yield Chunk.of(w[start: start + CHUNK], g[start: start + CHUNK], start)


def predicted(chunk: Chunk, bit: int, finite_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted loss change g * (new - old), new values), float64, for flipping `bit` of every element.
    A non-finite new value predicts +inf (or -inf, never chosen, with `finite_only`); a finite one a finite
    change, so g = 0 never meets an infinite step."""
    new = flipped(chunk.w, bit).double()
    change = chunk.g * (new - chunk.wide)
    broken = torch.tensor(-np.inf if finite_only else np.inf, dtype=torch.float64, device=new.device)
    return torch.where(torch.isfinite(new), change, broken), new


Offer = tuple[np.ndarray, ...]  # score, index, bit, old, new, grad of the flips one bit of one chunk offers


def offer(chunk: Chunk, bit: int, k: int, finite_only: bool = False) -> Offer | None:
    """The k flips of `bit` in this chunk with the largest predicted increase (only increases), or None."""
    change, new = predicted(chunk, bit, finite_only)
    score, where = torch.topk(change, min(k, change.numel()))
    where = where[score > 0]
    if not len(where):
        return None
    return (change[where].cpu().numpy(), where.cpu().numpy() + chunk.offset, np.full(len(where), bit),
            chunk.wide[where].cpu().numpy(), new[where].cpu().numpy(), chunk.g[where].cpu().numpy())


COLUMNS = ("score", "index", "bit", "old", "new", "grad")


@dataclass
class TopFlips:
    """The k flips with the largest predicted loss increase seen so far (flat index, bit, values)."""

    k: int
    score: np.ndarray = field(default_factory=lambda: np.empty(0))
    index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    bit: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    old: np.ndarray = field(default_factory=lambda: np.empty(0))
    new: np.ndarray = field(default_factory=lambda: np.empty(0))
    grad: np.ndarray = field(default_factory=lambda: np.empty(0))

    def add(self, offered: Offer | None) -> None:
        if offered is None:
            return
        for name, part in zip(COLUMNS, offered):
            setattr(self, name, np.concatenate([getattr(self, name), part]))
        self.keep(np.argsort(-self.score, kind="stable")[: self.k])

    def keep(self, which: np.ndarray) -> None:
        """Keep only the flips `which` selects (an index array or a boolean mask)."""
        for name in COLUMNS:
            setattr(self, name, getattr(self, name)[which])

    def rows(self) -> list[dict]:
        return [{"index": int(i), "bit": int(b), "old": float(o), "new": float(n), "grad": float(g),
                 "predicted": float(s)} for s, i, b, o, n, g in
                zip(self.score, self.index, self.bit, self.old, self.new, self.grad)]


def best_flips(w: torch.Tensor, g: torch.Tensor, bits: tuple[int, ...], k: int, finite_only: bool = False,
               exclude: set[tuple[int, int]] = frozenset()) -> TopFlips:
    """The k flips among `bits` of flat `w` with the largest predicted loss increase (chunked).
    `exclude`: (flat index, bit) pairs never to choose (e.g. flips already committed)."""
    top = TopFlips(k + len(exclude))
    for chunk in chunks(w, g):
        for bit in bits:
            top.add(offer(chunk, bit, top.k, finite_only))
    if exclude:
        top.keep(np.array([(int(i), int(b)) not in exclude for i, b in zip(top.index, top.bit)], dtype=bool))
    top.keep(slice(0, k))
    top.k = k
    return top
