"""Committed state: changes a replica keeps across trials (an attack's accepted bit flips).

A replica's state is its loaded weights plus an ordered list of committed changes. A change is one
element's raw bits (a float's, or on a quantized model a code's or a statistic's), recorded exactly
as a trial's provenance records it (the `changes` column of the trial table: tensor, index, coords,
bit, old, new, old_bits, new_bits), so the row that measured a candidate flip is also the record that
commits it:

    apply_changes(model, row["changes"])      # checks each element's old_bits, writes its new_bits
    revert_changes(model, changes)            # in reverse: checks new_bits, writes old_bits back
    with committed(model, changes): ...       # both, verified by checksum (generate --attack)

Trials restore to the committed state for free: their undo record saves the bits they overwrite,
which are the committed ones. A replica that joins late, or replaces one that died, replays the list
after loading. Every write first checks the bits it overwrites, so a list replayed onto other
weights (another model, a stale cache, a change applied twice) fails loudly instead of silently
producing a different model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from sensray.errors import RestoreError
from sensray.perturbations.edits import as_bits
from sensray.targets import TargetError, select

Change = dict[str, Any]  # one element of a provenance `changes` list


def apply_changes(model: nn.Module, changes: Iterable[Change]) -> None:
    """Write each change's new bits, in order, after checking that the element holds its old bits.
    All or nothing: when a check fails, the changes already written are reverted before the error."""
    done: list[Change] = []
    try:
        for change in changes:
            _write(model, change, expect="old_bits", put="new_bits")
            done.append(change)
    except RestoreError:
        revert_changes(model, done)
        raise


def revert_changes(model: nn.Module, changes: Iterable[Change]) -> None:
    """Undo `changes` (last first): each element must hold its new bits and gets its old bits back."""
    for change in reversed(list(changes)):
        _write(model, change, expect="new_bits", put="old_bits")


@contextlib.contextmanager
def committed(model: nn.Module, changes: list[Change]) -> Iterator[None]:
    """The model with `changes` applied inside the block; reverted and checksum-verified on exit."""
    from sensray.checksum import weights_checksum

    before = weights_checksum(model)
    apply_changes(model, changes)
    try:
        yield
    finally:
        revert_changes(model, changes)
        after = weights_checksum(model)
        if after != before:
            raise RestoreError(f"weights differ after reverting {len(changes)} committed changes "
                               f"(checksum {before} -> {after})")


def _elements(model: nn.Module, name: str):
    """The elements (sensray.quantized.elements) a canonical or raw name names: a parameter's data, a fused
    q/k/v view of it, a quantized weight's codes or one of its statistics."""
    from sensray.quantized.elements import elements_of

    try:
        refs = [ref for ref in select(model, name).tensors if ref.name == name]
    except TargetError as err:
        raise RestoreError(f"committed change on {name!r}: {err}") from None
    if len(refs) != 1:
        raise RestoreError(f"committed change on {name!r}: not the name of one tensor of this model")
    return elements_of(model, refs[0])


def _write(model: nn.Module, change: Change, expect: str, put: str) -> None:
    """One element's bits: found in its storage unit (a float, an int8 code, a nibble of a byte), checked
    against `expect`, replaced by `put`."""
    el = _elements(model, change["tensor"])
    if not 0 <= change["index"] < el.numel:
        raise RestoreError(f"committed change {_where(change)}: index outside a tensor of {el.numel} elements")
    units, shifts = el.locate(np.array([change["index"]]), np.array([0]))
    raw = as_bits(el.storage)
    width = torch.iinfo(raw.dtype).bits
    where = tuple(int(c) for c in np.unravel_index(int(units[0]), tuple(raw.shape)))
    unit, shift, mask = int(raw[where]) & ((1 << width) - 1), int(shifts[0]), (1 << el.width) - 1
    found = (unit >> shift) & mask
    if found != change[expect]:
        raise RestoreError(f"committed change {_where(change)}: expected bits 0x{change[expect]:x}, found "
                           f"0x{found:x}: these are not the weights the change was recorded on")
    unit = unit & ~(mask << shift) | change[put] << shift
    raw[where] = unit - (1 << width) if raw.dtype.is_signed and unit >= 1 << (width - 1) else unit


def _where(change: Change) -> str:
    bit = f" bit {change['bit']}" if change.get("bit") is not None else ""
    return f"{change['tensor']}[{change['index']}]{bit}"


def change_key(change: Change) -> tuple[str, int, int | None]:
    """(tensor, flat index, bit): what identifies a flip, e.g. to leave committed ones out of a search."""
    return change["tensor"], int(change["index"]), change.get("bit")
