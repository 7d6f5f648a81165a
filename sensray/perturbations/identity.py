"""No perturbation: the model as loaded, measured as one trial (a baseline is a run too).

    perturbation: none
    space: {target: model}

One trial that changes nothing. Its row has the baseline's metrics (delta_ppl 1, KL 0, top-1
agreement 1) and, with an `eval:` section, the model's lm-eval task scores, so a model's own
measurement is a run directory like any sweep's, which the analysis and the comparison of two
runs (dense against pruned, fp16 against nf4) read like any other: `sensray evaluate` runs it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from sensray.perturbations.base import Edits, Params, Perturbation, register


class NoneParams(Params):
    target: Literal["model"] = Field(description="'model': the whole model, left as it is")


@register
class Identity(Perturbation):
    name = "none"
    summary = "change nothing: the model as loaded, measured as one trial (what sensray evaluate runs)"
    Params = NoneParams

    @classmethod
    def check(cls, model: nn.Module, params: NoneParams) -> None:
        return None  # nothing is selected, so nothing can be missing

    @classmethod
    def perturb(cls, model: nn.Module, params: NoneParams, edits: Edits) -> None:
        return None
