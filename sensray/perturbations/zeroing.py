"""Zero chosen elements of one weight matrix: given coordinates, the N largest, or N at random.

    space:
      target: blocks.1.mlp.down.weight          # exactly one 2-D tensor
      coords: [[2533, 7890]]                    # row (output channel), column (input channel)
      pick: {grid_search: [coords, top, random]}
      seed: {grid_search: [0, 1, 2, 3]}         # draws the `random` pick's elements

`pick: coords` zeroes `coords`; `top` zeroes the `count` elements of largest magnitude (ties
broken by the lower flat index, so every device picks the same ones); `random` zeroes `count`
distinct elements drawn uniformly by NumPy's PCG64, keyed by `seed` and the target, identical
on every machine.
`count` defaults to the number of `coords` (so a control zeroes as many weights as the pick it
is compared with), else 1. This is the super-weight test of Yu et al. 2024: one weight whose
removal destroys the model, against as many random or largest weights, whose removal does not.

`coords` and `top` do not use the seed, so a grid over `pick` and `seed` evaluates them once per
seed, identically: a sweep's space is one cartesian product and cannot leave an axis out for
some values of another. Only the zeroed elements' original bits are saved.

On a quantized model (int8, nf4, fp4) the target is the codes (`blocks.1.mlp.down.weight`), and
zeroing a weight writes the code whose value is exactly 0 (int8: 0; nf4: 7; fp4: 0), so the
dequantized weight is 0 and the row's scale is untouched; `top` ranks by |dequantized weight|.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from sensray.perturbations.base import (
    Edits,
    ParamError,
    Params,
    Perturbation,
    keyed_rng,
    register,
    seed_field,
)
from sensray.quantized.elements import Elements, elements_of


class ZeroParams(Params):
    pick: Literal["coords", "top", "random"] = Field("coords", description="which elements to zero")
    coords: Optional[list[list[int]]] = Field(None, description="[row, column] of each element (pick: coords)")
    count: Optional[int] = Field(None, ge=1, description="how many elements top/random zero (default: len(coords), else 1)")
    seed: int = seed_field("with the target, draws the elements of pick: random")

    @model_validator(mode="after")
    def _consistent(self) -> "ZeroParams":
        if self.pick == "coords" and not self.coords:
            raise ValueError("pick 'coords' needs 'coords': a list of [row, column]")
        if self.pick == "coords" and self.count is not None and self.count != len(self.coords):
            raise ValueError(f"pick 'coords' zeroes the {len(self.coords)} coords given; 'count' {self.count} disagrees")
        return self

    @property
    def size(self) -> int:
        """How many elements this trial zeroes."""
        return self.count or (len(self.coords) if self.coords else 1)


@register
class Zero(Perturbation):
    name = "zero"
    summary = "zero elements of one weight matrix: given coords, the top-N by magnitude, or N seeded random ones"
    Params = ZeroParams
    quantized = None  # a quantized weight is zeroed by writing the code of 0 (the scale stays)

    @classmethod
    def check(cls, model: nn.Module, params: ZeroParams):
        selection = cls.select(model, params)
        if len(selection.tensors) != 1:
            names = ", ".join(ref.name for ref in selection.tensors[:4])
            raise ParamError("target", f"zero needs exactly one tensor; {params.target!r} selects "
                                       f"{len(selection.tensors)} ({names}{', ...' if len(selection.tensors) > 4 else ''})")
        ref = selection.tensors[0]
        target = elements_of(model, ref)  # shapes exist on a meta model too
        shape = target.shape
        if target.statistic:
            raise ParamError("target", f"zero needs a weight matrix; {ref.name} is a quantization statistic "
                                       f"(target the weight, {ref.name.split('.weight.')[0]}.weight)")
        if len(shape) != 2:
            raise ParamError("target", f"zero needs a 2-D weight matrix; {ref.name} has shape {list(shape)}")
        if params.coords is not None:
            _check_coords(params.coords, shape, ref.name)
        if params.size > shape[0] * shape[1]:
            raise ParamError("count", f"count {params.size} is more than the {shape[0] * shape[1]} elements of {ref.name}")
        return selection

    @classmethod
    def perturb(cls, model: nn.Module, params: ZeroParams, edits: Edits) -> None:
        target = elements_of(model, cls.check(model, params).tensors[0])
        target.write(edits, elements(target, params), target.zero_code)  # floats: all bits 0, +0.0


def _check_coords(coords: list[list[int]], shape: tuple[int, int], name: str) -> None:
    seen = set()
    for coord in coords:
        if len(coord) != 2 or not all(0 <= c < n for c, n in zip(coord, shape)):
            raise ParamError("coords", f"{coord} is outside {name} of shape {list(shape)} (give [row, column])")
        if tuple(coord) in seen:
            raise ParamError("coords", f"{coord} is listed twice")
        seen.add(tuple(coord))


def elements(target: torch.Tensor | Elements, params: ZeroParams) -> np.ndarray:
    """Flat indices (row-major, sorted) of the elements a trial zeroes (of a tensor, or of a canonical
    tensor's elements: dequantized weights for quantized storage)."""
    shape = tuple(target.shape)
    if params.pick == "coords":
        return np.sort(np.ravel_multi_index(np.array(params.coords).T, shape))
    if params.pick == "random":
        rng = keyed_rng(params.seed, "zero", params.target)
        return np.sort(rng.choice(math.prod(shape), size=params.size, replace=False))
    return largest(target.values() if isinstance(target, Elements) else target, params.size)


def largest(tensor: torch.Tensor, count: int) -> np.ndarray:
    """Flat indices of the `count` largest |elements|, ties at the cut taken by lowest index.

    topk alone leaves the order of equal values to the device; this is the same set everywhere.
    """
    magnitude = tensor.detach().abs().float().flatten()
    cut = torch.topk(magnitude, count).values.min()
    above = (magnitude > cut).nonzero().flatten()
    tied = (magnitude == cut).nonzero().flatten()[: count - len(above)]  # nonzero() is in index order
    return np.sort(torch.cat([above, tied]).cpu().numpy())
