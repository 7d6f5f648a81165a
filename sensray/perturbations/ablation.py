"""Ablation: zero a component, replace it by its mean, or skip a whole decoder block.

    space:
      target: {each: "blocks.*"}
      mode: {grid_search: [zero, mean, skip]}

`zero` and `mean` overwrite every tensor of the target (weights and biases) and save one copy
of each; `skip` makes a decoder block the identity on the residual stream with a forward hook,
so no weight changes at all.

On a quantized model `zero` writes the code of 0 into every code of a quantized weight (the
dequantized weights are exactly 0) and leaves its statistics (scales, tables) as they are: they
encode the weights, they are not weights. `mean` is refused there: one value in every weight of a
row or block scaled by its own scale is a requantization, not the mean.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from sensray.perturbations.base import Edits, ParamError, Params, Perturbation, register
from sensray.quantized.elements import elements_of

MEAN_QUANTIZED = ("mode 'mean' sets every weight to one value, which quantized codes hold only after requantizing "
                  "(each row or block would round the mean by its own scale); use mode zero (the codes of 0) or skip")


class AblationParams(Params):
    mode: Literal["zero", "mean", "skip"] = Field("zero", description="skip needs whole blocks (blocks.N)")


@register
class Ablation(Perturbation):
    name = "ablation"
    summary = "zero a tensor or component, replace it by its mean, or skip a decoder block"
    Params = AblationParams

    @classmethod
    def quantized_refusal(cls, params: AblationParams) -> str | None:
        return MEAN_QUANTIZED if params.mode == "mean" else None

    @classmethod
    def check(cls, model: nn.Module, params: AblationParams):
        selection = cls.select(model, params)
        if params.mode == "skip" and (not selection.components or any(c.kind != "block" for c in selection.components)):
            raise ParamError("target", f"mode 'skip' needs whole decoder blocks (e.g. 'blocks.3'), got {params.target!r}")
        if params.mode != "skip" and all(elements_of(model, ref).statistic for ref in selection.tensors):
            raise ParamError("target", f"{params.target!r} selects only quantization statistics, which ablation leaves "
                                       "alone; target the weights (e.g. blocks.3.mlp.down)")
        return selection

    @classmethod
    def perturb(cls, model: nn.Module, params: AblationParams, edits: Edits) -> None:
        selection = cls.check(model, params)
        if params.mode == "skip":
            for component in selection.components:
                block = model.get_submodule(component.module)
                edits.hook(block, component.name, block.register_forward_hook(_identity, with_kwargs=True))
            return
        for target in (elements_of(model, ref) for ref in selection.tensors):
            if target.statistic:
                continue
            if params.mode == "zero":
                target.fill_zero(edits)
            else:
                edits.tensor(target.storage, target.name).fill_(target.storage.float().mean().item())


def _identity(module, args, kwargs, output):
    """Return the block's input hidden states in place of its output (keeping any extra outputs)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden
