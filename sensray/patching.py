"""Replacing modules' forwards for the length of a block, and putting back exactly what was there.

    with forwards_replaced([(block, new_forward), ...]):
        model(...)                 # each block runs new_forward
    # each block's forward is what it was: its class's, or the instance-level one accelerate installed

A replacement is set on the instance. On exit an instance-level forward that existed before (accelerate
puts one on dispatched models) is restored, and one that did not is deleted, so the class's method
shows through again. Prefix reuse, gradient checkpointing and the quantized gradient taps all patch
forwards this way.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

from torch import nn

_ABSENT = object()


@contextlib.contextmanager
def forwards_replaced(replacements: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    patched = []
    try:
        for module, forward in replacements:
            patched.append((module, module.__dict__.get("forward", _ABSENT)))
            module.forward = forward
        yield
    finally:
        for module, own in reversed(patched):
            if own is _ABSENT:
                del module.forward
            else:
                module.forward = own
