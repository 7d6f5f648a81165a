"""An allocation stage's table and figure: per tensor, its sensitivity and the sparsity it is allotted.

    table = allocate(ModelSpec(name="sensray-tiny"), run_dir, sparsity=0.5, spread=0.1)
    table["tensors"]["blocks.0.mlp.down.weight"]   # {"param", "numel", "sensitivity", "sparsity"}

The numbers come from sensray.pruning.allocation on the model's structure (a meta model: no
weights), exactly as `sensray prune --method sensitivity` computes them, so the pruned export's
`allotted` sparsities equal these (a test holds them equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sensray.analyze.figures import palette, plain_log_ticks


def allocate(model_spec, run: Path, sparsity: float, spread: float, target: str) -> dict[str, Any]:
    from sensray.models import meta_model
    from sensray.perturbations.prune import matrices
    from sensray.pruning.allocation import allot, sensitivities
    from sensray.targets import select

    model = meta_model(model_spec)
    refs = matrices(model, select(model, target).tensors, target)
    sizes = np.array([ref.resolve(model).numel() for ref in refs], dtype=np.float64)
    sens = sensitivities(str(run), [ref.name for ref in refs])
    allotted = allot(sizes, sens, sparsity, spread)
    tensors = {ref.name: {"param": ref.param, "numel": int(size), "sensitivity": float(s), "sparsity": float(a)}
               for ref, size, s, a in zip(refs, sizes, sens, allotted)}
    return {"run": str(run), "requested": sparsity, "spread": spread, "target": target,
            "overall": float(sizes @ allotted / sizes.sum()), "min": float(allotted.min()),
            "max": float(allotted.max()), "tensors": tensors}


def allocation_figure(table: dict[str, Any], title: str) -> Figure:
    """Per tensor (in model order): allotted sparsity as bars, sensitivity (delta_ppl) as points."""
    names = list(table["tensors"])
    rows = [table["tensors"][n] for n in names]
    fig = Figure(figsize=(max(8.0, 0.16 * len(names) + 3), 4.8), layout="constrained")
    ax = fig.add_subplot()
    bar, dot = palette(2)
    x = np.arange(len(names))
    ax.bar(x, [r["sparsity"] for r in rows], color=bar, label="allotted sparsity")
    ax.axhline(table["requested"], color="black", linewidth=1.0, label=f"requested mean ({table['requested']:g})")
    ax.set(ylabel="sparsity (share of weights zeroed)", ylim=(0, 1))
    sens = ax.twinx()
    sens.plot(x, [r["sensitivity"] for r in rows], "o", color=dot, markersize=3, label="sensitivity")
    sens.set(yscale="log", ylabel="sensitivity: ppl / baseline when pruned alone (log)")
    plain_log_ticks(sens.yaxis)
    ax.set_xticks(x, [n.removesuffix(".weight") for n in names], rotation=90, fontsize=6)
    handles = ax.get_legend_handles_labels()[0] + sens.get_legend_handles_labels()[0]
    fig.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="outside right upper")
    fig.suptitle(title, fontsize=11)
    return fig
