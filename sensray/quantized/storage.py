"""Where bitsandbytes keeps a quantized Linear's bits, by canonical name, on a loaded or a meta model.

    format_of(module)              -> "int8" | "nf4" | "fp4" | None (a float module)
    parts(module)                  -> ("scale",) or ("scale", "scale2", "scale_offset", "scale_code")
    part_tensor(module, "scale")   -> the live buffer (a meta tensor of the right shape on a meta model)
    buffers(model)                 -> every quantization buffer by HF-style name (the weights checksum)

Canonical names (the weight's own name, then a suffix):

    blocks.3.mlp.down.weight              the codes: int8 [out, in], or 4-bit codes packed two per byte
    blocks.3.mlp.down.weight.scale        int8: the per-row scale (SCB); 4-bit: the per-block absmax
                                          (float32, or 8-bit codes when the scales are double-quantized)
    blocks.3.mlp.down.weight.scale2       double-quantized 4-bit: the float32 scale of every 256 block scales
    blocks.3.mlp.down.weight.scale_offset double-quantized 4-bit: the float32 added to every decoded block scale
    blocks.3.mlp.down.weight.scale_code   double-quantized 4-bit: the 256-entry table the 8-bit scale codes index

The 4-bit value table (`quant_state.code`) is not a target: bitsandbytes' dequantization kernels
(CPU and CUDA) hardcode the NF4/FP4 values and never read it (checked: a flipped table left the
logits unchanged), so a fault there changes nothing a sweep measures. It is in the checksum anyway.

bitsandbytes moves int8 state on the first forward (`init_8bit_state`: weight.CB/SCB -> state.CB/SCB);
sensray.quantized.loading.prepare() does that once at load, so the buffers named here are the ones
every forward reads from then on. Nothing here imports bitsandbytes: modules are recognised by class.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

PARTS_INT8 = ("scale",)
PARTS_4BIT = ("scale",)
PARTS_NESTED = ("scale", "scale2", "scale_offset", "scale_code")
NESTED_BLOCK = 256  # bitsandbytes quantizes the 4-bit block scales again in blocks of 256


_KINDS: dict[type, str | None] = {}  # module class -> "int8", "4bit" or None (classes never change)


def _kind(cls: type) -> str | None:
    if cls not in _KINDS:
        names = {c.__name__ for c in cls.__mro__ if c.__module__.startswith("bitsandbytes")}
        _KINDS[cls] = "int8" if "Linear8bitLt" in names else "4bit" if "Linear4bit" in names else None
    return _KINDS[cls]


def format_of(module: nn.Module) -> str | None:
    """The quantized storage format of a module, None for a float module."""
    kind = _kind(type(module))
    return module.weight.quant_type if kind == "4bit" else kind


def is_quantized(model: nn.Module) -> bool:
    return any(format_of(m) is not None for m in model.modules())


def nested(module: nn.Module) -> bool:
    """Whether a 4-bit module's block scales are double-quantized (on a meta model: whether they will be)."""
    state = module.weight.quant_state
    return bool(state.nested) if state is not None else bool(module.weight.compress_statistics)


def parts(module: nn.Module) -> tuple[str, ...]:
    """The canonical suffixes of a quantized module's statistics (after `.weight.`)."""
    fmt = format_of(module)
    if fmt is None:
        return ()
    if fmt == "int8":
        return PARTS_INT8
    return PARTS_NESTED if nested(module) else PARTS_4BIT


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in): the weight matrix the codes encode, whatever shape their storage has."""
    return module.out_features, module.in_features


def blocksize(module: nn.Module) -> int:
    state = module.weight.quant_state
    return state.blocksize if state is not None else module.weight.blocksize


def part_shapes(module: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of the codes' storage and of every statistic, from the module's settings alone."""
    out, inp = logical_shape(module)
    if format_of(module) == "int8":
        return {"": (torch.Size((out, inp)), torch.int8), "scale": (torch.Size((out,)), torch.float32)}
    n = out * inp
    blocks = math.ceil(n / blocksize(module))
    shapes = {"": (torch.Size(((n + 1) // 2, 1)), torch.uint8)}
    if not nested(module):
        return shapes | {"scale": (torch.Size((blocks,)), torch.float32)}
    return shapes | {"scale": (torch.Size((blocks,)), torch.uint8),
                     "scale2": (torch.Size((math.ceil(blocks / NESTED_BLOCK),)), torch.float32),
                     "scale_offset": (torch.Size((1,)), torch.float32),
                     "scale_code": (torch.Size((256,)), torch.float32)}


def loaded(module: nn.Module) -> bool:
    """Whether the module holds real quantized data (not a meta skeleton)."""
    if format_of(module) == "int8":
        return module.state.SCB is not None or getattr(module.weight, "SCB", None) is not None
    return module.weight.quant_state is not None


def part_tensor(module: nn.Module, part: str) -> torch.Tensor:
    """The live tensor behind a canonical part ("" = the codes); a meta tensor before loading."""
    if not loaded(module):
        shape, dtype = part_shapes(module)[part]
        return torch.empty(shape, dtype=dtype, device="meta")
    if part == "":
        return module.weight.data
    if format_of(module) == "int8":
        return module.state.SCB if module.state.SCB is not None else module.weight.SCB
    state = module.weight.quant_state
    if part == "scale":
        return state.absmax
    if part == "scale2":
        return state.state2.absmax
    if part == "scale_offset":
        return state.offset.view(1)  # a 0-d tensor: as a 1-element view of the same storage
    if part == "scale_code":
        return state.state2.code
    raise KeyError(part)


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantization statistic of a loaded model by HF-style name (`<module>.weight.SCB`, ...)."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        fmt = format_of(module)
        if fmt is None or not loaded(module):
            continue
        if fmt == "int8":
            out[f"{path}.weight.SCB"] = part_tensor(module, "scale")
            continue
        state = module.weight.quant_state
        out |= {f"{path}.weight.absmax": state.absmax, f"{path}.weight.code": state.code}
        if state.nested:
            out |= {f"{path}.weight.offset": state.offset, f"{path}.weight.nested_absmax": state.state2.absmax,
                    f"{path}.weight.nested_code": state.state2.code}
    return out


def parameter_count(model: nn.Module) -> int:
    """How many weights the model has (a 4-bit weight counts its elements, not the bytes packing them)."""
    packed = {id(m.weight): m for m in model.modules() if format_of(m) in ("nf4", "fp4")}
    return sum(math.prod(logical_shape(packed[id(p)])) if id(p) in packed else p.numel() for p in model.parameters())


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if format_of(m) is not None}


_WEIGHTS: "weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]]" = weakref.WeakKeyDictionary()


def quantized_weights(model: nn.Module) -> dict[str, nn.Module]:
    """HF name of every quantized weight -> its module, built once per model (targets ask thousands of times;
    the module tree of a loaded or meta model does not change)."""
    if model not in _WEIGHTS:
        _WEIGHTS[model] = {f"{path}.weight": m for path, m in quantized_modules(model).items()}
    return _WEIGHTS[model]
