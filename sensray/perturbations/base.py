"""What every perturbation kind shares: parameters, the undo record, the registry.

A kind's `apply(model, params)` changes weights in place and returns an `Undo` holding only
what it overwrote (k scalars for k flips; the one tensor it zeroed or noised). `restore()`
writes those originals back into the same storage and `verify()` checks, bit for bit, that
they are back, so a replica can run thousands of trials on one loaded model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from sensray.registry import Registry
from sensray.targets import Selection, TargetError, select

# Integer dtypes of the same width, to read and compare floats as raw bits.
BITS_DTYPE = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.int8: torch.int8,
    torch.uint8: torch.uint8,
}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same storage read as integers: NaN payloads and -0.0 compare exactly."""
    return t.view(BITS_DTYPE[t.dtype]) if t.dtype in BITS_DTYPE else t


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(as_bits(a), as_bits(b))


class ParamError(ValueError):
    """A trial parameter is invalid; `param` names it so the spec error points at `space.<param>`."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


class Params(BaseModel):
    """Base of each kind's parameters: frozen, unknown names rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    target: str


class Undo(Protocol):
    def restore(self) -> None: ...

    def verify(self) -> bool: ...

    def touches(self) -> list[torch.Tensor | nn.Module]:
        """What the perturbation changed: tensors (or views of them) and hooked modules. Prefix
        reuse starts a trial's forward at the first decoder block holding any of them."""
        ...


class SavedTensors:
    """Originals of whole tensors (or views) that a kind overwrites wholesale."""

    def __init__(self, live: list[torch.Tensor]):
        self.live = live
        self.saved = [t.clone() for t in live]

    def restore(self) -> None:
        for live, saved in zip(self.live, self.saved):
            live.copy_(saved)

    def verify(self) -> bool:
        return all(bits_equal(live, saved) for live, saved in zip(self.live, self.saved))

    def touches(self) -> list[torch.Tensor]:
        return list(self.live)


class SavedElements:
    """Originals of a few scattered elements, kept as raw bits."""

    def __init__(self, bits: torch.Tensor, index: tuple[torch.Tensor, ...]):
        self.bits, self.index = bits, index
        self.saved = bits[index].clone()

    def restore(self) -> None:
        self.bits.index_put_(self.index, self.saved)

    def verify(self) -> bool:
        return torch.equal(self.bits[self.index], self.saved)

    def touches(self) -> list[torch.Tensor]:
        return [self.bits]


class RemovableHooks:
    """Forward hooks change what runs, not the weights: undoing is removing them."""

    def __init__(self, handles: list, modules: list[nn.Module]):
        self.handles, self.modules = handles, modules

    def restore(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def verify(self) -> bool:
        return not self.handles

    def touches(self) -> list[nn.Module]:
        return list(self.modules)


class UndoAll:
    """Several undo records, restored in reverse order of application."""

    def __init__(self, parts: list[Undo]):
        self.parts = parts

    def restore(self) -> None:
        for part in reversed(self.parts):
            part.restore()

    def verify(self) -> bool:
        return all(part.verify() for part in self.parts)

    def touches(self) -> list[torch.Tensor | nn.Module]:
        return [thing for part in self.parts for thing in part.touches()]


class Perturbation:
    """One kind of perturbation. Subclasses set `name`, `Params`, and implement `apply`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[Params]]

    @classmethod
    def parse(cls, params: dict[str, Any]) -> Params:
        """Validate strictly: `sigma: '0.3'` (a string) or `count: 1.0` is an error, never coerced, and
        every number must be finite and fit in 64 bits (what torch and numpy take)."""
        import math

        def out_of_range(value: Any) -> Any:  # the first NaN, infinite or beyond-int64 number in value
            if isinstance(value, (list, tuple)):
                return next((bad for item in value if (bad := out_of_range(item)) is not None), None)
            if isinstance(value, float) and not math.isfinite(value):
                return value
            if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
                return value
            return None

        for name, value in params.items():
            bad = out_of_range(value)
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
            return select(model, params.target)
        except TargetError as err:
            raise ParamError("target", str(err)) from None

    @classmethod
    def check(cls, model: nn.Module, params: Params) -> Selection:
        """Validate against the model (a meta model will do) before anything runs."""
        return cls.select(model, params)

    @classmethod
    def apply(cls, model: nn.Module, params: Params) -> Undo:
        raise NotImplementedError


PERTURBATIONS: Registry[type[Perturbation]] = Registry("perturbation kind")


def register(cls: type[Perturbation]) -> type[Perturbation]:
    return PERTURBATIONS.register(cls.name)(cls)


def tensors_of(model: nn.Module, selection: Selection) -> list[torch.Tensor]:
    """The live tensors (parameters or fused views) a selection names."""
    return [ref.resolve(model) for ref in selection.tensors]
