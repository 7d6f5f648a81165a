"""Ablation: zero a component, replace it by its mean, or skip a whole decoder block.

    space:
      target: {each: "blocks.*"}
      mode: {grid_search: [zero, mean, skip]}

`zero` and `mean` overwrite every tensor of the target (weights and biases) and save one copy
of each; `skip` makes a decoder block the identity on the residual stream with a forward hook,
so no weight changes at all.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from sensray.perturbations.base import Edits, ParamError, Params, Perturbation, register, tensors_of


class AblationParams(Params):
    mode: Literal["zero", "mean", "skip"] = Field("zero", description="skip needs whole blocks (blocks.N)")


@register
class Ablation(Perturbation):
    name = "ablation"
    summary = "zero a tensor or component, replace it by its mean, or skip a decoder block"
    Params = AblationParams

    @classmethod
    def check(cls, model: nn.Module, params: AblationParams):
        selection = cls.select(model, params)
        if params.mode == "skip" and (not selection.components or any(c.kind != "block" for c in selection.components)):
            raise ParamError("target", f"mode 'skip' needs whole decoder blocks (e.g. 'blocks.3'), got {params.target!r}")
        return selection

    @classmethod
    def perturb(cls, model: nn.Module, params: AblationParams, edits: Edits) -> None:
        selection = cls.check(model, params)
        if params.mode == "skip":
            for component in selection.components:
                block = model.get_submodule(component.module)
                edits.hook(block, component.name, block.register_forward_hook(_identity, with_kwargs=True))
            return
        for name, tensor in tensors_of(model, selection):
            value = 0.0 if params.mode == "zero" else tensor.float().mean().item()
            edits.tensor(tensor, name).fill_(value)


def _identity(module, args, kwargs, output):
    """Return the block's input hidden states in place of its output (keeping any extra outputs)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden
