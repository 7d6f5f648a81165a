"""Additive noise: gaussian or uniform, absolute or relative to each tensor's std.

    space:
      target: {each: "blocks.*.mlp.*"}
      dist: gaussian
      sigma: {grid_search: [0.01, 0.1, 1.0]}   # x std(tensor) when relative (the default)
      seed: {grid_search: [0, 1]}

Noise is drawn on the CPU (identical on every machine) in float32, then added in float32 and
rounded once to the weight's dtype. Each tensor's noise comes from its own stream, keyed by the
seed, the tensor's canonical name and the distribution: equally shaped tensors get independent
noise, and a tensor gets the same noise whichever target selected it (blocks.3 or blocks.3.mlp.*),
so nested targets compare like with like. sigma is not in the key: a sigma sweep scales one draw.

Quantized weights are refused (QUANTIZED below): their float tensors (norms, embeddings, the head)
take noise as in any model.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from sensray.perturbations.base import (
    Edits,
    Params,
    Perturbation,
    keyed_torch_generator,
    register,
    seed_field,
    tensors_of,
)


class NoiseParams(Params):
    dist: Literal["gaussian", "uniform"] = "gaussian"
    sigma: float = Field(ge=0, description="std (gaussian) or half-width (uniform)")
    relative: bool = Field(True, description="scale sigma by each tensor's own std")
    seed: int = seed_field("with each tensor's name, draws its noise")


@register
class Noise(Perturbation):
    name = "noise"
    summary = "add seeded gaussian or uniform noise, absolute or relative to each tensor's std"
    Params = NoiseParams
    quantized = ("noise is real-valued and quantized codes hold only their format's values, so the weights "
                 "would be requantized (rounded per row or block), not noised; target the float tensors, "
                 "or add noise to the float model (quantization: none)")

    @classmethod
    def perturb(cls, model: nn.Module, params: NoiseParams, edits: Edits) -> None:
        for name, tensor in tensors_of(model, cls.select(model, params)):
            generator = keyed_torch_generator(params.seed, "noise", name, params.dist)
            draw = _draw(tensor.shape, params.dist, generator)
            scale = params.sigma * (tensor.float().std().item() if params.relative else 1.0)
            edits.tensor(tensor, name).copy_((tensor.float() + draw.to(tensor.device) * scale).to(tensor.dtype))


def _draw(shape: torch.Size, dist: str, generator: torch.Generator) -> torch.Tensor:
    if dist == "gaussian":
        return torch.randn(shape, generator=generator)
    return torch.rand(shape, generator=generator) * 2 - 1
