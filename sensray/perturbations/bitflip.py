"""Bit flips on the raw bits of float32, float16 and bfloat16 weights.

    space:
      target: {each: "blocks.*"}
      field: {grid_search: [sign, exponent_msb, exponent, mantissa]}   # or bit: 30
      count: 1                                                         # or rate: 1.0e-6
      seed: {grid_search: [0, 1, 2]}

Flips XOR the integer view of the weights (no arithmetic, so a flip into NaN or inf is
exactly what the hardware fault would give). Which elements and bits flip is drawn by a
NumPy PCG64 stream keyed by the trial's seed, target and field (or bit): the same trial picks
the same elements on any machine and device, and different targets or fields draw independently.
Only the touched elements' original bits are saved.
"""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from sensray.perturbations.base import (
    BITS_DTYPE,
    Edits,
    ParamError,
    Params,
    Perturbation,
    keyed_rng,
    register,
    seed_field,
    tensors_of,
)

# Bit positions of each field, least significant bit = 0.
LAYOUTS: dict[torch.dtype, dict[str, tuple[int, ...]]] = {
    torch.float32: {"mantissa": tuple(range(0, 23)), "exponent": tuple(range(23, 31)), "sign": (31,)},
    torch.float16: {"mantissa": tuple(range(0, 10)), "exponent": tuple(range(10, 15)), "sign": (15,)},
    torch.bfloat16: {"mantissa": tuple(range(0, 7)), "exponent": tuple(range(7, 15)), "sign": (15,)},
}
for _layout in LAYOUTS.values():
    _layout["exponent_msb"] = (_layout["exponent"][-1],)
    _layout["any"] = tuple(range(len(_layout["mantissa"]) + len(_layout["exponent"]) + 1))

MAX_FLIPS = 10_000_000  # per trial
Field_ = Literal["sign", "exponent", "exponent_msb", "mantissa", "any"]


class BitflipParams(Params):
    bit: Optional[int] = Field(None, ge=0, description="bit position, 0 = least significant")
    field: Optional[Field_] = Field(None, description="flip a random bit of this field")
    count: Optional[int] = Field(None, ge=1, description="flips per trial (default 1)")
    rate: Optional[float] = Field(None, gt=0, le=1, description="bit-error rate over the field's bits")
    coords: Optional[list[list[int]]] = Field(None, description="explicit element coordinates (one tensor)")
    seed: int = seed_field("with target and field, draws which elements and bits flip")

    @model_validator(mode="after")
    def _consistent(self) -> "BitflipParams":
        if (self.bit is None) == (self.field is None):
            raise ValueError("give exactly one of 'bit' (a position) or 'field' (sign/exponent/exponent_msb/mantissa/any)")
        if sum(x is not None for x in (self.count, self.rate, self.coords)) > 1:
            raise ValueError("give at most one of 'count', 'rate', 'coords'")
        if self.coords is not None and self.bit is None:
            raise ValueError("'coords' flips a given 'bit' at given elements; set 'bit'")
        return self


def bit_positions(dtype: torch.dtype, params: BitflipParams) -> tuple[int, ...]:
    return (params.bit,) if params.bit is not None else LAYOUTS[dtype][params.field]


