"""The loss-curve figure of one heal or several (a study's), as PNG bytes or a matplotlib Figure.

    fig = loss_curves({"lora": curve}, "healing data/tiny-wanda50", note="eval ppl 45.91 -> 44.17")
    png = png_bytes(fig)
    draw_loss_curves(ax, {"allocated-lora": curve_a, "uniform-lora": curve_b})     # onto a panel of your own

Built on `matplotlib.figure.Figure` directly (no pyplot state), like every sensray figure. Each
curve is drawn per step, faint, under a moving average over a tenth of the steps, with the
learning rate on a second axis.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from sensray.analyze.figures import palette


def loss_curves(curves: dict, title: str, note: str = "") -> Figure:
    """`curves`: label -> Curve (heal.checkpoint) or {"step": [...], "loss": [...], "lr": [...]}."""
    fig = Figure(figsize=(7.5, 4.4), layout="constrained")
    draw_loss_curves(fig.add_subplot(), curves)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    return fig


def draw_loss_curves(ax, curves: dict) -> None:
    """Each curve per step (faint) under its moving average, the learning rate dotted on a second axis."""
    lr_axis = ax.twinx()
    for (label, curve), colour in zip(curves.items(), palette(max(2, len(curves)))):
        data = curve if isinstance(curve, dict) else curve.as_dict()
        steps, loss = np.asarray(data["step"]), np.asarray(data["loss"], dtype=float)
        ax.plot(steps, loss, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smoothed(loss), color=colour, linewidth=1.8, label=label)
        lr_axis.plot(steps, data["lr"], color=colour, linewidth=0.8, linestyle=":")
    ax.set(xlabel="optimizer step", ylabel="training loss (nats per token)\nfaint: per step; solid: moving average")
    lr_axis.set_ylabel("learning rate (dotted)")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.legend(fontsize=8, loc="upper right")


def smoothed(values: np.ndarray) -> np.ndarray:
    """A trailing moving average over ~10% of the steps (at least 1): the trend under batch noise."""
    width = max(1, len(values) // 10)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), width)
    return (sums[1:] - sums[np.maximum(0, np.arange(1, len(values) + 1) - width)]) / counts


def png_bytes(fig: Figure, dpi: int = 130) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()
