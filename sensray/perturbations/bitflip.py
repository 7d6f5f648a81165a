"""Bit flips on the raw bits of weights: float32, float16 and bfloat16, and quantized storage.

    space:
      target: {each: "blocks.*"}
      field: {grid_search: [sign, exponent_msb, exponent, mantissa]}   # or bit: 30
      count: 1                                                         # or rate: 1.0e-6
      seed: {grid_search: [0, 1, 2]}

Flips XOR the integer view of the storage (no arithmetic, so a flip into NaN or inf is exactly
what the hardware fault would give). Which elements and bits flip is drawn by a NumPy PCG64
stream keyed by the trial's seed, target and field (or bit): the same trial picks the same
elements on any machine and device, and different targets or fields draw independently. Only the
touched storage units' original bits are saved.

Quantized models (model.quantization: int8, nf4, fp4) flip where bitsandbytes keeps the bits
(sensray/quantized): the codes (`blocks.3.mlp.down.weight`: int8, or 4-bit codes two per byte) and
the statistics (`...weight.scale`, `.scale2`, `.scale_offset`, `.scale_code`). A field names the
bits with that role in each format, and draws among the selected tensors that have it:

    float32 / float16 / bfloat16   sign, exponent, exponent_msb, mantissa, any
    int8 codes (two's complement)  sign (bit 7), magnitude (0-6), magnitude_msb (6), any
    nf4 codes                      sign (bit 3: the negative or non-negative half of the table),
                                   magnitude (0-2: the place within it), magnitude_msb (2), any
    fp4 codes                      sign (3), exponent (1-2), exponent_msb (2), mantissa (0), any
    8-bit scale codes (double quant)  as int8, over the sorted scale table's index

`role` is for comparing formats (experiments/bitflip-formats.yaml): it draws k weights of the
target's weight matrices, keyed by seed and target only (never by format or storage), and flips in
each the bit with that role in whatever format the model stores it: `sign`; `high` (the exponent's
top bit of a float, the highest magnitude bit of a code); `scale` (the exponent's top bit of the
float32 scale the weight is multiplied by: int8 its row's, 4-bit its block's, double-quantized
4-bit its 256 blocks' second-level scale). The same seed flips the same weights in every format
and every role.
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
    NotApplicable,
    ParamError,
    Params,
    Perturbation,
    keyed_rng,
    register,
    seed_field,
)
from sensray.quantized.elements import QUANTIZED_FIELDS, Elements, elements_of

# Bit positions of each field, least significant bit = 0.
LAYOUTS: dict[torch.dtype, dict[str, tuple[int, ...]]] = {
    torch.float32: {"mantissa": tuple(range(0, 23)), "exponent": tuple(range(23, 31)), "sign": (31,)},
    torch.float16: {"mantissa": tuple(range(0, 10)), "exponent": tuple(range(10, 15)), "sign": (15,)},
    torch.bfloat16: {"mantissa": tuple(range(0, 7)), "exponent": tuple(range(7, 15)), "sign": (15,)},
}
for _layout in LAYOUTS.values():
    _layout["exponent_msb"] = (_layout["exponent"][-1],)
    _layout["any"] = tuple(range(len(_layout["mantissa"]) + len(_layout["exponent"]) + 1))
# Every storage format's fields, by format name ("float32", "int8", "nf4", ...).
FIELDS = {str(dtype).removeprefix("torch."): layout for dtype, layout in LAYOUTS.items()} | QUANTIZED_FIELDS

MAX_FLIPS = 10_000_000  # per trial
Field_ = Literal["sign", "exponent", "exponent_msb", "mantissa", "magnitude", "magnitude_msb", "any"]
Role = Literal["sign", "high", "scale"]
SCALE_BIT = LAYOUTS[torch.float32]["exponent_msb"][0]  # every scale a role flips is float32


class BitflipParams(Params):
    bit: Optional[int] = Field(None, ge=0, description="bit position, 0 = least significant")
    field: Optional[Field_] = Field(None, description="flip a random bit of this field (of each storage format)")
    role: Optional[Role] = Field(None, description="flip the bit with this role (sign, high, scale) in k seeded "
                                                   "weights: the same weights in every storage format")
    count: Optional[int] = Field(None, ge=1, description="flips per trial (default 1)")
    rate: Optional[float] = Field(None, gt=0, le=1, description="bit-error rate over the field's bits")
    coords: Optional[list[list[int]]] = Field(None, description="explicit element coordinates (one tensor)")
    seed: int = seed_field("with target and field, draws which elements and bits flip")

    @model_validator(mode="after")
    def _consistent(self) -> "BitflipParams":
        if sum(x is not None for x in (self.bit, self.field, self.role)) != 1:
            raise ValueError("give exactly one of 'bit' (a position), 'field' (sign/exponent/exponent_msb/mantissa/"
                             "magnitude/magnitude_msb/any) or 'role' (sign/high/scale)")
        if sum(x is not None for x in (self.count, self.rate, self.coords)) > 1:
            raise ValueError("give at most one of 'count', 'rate', 'coords'")
        if self.coords is not None and self.bit is None:
            raise ValueError("'coords' flips a given 'bit' at given elements; set 'bit'")
        if self.role is not None and self.rate is not None:
            raise ValueError("'role' flips 'count' drawn weights; a 'rate' has no role to spread over")
        return self


def bit_positions(dtype: torch.dtype, params: BitflipParams) -> tuple[int, ...]:
    return (params.bit,) if params.bit is not None else LAYOUTS[dtype][params.field]


def positions(target: Elements | torch.Tensor, params: BitflipParams) -> tuple[int, ...]:
    """The bits a trial may flip in each element of `target` (none when its format lacks the field)."""
    if params.bit is not None:
        return (params.bit,)
    fmt = target.format if isinstance(target, Elements) else str(target.dtype).removeprefix("torch.")
    return FIELDS[fmt].get(params.field, ())


@register
class Bitflip(Perturbation):
    name = "bitflip"
    summary = ("flip bits (a position, a field: sign/exponent/exponent_msb/mantissa, or a role across formats) of "
               "k seeded elements, or at a bit-error rate; float and quantized storage")
    Params = BitflipParams
    quantized = None  # codes and statistics are flipped where bitsandbytes keeps them

    @classmethod
    def check(cls, model: nn.Module, params: BitflipParams):
        selection = cls.select(model, params)
        targets = [elements_of(model, ref) for ref in selection.tensors]
        if params.role is not None:
            role_flips(targets, params)  # raises for a role the storage lacks
            return selection
        if params.bit is not None:
            _check_bit(targets, params)
        elif not any(positions(t, params) for t in targets):
            raise ParamError("field", f"{params.target!r} has no {params.field!r} bits: " + _formats(targets))
        if params.coords is not None:
            _check_coords(targets, params)
        _check_flips(targets, params)
        return selection

    @classmethod
    def perturb(cls, model: nn.Module, params: BitflipParams, edits: Edits) -> None:
        targets = [elements_of(model, ref) for ref in cls.select(model, params).tensors]
        if params.role is not None:
            for target, elements, bits in role_flips(targets, params):
                _flip(edits, target, elements, bits)
        elif params.coords is not None:
            elements = np.ravel_multi_index(np.array(params.coords).T, targets[0].shape)
            _flip(edits, targets[0], elements, np.full(len(elements), params.bit))
        else:
            for i, (elements, bits) in choose(targets, params).items():
                _flip(edits, targets[i], elements, bits)


def _formats(targets: list[Elements]) -> str:
    """Which fields the selected tensors' formats have, for an error message."""
    first, count = {}, {}
    for t in targets:
        first.setdefault(t.format, t.name)
        count[t.format] = count.get(t.format, 0) + 1
    return "; ".join(f"{first[fmt]}{f' and {count[fmt] - 1} more' if count[fmt] > 1 else ''} stored as {fmt} "
                     f"(fields: {', '.join(FIELDS[fmt])})" for fmt in first)


