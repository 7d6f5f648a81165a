"""What every perturbation kind shares: parameters, seeded draws, applying with an undo record, the registry.

A kind implements `perturb(model, params, edits)`: it changes weights in place, handing each
tensor or element to `edits` (sensray/perturbations/edits.py) before writing it. `apply` wraps
that: it creates the `Edits` record before the first write and, if the kind raises half-way,
restores what was written before re-raising. `restore()` writes the originals back into the same
storage and `verify()` checks, bit for bit, that they are back.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from sensray.errors import RestoreError
from sensray.perturbations.edits import BITS_DTYPE, Edits, as_bits, bits_equal  # noqa: F401  (re-exported)
from sensray.registry import Registry
from sensray.targets import Selection, TargetError, select

MAX_SEED = 2**63 - 1  # seeds are Int64 columns in the trial table


def seed_field(what: str = "seeds this trial's random draws") -> Any:
    return Field(0, ge=0, le=MAX_SEED, description=what)


def keyed_rng(seed: int, *key: object) -> np.random.Generator:
    """The random stream of one trial's draws: PCG64 keyed by its seed *and* what it draws for.

    Seeding by `seed` alone made every equally sized target draw the same relative elements (the
    default bit-flip study hit 8 positions in 256 trials) and every equally shaped tensor the same
    noise. The key (kind, target, field, ...) is hashed into the seed sequence, so draws stay
    reproducible (same spec, same draws, on any machine) and are independent across targets.
    """
    digest = hashlib.sha256(json.dumps([str(k) for k in key]).encode()).digest()
    words = np.frombuffer(digest[:16], dtype="<u4").tolist()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))


def keyed_torch_generator(seed: int, *key: object) -> torch.Generator:
    """A CPU torch.Generator seeded from `keyed_rng(seed, *key)` (identical on every machine)."""
    return torch.Generator().manual_seed(int(keyed_rng(seed, *key).integers(2**63)))

class ParamError(ValueError):
    """A trial parameter is invalid; `param` names it so the spec error points at `space.<param>`."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


class NotApplicable(ParamError):
    """The trial asks for something this model's storage format does not have (a float32 weight has no
    scale): an error in a sweep, a trial left out of that format's run in a format study."""


class Params(BaseModel):
    """Base of each kind's parameters: frozen, unknown names rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    target: str


class Perturbation:
    """One kind of perturbation. Subclasses set `name`, `summary`, `Params`, and implement `perturb`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[Params]]
    # What the kind does with quantized storage (sensray/quantized): None when it handles it, else why
    # it refuses (said in the error). A kind that does not say refuses: never a silent float fallback.
    quantized: ClassVar[str | None] = "it has not been taught what its change means on quantized storage"

    @classmethod
    def parse(cls, params: dict[str, Any]) -> Params:
        """Validate strictly: `sigma: '0.3'` (a string) or `count: 1.0` is an error, never coerced, and
        every number must be finite and fit in 64 bits (what torch and numpy take)."""
        for name, value in params.items():
            bad = _unusable_number(value)
            if bad is not None:
                raise ParamError(name, f"{bad!r} is not a usable number: give a finite value within 64-bit "
                                       f"range (-2^63 .. 2^63-1 for whole numbers)")
        try:
            return cls.Params.model_validate(params, strict=True)
        except ValidationError as err:
            first = err.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else ""
            message = first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                message = f"unknown parameter for {cls.name} (parameters: {', '.join(cls.Params.model_fields)})"
            elif first["type"] == "missing":
                message = f"{cls.name} needs this parameter"
            elif first["type"] in ("int_type", "float_type", "bool_type") and isinstance(first.get("input"), str):
                message = f"{message}, got the string {first['input']!r} (write numbers without quotes)"
            raise ParamError(param, message) from None

    @classmethod
    def select(cls, model: nn.Module, params: Params) -> Selection:
        try:
            selection = select(model, params.target)
        except TargetError as err:
            raise ParamError("target", str(err)) from None
        _refuse_quantized(cls, model, params, selection)
        return selection

    @classmethod
    def quantized_refusal(cls, params: Params) -> str | None:
        """Why this trial cannot act on quantized storage (None: it can); a kind may decide per parameter."""
        return cls.quantized

    @classmethod
    def check(cls, model: nn.Module, params: Params) -> Selection:
        """Validate against the model (a meta model will do) before anything runs."""
        return cls.select(model, params)

    @classmethod
    def apply(cls, model: nn.Module, params: Params) -> Edits:
        """Perturb in place; the returned record restores it. A kind that fails half-way leaves the
        model as it found it: what it had written is restored before the error propagates."""
        edits = Edits()
        try:
            cls.perturb(model, params, edits)
        except BaseException as err:
            edits.restore()
            if not edits.verify():
                raise RestoreError(f"{cls.name}: failed half-way ({err}) and what it had written could not "
                                   "be restored") from err
            raise
        return edits

    @classmethod
    def perturb(cls, model: nn.Module, params: Params, edits: Edits) -> None:
        """Change weights in place, handing each tensor or element to `edits` before writing it."""
        raise NotImplementedError


def _refuse_quantized(kind: type[Perturbation], model: nn.Module, params: Params, selection: Selection) -> None:
    from sensray.quantized.elements import elements_of, is_quantized

    quantized = [ref for ref in selection.tensors if is_quantized(model, ref)]
    if not quantized:
        return
    view = next((ref for ref in quantized if not ref.whole), None)
    if view is not None:
        raise ParamError("target", f"{view.name} is a slice of a fused, quantized weight, whose codes and scales "
                                   f"cover q, k and v together; target the fused weight (attn.qkv) instead")
    reason = kind.quantized_refusal(params)
    if reason is not None:
        fmt = elements_of(model, quantized[0]).format
        raise ParamError("target", f"{kind.name} cannot act on {quantized[0].name}, stored as {fmt} codes or their "
                                   f"statistics: {reason}")


def _unusable_number(value: Any) -> Any:
    """The first NaN, infinite or beyond-int64 number in `value` (a number or nested lists), else None."""
    if isinstance(value, (list, tuple)):
        return next((bad for item in value if (bad := _unusable_number(item)) is not None), None)
    if isinstance(value, float) and not math.isfinite(value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return value
    return None


PERTURBATIONS: Registry[type[Perturbation]] = Registry("perturbation kind")


def register(cls: type[Perturbation]) -> type[Perturbation]:
    return PERTURBATIONS.register(cls.name)(cls)


def tensors_of(model: nn.Module, selection: Selection) -> list[tuple[str, torch.Tensor]]:
    """(canonical name, live tensor) of each tensor (parameter or fused view) a selection names."""
    return [(ref.name, ref.resolve(model)) for ref in selection.tensors]
