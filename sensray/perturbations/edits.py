"""The undo record of one trial, and what it says the trial changed.

    edits = Edits()                                          # exists before the first write
    raw, index = edits.elements(tensor, name, flat)          # saves those elements' bits, then you write
    raw, index = edits.elements(storage, name, units, decoder)   # packed / quantized storage (see below)
    live = edits.tensor(tensor, name)                        # saves a copy of the tensor, then you write
    edits.hook(block, name, block.register_forward_hook(...))
    edits.provenance()                                       # the row's description of every change
    edits.restore(); assert edits.verify()                   # bit-exact

A kind never writes a weight that it has not first handed to `Edits`. So when a write fails
half-way (a CUDA OOM on the second tensor, say), everything already changed is covered, and
`Perturbation.apply` restores it before re-raising: a failed trial cannot leave the model damaged.

The record keeps only what it overwrote (k elements' raw bits for k flips; one copy of each tensor
it overwrites wholesale), so a replica can run thousands of trials on one loaded model. Because it
holds both the originals and the live storage, it is also the one place that knows exactly what a
trial did: `provenance()` reads the new values back (cheap: the saved elements, or one pass over
each saved tensor) and describes them, the same way for every kind.

Quantized storage (sensray/quantized) is saved the same way, as raw storage units (int8 codes,
bytes holding two 4-bit codes, float32 scales), so restore and verify compare raw bytes. What the
units *mean* comes from a `decoder` handed in with them: it maps units to the weight elements they
hold (`elements(units, raw) -> (element indices, codes)`), gives the elements' logical `shape`, and
dequantizes (`values(elements, codes, read)`, `codes(storage)`, `dequantize(storage, read)`; `read`
gives a statistic tensor as it was before the trial or as it is now). So a row records the weight
element, the code bit, the raw code old -> new and the dequantized weight old -> new, through the
same mechanism as a float flip.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

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


def unsigned(raw: torch.Tensor) -> list[int]:
    """Raw integer bits as non-negative Python ints (0x3F800000, not a negative int32)."""
    width = torch.iinfo(raw.dtype).bits
    return [v & ((1 << width) - 1) for v in raw.tolist()]


class ElementEdit:
    """Scattered elements of one tensor (or fused view), saved as raw bits before they are written."""

    def __init__(self, tensor: torch.Tensor, name: str, flat: np.ndarray, decoder: Any = None):
        self.tensor, self.name, self.flat = tensor, name, np.asarray(flat, dtype=np.int64)
        self.decoder = decoder
        self.raw = as_bits(tensor)
        coords = np.unravel_index(self.flat, tuple(tensor.shape))
        self.index = tuple(torch.as_tensor(c, device=tensor.device) for c in coords)
        self.saved = self.raw[self.index].clone()

    def restore(self) -> None:
        self.raw.index_put_(self.index, self.saved)

    def verify(self) -> bool:
        return torch.equal(self.raw[self.index], self.saved)

    def touches(self) -> list[torch.Tensor]:
        return [self.raw]

    def restore_into(self, live: torch.Tensor, copy: torch.Tensor) -> None:
        """Write the saved bits into `copy` (a clone of `live`) when this part saved elements of `live`."""
        if same_view(self.tensor, live):
            as_bits(copy).index_put_(self.index, self.saved)

    def element_changes(self, original: Callable[[torch.Tensor], torch.Tensor]) -> list[dict[str, Any]]:
        """One record per element whose bits changed: where, which bit, old and new value and bits."""
        if self.decoder is not None:
            return self._decoded_changes(original)
        new_raw = self.raw[self.index]
        changed = (new_raw != self.saved).cpu().numpy()
        old_bits, new_bits = unsigned(self.saved.cpu()[changed]), unsigned(new_raw.cpu()[changed])
        old, new = self._values(self.saved[changed]), self._values(new_raw[changed])
        coords = np.stack(np.unravel_index(self.flat[changed], tuple(self.tensor.shape)), axis=-1).tolist()
        return [
            {"tensor": self.name, "index": int(flat), "coords": coord, "bit": single_bit(a ^ b),
             "old": o, "new": n, "old_bits": a, "new_bits": b}
            for flat, coord, a, b, o, n in zip(self.flat[changed].tolist(), coords, old_bits, new_bits, old, new)
        ]

    def _decoded_changes(self, original: Callable[[torch.Tensor], torch.Tensor]) -> list[dict[str, Any]]:
        """The changed elements of packed or quantized storage: codes as raw bits, values dequantized."""
        elements, old_codes = self.decoder.elements(self.flat, self.saved.cpu())
        _, new_codes = self.decoder.elements(self.flat, self.raw[self.index].cpu())
        changed = old_codes != new_codes
        elements, old_codes, new_codes = elements[changed], old_codes[changed], new_codes[changed]
        old = self.decoder.values(elements, old_codes, original)
        new = self.decoder.values(elements, new_codes, lambda t: t)
        coords = np.stack(np.unravel_index(elements, self.decoder.shape), axis=-1).tolist()
        return [
            {"tensor": self.name, "index": int(e), "coords": coord, "bit": single_bit(int(a) ^ int(b)),
             "old": o, "new": n, "old_bits": int(a), "new_bits": int(b)}
            for e, coord, a, b, o, n in zip(elements.tolist(), coords, old_codes, new_codes, old, new)
        ]

    def summary(self, changes: list[dict], original: Callable) -> dict[str, Any]:
        mine = sum(1 for c in changes if c["tensor"] == self.name)
        numel = math.prod(self.decoder.shape) if self.decoder is not None else self.tensor.numel()
        return tensor_summary(self.name, "elements", numel, mine)

    def _values(self, raw: torch.Tensor) -> list[float]:
        """What the raw bits mean as numbers (the storage's own dtype, widened to float64)."""
        if not self.tensor.dtype.is_floating_point:
            return [float(v) for v in raw.tolist()]
        return raw.view(self.tensor.dtype).double().cpu().tolist()


class TensorEdit:
    """A whole tensor (or fused view) that a kind overwrites: one copy saved before the write."""

    def __init__(self, tensor: torch.Tensor, name: str, decoder: Any = None):
        self.tensor, self.name, self.decoder = tensor, name, decoder
        self.saved = tensor.clone()

    def restore(self) -> None:
        self.tensor.copy_(self.saved)

    def verify(self) -> bool:
        return bits_equal(self.tensor, self.saved)

    def touches(self) -> list[torch.Tensor]:
        return [self.tensor]

    def restore_into(self, live: torch.Tensor, copy: torch.Tensor) -> None:
        if same_view(self.tensor, live):
            copy.copy_(self.saved)

    def summary(self, changes: list[dict], original: Callable) -> dict[str, Any]:
        """How much of the tensor changed and by how much: ||new - old|| / ||old||, the share of
        elements whose bits differ, and the share that is zero now (achieved sparsity for prune).
        Quantized storage is compared element by element (codes) and measured dequantized."""
        if self.decoder is None:
            old, new = self.saved.float(), self.tensor.float()
            changed = int((as_bits(self.tensor) != as_bits(self.saved)).sum())
        else:
            old = self.decoder.dequantize(self.saved, original)
            new = self.decoder.dequantize(self.tensor, lambda t: t)
            changed = int((self.decoder.codes(self.saved.cpu()) != self.decoder.codes(self.tensor.cpu())).sum())
        base = float(torch.linalg.vector_norm(old))
        delta = float(torch.linalg.vector_norm(new - old))
        rel = delta / base if base > 0 else (0.0 if delta == 0 else math.inf)
        zeros = float((new == 0).sum()) / max(1, new.numel())
        return tensor_summary(self.name, "tensor", new.numel(), changed, rel, zeros)


class HookEdit:
    """A forward hook that replaces what a module computes (block skipping): no weight changes."""

    def __init__(self, module: nn.Module, name: str, handle: Any):
        self.module, self.name, self.handle = module, name, handle

    def restore(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def verify(self) -> bool:
        return self.handle is None

    def touches(self) -> list[nn.Module]:
        return [self.module]

    def restore_into(self, live: torch.Tensor, copy: torch.Tensor) -> None:
        pass

    def summary(self, changes: list[dict], original: Callable) -> dict[str, Any]:
        return tensor_summary(self.name, "hook", None, None)


def tensor_summary(name: str, how: str, numel: int | None, changed: int | None,
                   rel_norm: float | None = None, sparsity: float | None = None) -> dict[str, Any]:
    """One entry of a row's `tensors` list (the same keys for every kind, so Parquet gets one schema)."""
    fraction = changed / numel if numel and changed is not None else None
    return {"tensor": name, "how": how, "numel": numel, "changed": changed, "fraction_changed": fraction,
            "rel_norm": rel_norm, "sparsity": sparsity}


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same elements of the same storage (not merely equal values)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def single_bit(diff: int) -> int | None:
    """The position of the one bit set in `diff`, or None when zero or several bits are set."""
    return diff.bit_length() - 1 if diff and diff & (diff - 1) == 0 else None


class Edits:
    """Every change one trial made, in order; restored in reverse order."""

    def __init__(self) -> None:
        self.parts: list[ElementEdit | TensorEdit | HookEdit] = []

    def elements(self, tensor: torch.Tensor, name: str, flat: np.ndarray,
                 decoder: Any = None) -> tuple[torch.Tensor, tuple]:
        """Save elements `flat` (row-major indices into `tensor`) of `tensor`; returns the raw-bits
        view and the index to write them through. With a `decoder`, `tensor` is packed or quantized
        storage and `flat` indexes its storage units (see the module docstring)."""
        part = ElementEdit(tensor, name, flat, decoder)
        self.parts.append(part)
        return part.raw, part.index

    def tensor(self, tensor: torch.Tensor, name: str, decoder: Any = None) -> torch.Tensor:
        """Save a copy of `tensor`; returns it, to be written in place."""
        self.parts.append(TensorEdit(tensor, name, decoder))
        return tensor

    def hook(self, module: nn.Module, name: str, handle: Any) -> None:
        self.parts.append(HookEdit(module, name, handle))

    def restore(self) -> None:
        for part in reversed(self.parts):
            part.restore()

    def verify(self) -> bool:
        return all(part.verify() for part in self.parts)

    def touches(self) -> list[torch.Tensor | nn.Module]:
        """What the trial changed: tensors (or views) and hooked modules. Prefix reuse starts a
        trial's forward at the first decoder block holding any of them."""
        return [thing for part in self.parts for thing in part.touches()]

    def original(self, tensor: torch.Tensor) -> torch.Tensor:
        """What `tensor` held before this trial: a copy with every part saved from it put back."""
        copy = tensor.clone()
        for part in reversed(self.parts):
            part.restore_into(tensor, copy)
        return copy

    def provenance(self) -> dict[str, Any]:
        """The row's description of the trial's changes (see PROVENANCE in sensray.results)."""
        elements = [part for part in self.parts if isinstance(part, ElementEdit)]
        changes = [c for part in elements for c in part.element_changes(self.original)]
        tensors = [part.summary(changes, self.original) for part in self.parts]
        elementwise = any(isinstance(part, ElementEdit) for part in self.parts)
        one = changes[0] if len(changes) == 1 else {}
        bits = {c["bit"] for c in changes}
        counted = [t["changed"] for t in tensors if t["changed"] is not None]
        per_bit = Counter(c["bit"] for c in changes if c["bit"] is not None)
        return {
            "tensor": tensors[0]["tensor"] if len({t["tensor"] for t in tensors}) == 1 else None,
            "index": one.get("index"),
            "flipped_bit": bits.pop() if len(bits) == 1 else None,
            "old": one.get("old"),
            "new": one.get("new"),
            "elements_changed": sum(counted) if counted else None,
            "changes": changes if elementwise else None,
            "bit_counts": [{"bit": b, "count": n} for b, n in sorted(per_bit.items())] if elementwise else None,
            "tensors": tensors,
        }
