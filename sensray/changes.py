"""A trial's changes in words: what `generate` prints and the analysis report shows.

A row's provenance columns (sensray.results.PROVENANCE) say exactly what the trial changed: every
changed element (`changes`: tensor, coordinates, bit, old and new value) or every touched tensor
(`tensors`: share of elements changed, relative norm of the change, sparsity after). This module
turns them into short lines such as

    blocks.3.mlp.down.weight[12, 40] bit 30: 0.0123 -> 4.19e+36
    blocks.1.attn.o.weight: 100% of 16,384 elements changed, |dW|/|W| = 0.1
"""

from __future__ import annotations

import math
from typing import Any


def value(x: float | None) -> str:
    """A weight value, short but exact enough to see what a flip did (4 significant digits)."""
    if x is None:
        return "?"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.4g}"


def element(change: dict[str, Any]) -> str:
    """One changed element: `tensor[i, j] bit b: old -> new`."""
    where = f"{change['tensor']}[{', '.join(str(c) for c in change['coords'])}]"
    bit = f" bit {change['bit']}" if change.get("bit") is not None else ""
    return f"{where}{bit}: {value(change['old'])} -> {value(change['new'])}"


def tensor(entry: dict[str, Any]) -> str:
    """One touched tensor (or hooked module)."""
    if entry["how"] == "hook":
        return f"{entry['tensor']}: skipped (its output replaced by its input; no weight changed)"
    if entry["how"] == "elements":
        return f"{entry['tensor']}: {entry['changed']:,} of {entry['numel']:,} elements changed"
    text = f"{entry['tensor']}: {entry['fraction_changed']:.1%} of {entry['numel']:,} elements changed"
    if entry.get("rel_norm") is not None:
        text += f", |dW|/|W| = {value(entry['rel_norm'])}"
    if entry.get("sparsity"):
        text += f", sparsity {entry['sparsity']:.1%}"
    return text


def describe(row: dict[str, Any], limit: int = 5) -> list[str]:
    """Lines describing what a trial changed: its elements (up to `limit`), else its tensors."""
    changes = row.get("changes") or []
    if changes:
        lines = [element(c) for c in changes[:limit]]
        if len(changes) > limit:
            per_tensor = [tensor(t) for t in row.get("tensors") or []]
            lines.append(f"... {len(changes) - limit:,} more changed elements ({'; '.join(per_tensor)})")
        return lines
    return [tensor(t) for t in (row.get("tensors") or [])[:limit]]
