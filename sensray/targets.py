"""Selecting tensors by canonical name patterns, layer ranges, or raw parameter names.

A pattern is matched segment by segment against canonical names (see architectures.py):

    blocks.*              every decoder block            (`*` is exactly one segment)
    blocks.0-7.mlp.*      the MLP projections of blocks 0..7
    blocks.2,5.attn.q     q of blocks 2 and 5
    blocks.**.weight      every weight inside any block   (`**` is any number of segments)
    blocks.3.mlp.down.weight
    model.layers.3.mlp.down_proj.weight   (a raw HF parameter name, or a glob over them)

Components are tried first, then canonical tensor names, then raw parameter names. A pattern
that selects nothing is an error that says what the model has instead. Layer ranges are kept as
(low, high) pairs and checked against the model's depth, never enumerated, so a range such as
`blocks.0-999999999` is an error in microseconds, not a billion-way regex.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from sensray.architectures import Component, TensorRef, components, parameter


class TargetError(ValueError):
    """A target pattern selects nothing, or names a layer the model does not have."""


@dataclass(frozen=True)
class Selection:
    pattern: str
    components: tuple[Component, ...]
    tensors: tuple[TensorRef, ...]

    @property
    def layers(self) -> set[int | None]:
        return {c.layer for c in self.components}


# A layer segment: 3, 0-7 or 2,5,10-11 (numbers of at most 18 digits: int64, and int() stays cheap).
RANGES = re.compile(r"\d{1,18}(-\d{1,18})?(,\d{1,18}(-\d{1,18})?)*")


@dataclass(frozen=True)
class _Matcher:
    """A compiled pattern: a regex in which each layer-range segment captures its digits, which
    are then checked against that segment's (low, high) ranges."""

    regex: re.Pattern
    ranges: tuple[tuple[tuple[int, int], ...], ...]

    def match(self, name: str) -> bool:
        found = self.regex.match(name)
        if found is None:
            return False
        layers = [int(found.group(f"r{i}")) for i in range(len(self.ranges))]
        return all(any(low <= layer <= high for low, high in ranges) for layer, ranges in zip(layers, self.ranges))


@lru_cache(maxsize=256)
def _compile(pattern: str) -> _Matcher:
    parts, ranges = [], []
    for segment in pattern.split("."):
        if segment == "**":
            parts.append(r"(?:[^.]+(?:\.[^.]+)*)")
        elif RANGES.fullmatch(segment):
            parts.append(rf"(?P<r{len(ranges)}>\d+)")
            ranges.append(_ranges(pattern, segment))
        else:
            parts.append(fnmatch.translate(segment).removeprefix("(?s:").removesuffix(")\\Z").replace(".*", "[^.]*"))
    return _Matcher(re.compile(r"\.".join(parts) + r"\Z"), tuple(ranges))


def _ranges(pattern: str, segment: str) -> tuple[tuple[int, int], ...]:
    """'2,5-7' -> ((2, 2), (5, 7)); an empty range (7-5) is an error."""
    out = []
    for part in segment.split(","):
        low, _, high = part.partition("-")
        low, high = int(low), int(high or low)
        if low > high:
            raise TargetError(f"{pattern!r}: layer range {part} is empty (write low-high, the lower layer first)")
        out.append((low, high))
    return tuple(out)


def _check_layers(pattern: str, depth: int) -> None:
    for segment in pattern.split(".")[1:2] if pattern.startswith("blocks.") else []:
        if RANGES.fullmatch(segment):
            past = [max(low, depth) for low, high in _ranges(pattern, segment) if high >= depth]
            if past:
                raise TargetError(
                    f"{pattern!r}: layer {min(past)} is past the model's depth ({depth} blocks: blocks.0-{depth - 1})"
                )


_TABLES: "weakref.WeakKeyDictionary[nn.Module, dict[str, Component]]" = weakref.WeakKeyDictionary()


def _table(model: nn.Module) -> dict[str, Component]:
    """components(model), built once per model: sweeps resolve hundreds of patterns."""
    if model not in _TABLES:
        _TABLES[model] = components(model)
    return _TABLES[model]


def matching_components(model: nn.Module, pattern: str) -> list[Component]:
    regex = _compile(pattern)
    return [c for name, c in _table(model).items() if regex.match(name)]


def select(model: nn.Module, pattern: str) -> Selection:
    """The components and (deduplicated) tensors a pattern selects."""
    table = _table(model)
    _check_layers(pattern, sum(1 for c in table.values() if c.kind == "block"))
    regex = _compile(pattern)
    chosen = [c for name, c in table.items() if regex.match(name)]
    if chosen:
        refs = [ref for c in chosen for ref in c.tensors]
    else:
        every = {ref.name: ref for c in table.values() for ref in c.tensors}
        refs = [ref for name, ref in every.items() if regex.match(name)]
        if not refs:
            refs = _raw(model, pattern)
    if not refs:
        raise TargetError(_nothing_message(pattern, table))
    return Selection(pattern, tuple(chosen), tuple(_dedupe(model, refs)))


def _raw(model: nn.Module, pattern: str) -> list[TensorRef]:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    return [TensorRef(name=n, param=n) for n in names if fnmatch.fnmatchcase(n, pattern)]


def _dedupe(model: nn.Module, refs: list[TensorRef]) -> list[TensorRef]:
    """Each storage once: tied weights share a Parameter; a view of a wholly selected param is redundant;
    a quantized weight's statistics (`part`) are storage of their own."""
    whole = {id(parameter(model, r.param)) for r in refs if r.whole and r.part is None}
    seen, out = set(), []
    for ref in refs:
        param = id(parameter(model, ref.param))
        key = (param, None if ref.whole else ref.name, ref.part)
        if key in seen or (not ref.whole and param in whole):
            continue
        seen.add(key)
        out.append(ref)
    return out


def _nothing_message(pattern: str, table: dict[str, Component]) -> str:
    close = difflib.get_close_matches(pattern, list(table), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    kinds = sorted({c.name.split(".", 2)[-1] for c in table.values() if c.layer == 0 and c.kind != "block"})
    tops = [n for n, c in table.items() if c.layer is None]
    return (
        f"target {pattern!r} matches no tensor{hint} "
        f"(top level: {', '.join(tops)}; per block: blocks.N, blocks.N.{{{','.join(kinds)}}})"
    )


def each(model: nn.Module, pattern: str) -> list[str]:
    """The names a pattern matches, one grid value each (components, else tensor names)."""
    select(model, pattern)  # raise the same errors as a single target would
    names = [c.name for c in matching_components(model, pattern)]
    if names:
        return names
    regex = _compile(pattern)
    tensors = {r.name: None for c in _table(model).values() for r in c.tensors if regex.match(r.name)}
    return list(tensors) or [pattern]
