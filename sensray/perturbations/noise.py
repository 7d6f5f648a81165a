"""Additive noise: gaussian or uniform, absolute or relative to each tensor's std.

    space:
      target: {each: "blocks.*.mlp.*"}
      dist: gaussian
      sigma: {grid_search: [0.01, 0.1, 1.0]}   # x std(tensor) when relative (the default)
      seed: {grid_search: [0, 1]}

Noise is drawn on the CPU from torch's seeded generator (identical on every machine), in
float32, then added in float32 and rounded once to the weight's dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from sensray.perturbations.base import Params, Perturbation, SavedTensors, register, tensors_of


class NoiseParams(Params):
    dist: Literal["gaussian", "uniform"] = "gaussian"
    sigma: float = Field(ge=0, description="std (gaussian) or half-width (uniform)")
    relative: bool = Field(True, description="scale sigma by each tensor's own std")
    seed: int = Field(0, ge=0)


@register
class Noise(Perturbation):
    name = "noise"
    summary = "add seeded gaussian or uniform noise, absolute or relative to each tensor's std"
    Params = NoiseParams

    @classmethod
    def apply(cls, model: nn.Module, params: NoiseParams) -> SavedTensors:
        tensors = tensors_of(model, cls.select(model, params))
        undo = SavedTensors(tensors)
        generator = torch.Generator().manual_seed(params.seed)
        for tensor in tensors:
            draw = _draw(tensor.shape, params.dist, generator)
            scale = params.sigma * (tensor.float().std().item() if params.relative else 1.0)
            tensor.copy_((tensor.float() + draw.to(tensor.device) * scale).to(tensor.dtype))
        return undo


def _draw(shape: torch.Size, dist: str, generator: torch.Generator) -> torch.Tensor:
    if dist == "gaussian":
        return torch.randn(shape, generator=generator)
    return torch.rand(shape, generator=generator) * 2 - 1
