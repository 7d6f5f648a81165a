"""A canonical tensor's elements as perturbations see them: format, logical shape, where each one's bits are.

    el = elements_of(model, ref)          # float tensor, int8 / 4-bit codes, or a quantization statistic
    el.format, el.shape, el.numel         # "int8" and (out, in) for the codes of a Linear8bitLt
    units, bits = el.locate(flat, bits)   # element bits -> storage units and bits (4-bit: nibbles in bytes)
    el.write(edits, flat, codes)          # set codes (zeroing writes `el.zero_code`), through the undo record
    el.values()                           # the dequantized weights, float32 of `shape`

For a float tensor the storage *is* the elements (`decoder` is None) and nothing changes from how
sensray always treated weights. A quantized tensor carries a decoder, which `Edits` uses to
describe what a write did in the row: each changed weight element, the code bit, the raw code old ->
new and the dequantized weight old -> new (computed with the statistics as they were before the
trial and as they are after it, so a trial that flips a code and its scale reads right):

    int8 (LLM.int8)   w[r, c] = code * scale[r] / 127            codes: two's complement int8
    nf4 / fp4         w[i] = table[code] * absmax[i // 64]        codes: 4 bits, element 2k in the high
                                                                   nibble of byte k, 2k + 1 in the low
    double quant      absmax[j] = scale_code[s[j]] * scale2[j // 256] + scale_offset   (float32 steps)

4-bit values are computed in float32 exactly as bitsandbytes' kernels compute the dequantized
weight; an int8 weight is never materialised by the int8 matmul, so its value is the format's own
code * scale / 127, in float64.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from sensray.quantized.storage import (
    NESTED_BLOCK,
    blocksize,
    format_of,
    logical_shape,
    nested,
    part_tensor,
    quantized_weights,
)

Read = Callable[[torch.Tensor], torch.Tensor]  # a statistics tensor's contents (before or after a trial)
LIVE: Read = lambda t: t  # noqa: E731

# Bit fields of the quantized formats' codes (least significant bit = 0). int8 codes are two's
# complement; nf4 and the 8-bit scale codes index tables sorted from -1 to 1, so their top bit picks
# the negative or the non-negative half ("sign") and the others the position within it; bitsandbytes'
# fp4 is 1 sign, 2 exponent and 1 mantissa bit.
QUANTIZED_FIELDS: dict[str, dict[str, tuple[int, ...]]] = {
    "int8": {"sign": (7,), "magnitude": tuple(range(7)), "magnitude_msb": (6,), "any": tuple(range(8))},
    "nf4": {"sign": (3,), "magnitude": (0, 1, 2), "magnitude_msb": (2,), "any": tuple(range(4))},
    "fp4": {"sign": (3,), "exponent": (1, 2), "exponent_msb": (2,), "mantissa": (0,), "any": tuple(range(4))},
    "index8": {"sign": (7,), "magnitude": tuple(range(7)), "magnitude_msb": (6,), "any": tuple(range(8))},
}
WIDTH = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "nf4": 4, "fp4": 4, "index8": 8}


@dataclass
class Elements:
    name: str
    format: str  # a key of WIDTH
    shape: tuple[int, ...]  # the logical elements (coords, numel)
    storage: torch.Tensor  # the live tensor (or view) holding their bits
    decoder: Any = None  # None: element i is storage element i, its value the bits read as the dtype
    statistic: bool = False  # a quantization statistic (a scale, a table), not a weight
    scales: Callable[[np.ndarray], tuple["Elements", np.ndarray]] | None = None  # codes: the float32 scale each uses

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def width(self) -> int:
        return WIDTH[self.format]

    @property
    def zero_code(self) -> int:
        """The code whose value is exactly 0 (raw bits 0 for floats: +0.0)."""
        return 0 if self.decoder is None else self.decoder.zero_code

    def locate(self, flat: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (flat, bits) if self.decoder is None else self.decoder.locate(flat, bits)

    def write(self, edits, flat: np.ndarray, code: int) -> None:
        """Set elements `flat` to `code` (saved by `edits` first)."""
        units = np.unique(self.locate(flat, np.zeros_like(flat))[0])
        raw, index = edits.elements(self.storage, self.name, units, self.decoder)
        if self.decoder is None:
            raw.index_put_(index, torch.full((len(units),), code, dtype=raw.dtype, device=raw.device))
            return
        new = self.decoder.write(raw[index].cpu(), units, flat, code)
        raw.index_put_(index, new.to(raw.device))

    def fill_zero(self, edits) -> None:
        """Set every element to the code of 0 (the whole storage saved by `edits` first)."""
        unit = self.zero_code * 0x11 if isinstance(self.decoder, Packed4bit) else self.zero_code  # both nibbles
        edits.tensor(self.storage, self.name, self.decoder).fill_(unit)

    def values(self, read: Read = LIVE) -> torch.Tensor:
        """The elements' values (dequantized for codes), float32 of `shape`."""
        if self.decoder is None:
            return read(self.storage).detach().float().reshape(self.shape)
        return self.decoder.dequantize(read(self.storage), read)


