"""What flipping one bit of every element would do, and the first-order loss change it predicts.

    new = flipped(w, 30)                            # every element of w with bit 30 flipped (w's dtype)
    space = float_space("blocks.0.mlp.up.weight", w, g)          # or a quantized tensor's (its codes, scales)
    best = best_flips(space, space.bits("exponent"), k=8)        # g * (w_flipped - w), the 8 largest increases
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
from typing import Callable, Iterator

import numpy as np
import torch

from sensray.perturbations.bitflip import LAYOUTS
from sensray.perturbations.edits import as_bits

CHUNK = 2**22  # elements per step
# The bitflip kind's fields, reported separately: a float's, then a quantized code's (int8, nf4, 8-bit scales)
FIELDS = ("sign", "exponent_msb", "exponent", "mantissa", "magnitude_msb", "magnitude")


def flipped(w: torch.Tensor, bit: int) -> torch.Tensor:
    """`w` with `bit` flipped in every element (a new tensor of w's dtype)."""
    return _xor(as_bits(w), bit).view(w.dtype)


@dataclass
class FlipSpace:
    """A tensor's elements as flip candidates: the bits that store them, their values and d loss / d value.

    A float tensor stores each element in its own bits (`float_space`); quantized codes and statistics
    (sensray.quantized.gradients) store them as codes that a table and scales decode. Either way element i
    is `raw[i]`, worth `value(slice, raw[slice])[i - start]`, with gradient `grad[i]`.
    """

    name: str  # the canonical tensor
    format: str  # how its elements are stored: a dtype name, "int8", "nf4", "fp4", "index8"
    shape: tuple[int, ...]  # the logical elements (a flat index is into these)
    fields: dict[str, tuple[int, ...]]  # bitflip field -> its bit positions in this format
    raw: torch.Tensor  # flat: one integer per element holding its bits
    grad: torch.Tensor  # flat d loss / d value (any float dtype; widened a chunk at a time)
    value: Callable[[slice, torch.Tensor], torch.Tensor]  # (elements, their raw bits) -> values, float64
    statistic: bool = False  # a quantization statistic (a scale, a table), not a weight

    @property
    def numel(self) -> int:
        return len(self.raw)

    def bits(self, field_name: str | None = None, bit: int | None = None) -> tuple[int, ...]:
        """The bit positions a flip restriction allows here (a field this format lacks: none)."""
        if bit is not None:
            return (bit,) if bit in self.fields["any"] else ()
        return self.fields.get(field_name or "any", ())

    def chunks(self) -> Iterator["Chunk"]:
        for start in range(0, self.numel, CHUNK):
            where = slice(start, min(start + CHUNK, self.numel))
            raw = self.raw[where]
            yield Chunk(self, where, raw, self.value(where, raw), self.grad[where].double())


def float_space(name: str, w: torch.Tensor, g: torch.Tensor, statistic: bool = False) -> FlipSpace:
    """A float tensor (or view) with its gradient: bit b of element i is bit b of its IEEE value."""
    dtype = w.dtype
    return FlipSpace(name, str(dtype).removeprefix("torch."), tuple(w.shape), LAYOUTS[dtype],
                     as_bits(w.reshape(-1)), g.reshape(-1), lambda where, raw: raw.view(dtype).double(), statistic)


@dataclass
class Chunk:
    """Consecutive elements of a FlipSpace, their values and gradients widened to float64 once for all bits."""

    space: FlipSpace
    where: slice
    raw: torch.Tensor
    wide: torch.Tensor  # the values, float64
    g: torch.Tensor  # the gradient, float64

    @property
    def offset(self) -> int:
        return self.where.start

    def flipped(self, bit: int) -> torch.Tensor:
        """The values with `bit` flipped in every element, float64."""
        return self.space.value(self.where, _xor(self.raw, bit))


def _xor(raw: torch.Tensor, bit: int) -> torch.Tensor:
    signed = raw.dtype.is_signed and bit == torch.iinfo(raw.dtype).bits - 1
    return raw ^ ((1 << bit) - (1 << (bit + 1)) if signed else 1 << bit)  # a signed type's top bit is negative


def predicted(chunk: Chunk, bit: int, finite_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted loss change g * (new - old), new values), float64, for flipping `bit` of every element.
    A non-finite new value predicts +inf (or -inf, never chosen, with `finite_only`); a finite one a finite
    change, so g = 0 never meets an infinite step."""
    new = chunk.flipped(bit)
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


def best_flips(space: FlipSpace, bits: tuple[int, ...], k: int, finite_only: bool = False,
               exclude: set[tuple[int, int]] = frozenset()) -> TopFlips:
    """The k flips among `bits` of `space` with the largest predicted loss increase (chunked).
    `exclude`: (flat index, bit) pairs never to choose (e.g. flips already committed)."""
    top = TopFlips(k + len(exclude))
    for chunk in space.chunks():
        for bit in bits:
            top.add(offer(chunk, bit, top.k, finite_only))
    if exclude:
        top.keep(np.array([(int(i), int(b)) not in exclude for i, b in zip(top.index, top.bit)], dtype=bool))
    top.keep(slice(0, k))
    top.k = k
    return top
