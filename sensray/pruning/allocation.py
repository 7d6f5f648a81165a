"""Per-tensor sparsities from a finished run: less sensitive layers pruned more, same total.

A run that perturbed each layer on its own (e.g. experiments/prune-layers.yaml: each decoder
block pruned alone) says how much each layer matters. For every tensor to prune, its
sensitivity is the median delta_ppl (ppl / baseline) of the run's trials whose target is that
tensor, else its component (`blocks.3.mlp.down`), else its decoder block (`blocks.3`).

Sensitivities are compared on a log scale, min-max normalised to z in [-1, 1] (non-finite
ones count as the largest finite one), and a tensor gets sparsity

    s_t = S - spread * z_t + c

with c the one shift that makes the parameter-weighted mean of clip(s_t, 0, 1) equal the
requested S: the most sensitive layer is pruned about 2 * spread less than the least.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from sensray.perturbations.base import ParamError


def run_table(run: str):
    """The trials of a run directory, or of the latest finished run of an experiment directory."""
    path = Path(run)
    table = path / "trials.parquet"
    if not table.is_file():
        runs = sorted(path.glob("*/trials.parquet")) if path.is_dir() else []
        if not runs:
            raise ParamError("run", f"{run!r} holds no finished sensray run (no trials.parquet); run a per-layer "
                                    f"sweep first, e.g. python -m sensray.sweep experiments/prune-layers.yaml")
        table = runs[-1]  # run ids start with their start time, so the last sorts latest
    return _read(str(table.resolve()), os.stat(table).st_mtime_ns)


@lru_cache(maxsize=8)
def _read(table: str, mtime: int):
    import polars as pl  # only sensitivity runs need it; every sweep imports this module

    try:
        trials = pl.read_parquet(table, columns=["target", "delta_ppl", "error"])
    except (OSError, pl.exceptions.PolarsError) as err:
        raise ParamError("run", f"{table}: cannot read the trial table: {err}") from None
    return trials.filter(pl.col("error").is_null() & pl.col("delta_ppl").is_not_null())


def candidates(name: str) -> list[str]:
    """Targets whose trials stand for tensor `name`: itself, its component, its decoder block."""
    out = [name, name.rsplit(".", 1)[0]]
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        out.append(".".join(parts[:2]))
    return list(dict.fromkeys(out))


def sensitivities(run: str, names: list[str]) -> np.ndarray:
    """Median delta_ppl per tensor name, from the run's per-layer trials; ParamError if any is missing."""
    import polars as pl

    trials = run_table(run)
    medians = dict(trials.group_by("target").agg(pl.col("delta_ppl").median()).iter_rows())
    out = []
    for name in names:
        found = next((medians[c] for c in candidates(name) if c in medians), None)
        if found is None:
            have = ", ".join(sorted(medians)[:8]) + (", ..." if len(medians) > 8 else "")
            raise ParamError("run", f"run {run!r} has no finished trial targeting {' or '.join(candidates(name))} "
                                    f"(its targets: {have or 'none'}); sweep each layer on its own first")
        out.append(found)
    return np.array(out, dtype=np.float64)


def allot(sizes: np.ndarray, sensitivity: np.ndarray, sparsity: float, spread: float) -> np.ndarray:
    """Per-tensor sparsities in [0, 1] whose size-weighted mean is `sparsity`."""
    z = _normalised(np.log(np.where(np.isnan(sensitivity), 1.0, sensitivity)))
    wanted = sparsity - spread * z
    weights = sizes / sizes.sum()

    def mean_at(shift: float) -> float:
        return float(weights @ np.clip(wanted + shift, 0.0, 1.0))

    low, high = -1.0 - spread, 1.0 + spread  # mean_at is monotone: bisect for the shift
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_at(middle) < sparsity else (low, middle)
    return np.clip(wanted + (low + high) / 2, 0.0, 1.0)


def _normalised(x: np.ndarray) -> np.ndarray:
    """Min-max onto [-1, 1]; +inf (non-finite trials) counts as the largest finite value."""
    finite = x[np.isfinite(x)]
    if finite.size == 0 or finite.max() == finite.min():
        return np.zeros_like(x)
    x = np.clip(x, finite.min(), finite.max())
    return 2 * (x - finite.min()) / (finite.max() - finite.min()) - 1
