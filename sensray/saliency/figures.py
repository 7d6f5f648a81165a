"""Figures of a saliency map: the per-block x module heatmap, and predicted against measured per run.

    fig = heatmap(frames["tensors"], check=table)      # predicted damage of zeroing | measured (ablation)
    fig = scatter(table, correlations)                 # one panel per checked run
    save(fig, out / "heatmap")                         # sensray.analyze.figures.save

Both follow sensray.analyze.figures: a `Figure` drawn by the Agg canvas, never pyplot; titled;
non-finite values are never dropped (clipped to the edge of the scale and marked). Loss changes
can be negative (zeroing a weight can lower the loss to first order), so colour and axes use a
symmetric log scale around zero.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure

from sensray.analyze.figures import NONFINITE, palette, save  # noqa: F401  (save re-exported)
from sensray.analyze.tables import module_rank


def grid(frame: pl.DataFrame, value: str) -> tuple[list[str], list[int], np.ndarray]:
    """(modules in model order, blocks, values[module, block] summed over each module's tensors; NaN: none)."""
    frame = frame.filter(pl.col("layer").is_not_null() & pl.col("module").is_not_null())
    modules = sorted(frame["module"].unique().to_list(), key=module_rank)
    blocks = sorted(frame["layer"].unique().to_list())
    cells = frame.group_by("module", "layer").agg(pl.col(value).sum())
    out = np.full((len(modules), len(blocks)), np.nan)
    for module, layer, v in cells.iter_rows():
        out[modules.index(module), blocks.index(layer)] = v
    return modules, blocks, out


def heatmap(tensors: pl.DataFrame, check: pl.DataFrame | None = None, context: str = "") -> Figure:
    """Predicted loss change of zeroing each block's modules, beside the measured one when an ablation
    run was checked (else beside the Taylor score sum |g * w|)."""
    value = "zero_predicted"
    order = "first + second order" if tensors["zero_second"].null_count() == 0 else "first order"
    panels = [(f"predicted: zeroing ({order})", grid(tensors, value))]
    measured = _ablation(check)
    if measured is not None and len(measured):
        panels.append(("measured: zero ablation (sweep)", grid(measured, "measured")))
    else:
        panels.append(("Taylor score sum |g * w|", grid(tensors, "taylor")))
    finite = np.concatenate([p[1][2][np.isfinite(p[1][2])].ravel() for p in panels])
    top = float(np.abs(finite).max()) if finite.size else 1.0
    norm = SymLogNorm(linthresh=max(top * 1e-3, 1e-12), vmin=-top, vmax=top)
    fig = Figure(figsize=(5 + 3.2 * len(panels) + 0.25 * len(panels[0][1][1]), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, (modules, blocks, values)) in zip(axes, panels):
        image = ax.imshow(np.clip(values, -top, top), cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_yticks(range(len(modules)), modules)
        ax.set_xlabel("decoder block")
        ax.set_title(title, fontsize=9)
        for y, x in zip(*np.nonzero(~np.isfinite(values) & ~np.isnan(values))):
            ax.text(x, y, "inf", ha="center", va="center", color="white", fontsize=7, backgroundcolor=NONFINITE)
    fig.colorbar(image, ax=list(axes), label="loss change (nats of mean NLL; symmetric log)")
    fig.suptitle("Sensitivity per block and module: zeroing it" + (f"\n{context}" if context else ""), fontsize=11)
    return fig


def _ablation(check: pl.DataFrame | None) -> pl.DataFrame | None:
    if check is None or "mode" not in check.columns:
        return None
    return check.filter((pl.col("kind") == "ablation") & (pl.col("mode") == "zero"))


def scatter(check: pl.DataFrame, correlations: pl.DataFrame, context: str = "") -> Figure:
    """Per checked run: predicted (first + second order) against measured delta_nll, one point per trial."""
    runs = check["run"].unique(maintain_order=True).to_list()
    fig = Figure(figsize=(4.4 * len(runs) + 1, 4.4), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs):
        part = check.filter((pl.col("run") == run) & pl.col("predicted").is_not_nan() & pl.col("measured").is_not_nan())
        _points(ax, part)
        rho = correlations.filter((pl.col("run") == run) & (pl.col("granularity") == "trial"))
        said = f"rho {rho['rho_predicted'][0]:.2f} (first order {rho['rho_first'][0]:.2f})" if len(rho) else ""
        ax.set_title(f"{run}\n{part['kind'][0] if len(part) else ''}: {said}", fontsize=8)
        ax.set_xlabel("predicted loss change (nats)")
        ax.set_ylabel("measured delta_nll (nats)")
    fig.suptitle("Gradient predictions against the sweep" + (f"\n{context}" if context else ""), fontsize=11)
    return fig


def _points(ax, part: pl.DataFrame) -> None:
    x, y = part["predicted"].to_numpy(), part["measured"].to_numpy()
    finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)], [1e-6]])
    top = float(np.abs(finite).max()) * 3
    groups = part["field"].to_list() if part["field"].null_count() < len(part) else part["kind"].to_list()
    names = list(dict.fromkeys(groups))
    colours = dict(zip(names, palette(len(names))))
    for name in names:
        mask = np.array([g == name for g in groups])
        ax.scatter(np.clip(x[mask], -top, top), np.clip(y[mask], -top, top), s=10, alpha=0.7, color=colours[name],
                   label=name)
    off = ~(np.isfinite(x) & np.isfinite(y))
    if off.any():
        ax.scatter(np.clip(x[off], -top, top), np.clip(y[off], -top, top), s=40, marker="^", facecolors="none",
                   edgecolors=NONFINITE, label="non-finite (at the edge)")
    ax.set_xscale("symlog", linthresh=max(top * 1e-4, 1e-9))
    ax.set_yscale("symlog", linthresh=max(top * 1e-4, 1e-9))
    diagonal = np.concatenate([-np.geomspace(top, 1e-12, 200), np.geomspace(1e-12, top, 200)])
    ax.plot(diagonal, diagonal, color="black", linewidth=0.8, linestyle=":", label="predicted = measured")
    ax.tick_params(labelsize=7)
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(fontsize=7, loc="upper left")