@register
class Bitflip(Perturbation):
    name = "bitflip"
    summary = "flip bits (a position or a field: sign/exponent/exponent_msb/mantissa) of k seeded elements, or at a bit-error rate"
    Params = BitflipParams

    @classmethod
    def check(cls, model: nn.Module, params: BitflipParams):
        selection = cls.select(model, params)
        refs = selection.tensors
        for ref in refs:
            dtype = model.get_parameter(ref.param).dtype
            if dtype not in LAYOUTS:
                raise ParamError("target", f"{ref.name} is stored as {dtype}; bitflip supports float32, float16, bfloat16")
            width = torch.iinfo(BITS_DTYPE[dtype]).bits
            if params.bit is not None and params.bit >= width:
                raise ParamError("bit", f"bit {params.bit} is past the width of {ref.name} ({dtype}: bits 0-{width - 1})")
        if params.coords is not None:
            cls._check_coords(model, params, refs)
        cls._check_flips(model, params, refs)
        return selection

    @classmethod
    def _check_flips(cls, model, params, refs) -> None:
        """At most MAX_FLIPS per trial: every flip is saved, described in the row, and drawn without
        replacement (a rate of 1 on a 7B model would be 10^11 of them)."""
        dtype = model.get_parameter(refs[0].param).dtype
        slots = sum(ref.resolve(model).numel() for ref in refs) * len(bit_positions(dtype, params))
        flips = slots * params.rate if params.rate is not None else min(params.count or 1, slots)
        if flips > MAX_FLIPS:
            what = f"rate {params.rate:g} of {slots:,} bits" if params.rate is not None else f"count {params.count:,}"
            raise ParamError("rate" if params.rate is not None else "count",
                             f"{what} is {flips:,.0f} flips per trial; at most {MAX_FLIPS:,}")

    @classmethod
    def _check_coords(cls, model, params, refs) -> None:
        if len(refs) != 1:
            raise ParamError("target", f"'coords' needs a target with one tensor; {params.target!r} has {len(refs)}")
        shape = tuple(refs[0].resolve(model).shape)
        for coord in params.coords:
            if len(coord) != len(shape) or not all(0 <= c < n for c, n in zip(coord, shape)):
                raise ParamError("coords", f"{coord} is outside {refs[0].name} of shape {list(shape)}")

    @classmethod
    def perturb(cls, model: nn.Module, params: BitflipParams, edits: Edits) -> None:
        named = tensors_of(model, cls.select(model, params))
        if params.coords is not None:
            name, tensor = named[0]
            elements = np.ravel_multi_index(np.array(params.coords).T, tensor.shape)
            _flip(edits, name, tensor, elements, np.full(len(elements), params.bit))
            return
        for i, (elements, bits) in choose([t for _, t in named], params).items():
            _flip(edits, *named[i], elements, bits)


def choose(tensors: list[torch.Tensor], params: BitflipParams) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Seeded choice of (element, bit) pairs, spread uniformly over all the selected tensors' bits.

    Returns, per tensor index, flat element indices and the bit flipped at each (an element
    may appear twice with different bits: both bits flip).
    """
    positions = np.array(bit_positions(tensors[0].dtype, params))
    sizes = np.array([t.numel() for t in tensors], dtype=np.int64)
    slots = int(sizes.sum()) * len(positions)
    rng = keyed_rng(params.seed, "bitflip", params.target, params.field if params.bit is None else params.bit)
    k = int(rng.binomial(slots, params.rate)) if params.rate is not None else min(params.count or 1, slots)
    picked = np.sort(rng.choice(slots, size=k, replace=False)) if k else np.empty(0, dtype=np.int64)
    element, bit = np.divmod(picked, len(positions))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.searchsorted(offsets, element, side="right") - 1
    return {
        int(i): (element[owner == i] - offsets[i], positions[bit[owner == i]])
        for i in np.unique(owner)
    }


def _flip(edits: Edits, name: str, tensor: torch.Tensor, elements: np.ndarray, bits: np.ndarray) -> None:
    """XOR the chosen bits of the chosen flat elements of `tensor` (any strides) in place."""
    width = torch.iinfo(BITS_DTYPE[tensor.dtype]).bits
    unique, inverse = np.unique(elements, return_inverse=True)
    masks = np.zeros(len(unique), dtype=np.int64)
    np.bitwise_or.at(masks, inverse, np.left_shift(np.int64(1), bits.astype(np.int64)))
    masks = np.where(masks >= 1 << (width - 1), masks - (1 << width), masks)  # as signed ints of that width
    raw, index = edits.elements(tensor, name, unique)
    raw.index_put_(index, raw[index] ^ torch.as_tensor(masks, dtype=raw.dtype, device=raw.device))