def signed8(codes: np.ndarray) -> np.ndarray:
    return codes - 256 * (codes >= 128)


class Int8Codes:
    """LLM.int8() codes: one two's complement int8 per weight, scaled per output row."""

    zero_code = 0

    def __init__(self, shape: tuple[int, int], scale: torch.Tensor):
        self.shape, self.scale = shape, scale

    def locate(self, flat, bits):
        return flat, bits

    def elements(self, units: np.ndarray, raw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return units, raw.reshape(-1).numpy().astype(np.int64) & 0xFF

    def values(self, flat: np.ndarray, codes: np.ndarray, read: Read) -> list[float]:
        scale = read(self.scale).detach().cpu().double().numpy()[flat // self.shape[1]]
        return (signed8(codes) * scale / 127).tolist()

    def write(self, raw: torch.Tensor, units, flat, code: int) -> torch.Tensor:
        return torch.full_like(raw, code)

    def codes(self, storage: torch.Tensor) -> torch.Tensor:
        return storage.reshape(-1).to(torch.int64) & 0xFF

    def dequantize(self, storage: torch.Tensor, read: Read) -> torch.Tensor:
        return storage.float() * (read(self.scale).float()[:, None] / 127)


class Packed4bit:
    """4-bit codes packed two per byte: element 2k in the high nibble of byte k, 2k + 1 in the low one."""

    def __init__(self, shape: tuple[int, int], table: torch.Tensor, block: int,
                 block_scales: Callable[[Read], torch.Tensor]):
        self.shape, self.table, self.block, self.block_scales = shape, table, block, block_scales
        self.zero_code = int((table == 0).nonzero()[0])
        self.n = math.prod(shape)

    def locate(self, flat, bits):
        return flat // 2, bits + 4 * (flat % 2 == 0)

    def elements(self, units: np.ndarray, raw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        byte = raw.reshape(-1).numpy().astype(np.int64)
        flat = np.concatenate([2 * units, 2 * units + 1])
        codes = np.concatenate([byte >> 4, byte & 0xF])
        keep = flat < self.n  # an odd count pads the last byte's low nibble
        return flat[keep], codes[keep]

    def values(self, flat: np.ndarray, codes: np.ndarray, read: Read) -> list[float]:
        scales = self.block_scales(read).cpu()[torch.as_tensor(flat // self.block)]
        return (self.table[torch.as_tensor(codes)] * scales).double().tolist()  # float32, as the kernels

    def write(self, raw: torch.Tensor, units: np.ndarray, flat: np.ndarray, code: int) -> torch.Tensor:
        byte = raw.reshape(-1).numpy().astype(np.int64)
        position = np.searchsorted(units, flat // 2)  # `units` is sorted and holds every flat // 2
        high = flat % 2 == 0
        byte[position[high]] = (byte[position[high]] & 0x0F) | (code << 4)
        byte[position[~high]] = (byte[position[~high]] & 0xF0) | code
        return torch.as_tensor(byte.astype(np.uint8)).view(raw.shape)

    def codes(self, storage: torch.Tensor) -> torch.Tensor:
        byte = storage.reshape(-1).to(torch.int64)
        return torch.stack([byte >> 4, byte & 0xF], dim=1).reshape(-1)[: self.n]

    def dequantize(self, storage: torch.Tensor, read: Read) -> torch.Tensor:
        codes = self.codes(storage.cpu())
        scales = self.block_scales(read).cpu().repeat_interleave(self.block)[: self.n]
        return (self.table[codes] * scales).reshape(self.shape)


class IndexScale:
    """Double-quantized 4-bit block scales: 8-bit indexes into `scale_code`, times a float32 per 256 blocks."""

    zero_code = None  # no exact zero: zeroing is not defined on statistics

    def __init__(self, shape: tuple[int], code: torch.Tensor, scale2: torch.Tensor, offset: torch.Tensor):
        self.shape, self.code, self.scale2, self.offset = shape, code, scale2, offset

    def locate(self, flat, bits):
        return flat, bits

    def elements(self, units: np.ndarray, raw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return units, raw.reshape(-1).numpy().astype(np.int64)

    def values(self, flat: np.ndarray, codes: np.ndarray, read: Read) -> list[float]:
        return self.decode(torch.as_tensor(codes), torch.as_tensor(flat), read).double().tolist()

    def decode(self, codes: torch.Tensor, flat: torch.Tensor, read: Read) -> torch.Tensor:
        """Block scales in float32, step by step as bitsandbytes: code * scale2, then + offset."""
        scaled = read(self.code).cpu()[codes] * read(self.scale2).cpu()[flat // NESTED_BLOCK]
        return scaled + read(self.offset).cpu()

    def dequantize(self, storage: torch.Tensor, read: Read) -> torch.Tensor:
        codes = storage.reshape(-1).cpu().to(torch.int64)
        return self.decode(codes, torch.arange(len(codes)), read)


def module_of(model: nn.Module, ref) -> nn.Module | None:
    """The quantized module whose weight `ref` names (its codes or a statistic), None for float storage."""
    return quantized_weights(model).get(ref.param)


def is_quantized(model: nn.Module, ref) -> bool:
    return getattr(ref, "part", None) is not None or module_of(model, ref) is not None


def elements_of(model: nn.Module, ref) -> Elements:
    """The elements of one canonical tensor (a TensorRef), on a loaded or a meta model."""
    module = module_of(model, ref)
    if module is None:
        tensor = ref.resolve(model)
        return Elements(ref.name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), tensor)
    part = getattr(ref, "part", None)
    return _statistic(module, ref.name, part) if part else _codes(module, ref.name)


def _codes(module: nn.Module, name: str) -> Elements:
    fmt, shape, storage = format_of(module), logical_shape(module), part_tensor(module, "")
    if fmt == "int8":
        scale = part_tensor(module, "scale")
        scales = lambda flat: (_statistic(module, f"{name}.scale", "scale"), flat // shape[1])  # noqa: E731
        return Elements(name, fmt, shape, storage, Int8Codes(shape, scale), scales=scales)
    block = blocksize(module)
    decoder = Packed4bit(shape, _table(fmt), block, lambda read: block_scales(module, read))
    part, per = ("scale2", block * NESTED_BLOCK) if nested(module) else ("scale", block)  # the nearest float32 scale
    scales = lambda flat: (_statistic(module, f"{name}.{part}", part), flat // per)  # noqa: E731
    return Elements(name, fmt, shape, storage, decoder, scales=scales)


def _statistic(module: nn.Module, name: str, part: str) -> Elements:
    tensor = part_tensor(module, part)
    if part == "scale" and tensor.dtype == torch.uint8:  # double-quantized block scales
        decoder = IndexScale(tuple(tensor.shape), part_tensor(module, "scale_code"), part_tensor(module, "scale2"),
                             part_tensor(module, "scale_offset"))
        return Elements(name, "index8", tuple(tensor.shape), tensor, decoder, statistic=True)
    return Elements(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), tensor, statistic=True)


def block_scales(module: nn.Module, read: Read) -> torch.Tensor:
    """A 4-bit module's per-block scales (absmax) in float32, decoded when double-quantized."""
    scale = part_tensor(module, "scale")
    if scale.dtype != torch.uint8:
        return read(scale)
    decoder = IndexScale(tuple(scale.shape), part_tensor(module, "scale_code"), part_tensor(module, "scale2"),
                         part_tensor(module, "scale_offset"))
    return decoder.dequantize(read(scale), read)


@functools.lru_cache(maxsize=None)
def _table(fmt: str) -> torch.Tensor:
    """The 16 values of a 4-bit format, as bitsandbytes' kernels use them (float32, CPU)."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(fmt, device="cpu").float()