def _check_bit(targets: list[Elements], params: BitflipParams) -> None:
    formats = {t.format: t for t in targets}
    if len(formats) > 1:
        raise ParamError("bit", f"bit {params.bit} means a different bit in each storage format, and "
                                f"{params.target!r} selects several: {_formats(targets)}; use a field or role, or "
                                "a target of one format (e.g. blocks.*.mlp.* for the codes)")
    target = targets[0]
    if params.bit >= target.width:
        raise ParamError("bit", f"bit {params.bit} is past the width of {target.name} ({target.format}: bits "
                                f"0-{target.width - 1})")


def _check_flips(targets: list[Elements], params: BitflipParams) -> None:
    """At most MAX_FLIPS per trial: every flip is saved, described in the row, and drawn without
    replacement (a rate of 1 on a 7B model would be 10^11 of them)."""
    slots = sum(t.numel * len(positions(t, params)) for t in targets)
    flips = slots * params.rate if params.rate is not None else min(params.count or 1, slots)
    if flips > MAX_FLIPS:
        what = f"rate {params.rate:g} of {slots:,} bits" if params.rate is not None else f"count {params.count:,}"
        raise ParamError("rate" if params.rate is not None else "count",
                         f"{what} is {flips:,.0f} flips per trial; at most {MAX_FLIPS:,}")


def _check_coords(targets: list[Elements], params: BitflipParams) -> None:
    if len(targets) != 1:
        raise ParamError("target", f"'coords' needs a target with one tensor; {params.target!r} has {len(targets)}")
    shape = targets[0].shape
    for coord in params.coords:
        if len(coord) != len(shape) or not all(0 <= c < n for c, n in zip(coord, shape)):
            raise ParamError("coords", f"{coord} is outside {targets[0].name} of shape {list(shape)}")


def choose(tensors: list[torch.Tensor | Elements], params: BitflipParams) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Seeded choice of (element, bit) pairs, spread uniformly over all the selected tensors' bits.

    Returns, per tensor index, flat element indices and the bit flipped at each (an element
    may appear twice with different bits: both bits flip). A tensor whose format lacks the
    field has no slots.
    """
    bits = [np.array(positions(t, params), dtype=np.int64) for t in tensors]
    sizes = np.array([_numel(t) * len(b) for t, b in zip(tensors, bits)], dtype=np.int64)  # slots per tensor
    slots = int(sizes.sum())
    rng = keyed_rng(params.seed, "bitflip", params.target, params.field if params.bit is None else params.bit)
    k = int(rng.binomial(slots, params.rate)) if params.rate is not None else min(params.count or 1, slots)
    picked = np.sort(rng.choice(slots, size=k, replace=False)) if k else np.empty(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.searchsorted(offsets, picked, side="right") - 1
    out = {}
    for i in np.unique(owner):
        element, bit = np.divmod(picked[owner == i] - offsets[i], len(bits[i]))
        out[int(i)] = (element, bits[i][bit])
    return out


def _numel(target: torch.Tensor | Elements) -> int:
    return target.numel if isinstance(target, Elements) else target.numel()


def role_flips(targets: list[Elements], params: BitflipParams) -> list[tuple[Elements, np.ndarray, np.ndarray]]:
    """(storage, elements, bits) of a role trial: `count` weights of the selected weight matrices, drawn by
    seed and target alone, and in each the bit with that role in its format (or in its scale)."""
    matrices = [t for t in targets if len(t.shape) == 2 and not t.statistic]
    if not matrices:
        raise ParamError("target", f"'role' draws weights of weight matrices; {params.target!r} selects none")
    sizes = np.array([t.numel for t in matrices], dtype=np.int64)
    rng = keyed_rng(params.seed, "bitflip", params.target, "role")  # not the role, not the format: same weights
    picked = np.sort(rng.choice(int(sizes.sum()), size=min(params.count or 1, int(sizes.sum())), replace=False))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.searchsorted(offsets, picked, side="right") - 1
    out = []
    for i in range(len(matrices)):  # every matrix's role is checked, drawn or not: a trial's validity must
        elements = picked[owner == i] - offsets[i]  # not depend on which weights its seed drew
        out.append(_role_bits(matrices[i], elements, params.role))
    return [flip for flip in out if len(flip[1])]


def _role_bits(matrix: Elements, elements: np.ndarray, role: str) -> tuple[Elements, np.ndarray, np.ndarray]:
    if role == "scale":
        if matrix.scales is None:
            raise NotApplicable("role", f"role 'scale': {matrix.name} is stored as {matrix.format}, which has no "
                                        "scale (only quantized codes are multiplied by one)")
        scale, where = matrix.scales(elements)
        return scale, where, np.full(len(where), SCALE_BIT)
    fields = FIELDS[matrix.format]
    bit = fields["sign"][0] if role == "sign" else fields.get("exponent_msb", fields.get("magnitude_msb"))[0]
    return matrix, elements, np.full(len(elements), bit)


def _flip(edits: Edits, target: Elements, elements: np.ndarray, bits: np.ndarray) -> None:
    """XOR the chosen bits of the chosen elements in place, through their storage units (any strides)."""
    units, unit_bits = target.locate(np.asarray(elements, dtype=np.int64), np.asarray(bits, dtype=np.int64))
    width = torch.iinfo(BITS_DTYPE[target.storage.dtype]).bits
    unique, inverse = np.unique(units, return_inverse=True)
    masks = np.zeros(len(unique), dtype=np.int64)
    np.bitwise_or.at(masks, inverse, np.left_shift(np.int64(1), unit_bits))
    raw, index = edits.elements(target.storage, target.name, unique, target.decoder)
    if raw.dtype.is_signed:
        masks = np.where(masks >= 1 << (width - 1), masks - (1 << width), masks)  # as signed ints of that width
    raw.index_put_(index, raw[index] ^ torch.as_tensor(masks, dtype=raw.dtype, device=raw.device))
