"""Curves: perplexity and top-1 agreement against a dose (noise sigma, bit-error rate) or a sparsity.

    from sensray.analyze import curves
    plot = curves.dose_curves(trials, baseline_ppl=43.18, x="sigma", ceiling=47.4, seq=seq)
    plot = curves.prune_curves(trials, baseline_ppl=43.18, ceiling=47.4, seq=seq)

Each group (module kind, pruning method) is one colour: its trials as dots, the median per x value
as a line, and, when the run recorded per-sequence NLLs, the 95% interval of that median as a band.
The top panel is ppl / baseline on a log axis with the baseline, the catastrophic threshold and the
uniform-output ceiling marked; the bottom panel is top-1 agreement with the unperturbed model,
which moves long before perplexity does. Pruning adds a middle panel zoomed, on a linear axis, to
the sparsities where some method is still under the threshold: there the methods differ by a few
percent, which a log axis up to the ceiling squeezes into one line. Ticks sit at the x values run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from sensray.analyze import fmt
from sensray.analyze.figures import (
    BASELINE_STYLE, CEILING_STYLE, TEXT, THRESHOLD_STYLE, WIDTH, Plot, finished, palette,
    plain_log_ticks, ratio_ticks, title,
)
from sensray.analyze.tables import CATASTROPHIC, is_random, module_rank, summarize

if TYPE_CHECKING:
    from sensray.analyze.stats import Sequences

DOSES = {  # numeric parameters drawn as curves, with their axis label
    "sigma": "noise sigma",
    "rate": "bit-error rate (flipped bits / bits)",
    "count": "flipped bits per trial",
}


def dose_curves(trials: pl.DataFrame, baseline_ppl: float, x: str = "sigma", threshold: float = CATASTROPHIC,
                ceiling: float | None = None, seq: "Sequences | None" = None, context: str = "") -> Plot | None:
    """ppl / baseline and top-1 agreement against a numeric dose per module kind, log x."""
    t = finished(trials)
    if t.is_empty() or x not in t.columns or t[x].drop_nulls().n_unique() < 2:
        return None
    t = t.with_columns(pl.col("module").alias("group"))
    groups = sorted(t["group"].unique().to_list(), key=module_rank)
    fig, (top, bottom) = _panels(2, 7.2)
    drawn = _draw_groups([top, None, bottom], t, x, groups, threshold, seq)
    _ratio_axis(top, t, threshold, ceiling)
    _agreement_axis(bottom)
    xs = sorted(t[x].drop_nulls().unique().to_list())
    for ax in (top, bottom):
        ax.set_xscale("log")
        ax.set_xticks(xs, [fmt.cell(v) for v in xs], fontsize=TEXT)
        ax.minorticks_off()
    relative = "relative" in t.columns and bool(t["relative"].drop_nulls().all())
    bottom.set_xlabel(DOSES.get(x, x) + (" (× each tensor's std)" if x == "sigma" and relative else ""), fontsize=TEXT)
    _legend(fig, top, "module kind")
    title(fig, f"{str(t['kind'][0]).capitalize()}: perplexity and top-1 agreement against {x} per module kind",
          context)
    return Plot(fig, _caption(drawn, "module kind", seq is not None))


def prune_curves(trials: pl.DataFrame, baseline_ppl: float, threshold: float = CATASTROPHIC,
                 ceiling: float | None = None, seq: "Sequences | None" = None, context: str = "") -> Plot | None:
    """Pruning: ppl / baseline (full range, then zoomed) and top-1 agreement against sparsity per method."""
    t = finished(trials, "prune")
    if t.is_empty() or ("sparsity" not in t.columns and "pattern" not in t.columns):
        return None
    t = prune_conditions(t)
    if t["x"].drop_nulls().n_unique() < 2 and t["nm"].is_null().all():
        return None  # one sparsity, no N:M: nothing to draw a curve through
    t = t.with_columns(pl.col("label").alias("group"), pl.col("x").alias("sparsity_x"))
    groups = sorted(t["group"].unique().to_list())
    fig, (full, zoom, bottom) = _panels(3, 9.6)
    drawn = _draw_groups([full, zoom, bottom], t, "sparsity_x", groups, threshold, seq)
    _ratio_axis(full, t, threshold, ceiling)
    frontier = _zoom(zoom, t, threshold)
    _agreement_axis(bottom)
    xs = sorted(t["x"].drop_nulls().unique().to_list())
    for ax in (full, zoom, bottom):
        ax.set_xticks(xs, [f"{v:g}" for v in xs], fontsize=TEXT)
    bottom.set_xlabel("sparsity (share of each pruned weight matrix set to zero)", fontsize=TEXT)
    _legend(fig, full, "method (weights compete per)")
    title(fig, "Pruning: perplexity and top-1 agreement against sparsity per method", context)
    zoomed = (f" Middle: the same on a linear axis from the baseline to the threshold ({threshold:g}×), where the "
              f"methods differ by a few percent (up to sparsity {frontier:g}, the highest at which some method stays "
              f"under it)." if frontier is not None else "")
    return Plot(fig, _caption(drawn, "method", seq is not None, zoomed))


def prune_conditions(t: pl.DataFrame) -> pl.DataFrame:
    """Add `x` (the sparsity, implied by N:M when not given), `nm` (the N:M pattern or null) and
    `label` (method, the score a sensitivity run ranks by, the scope, and the target when several)."""
    def column(name: str, default) -> pl.Expr:
        return pl.col(name) if name in t.columns else pl.lit(default)

    method, pattern = column("method", "magnitude"), column("pattern", "unstructured")
    ranking = pl.when(method == "sensitivity").then(column("score", None).fill_null("magnitude")).otherwise(method)
    nm = pl.when(pattern != "unstructured").then(pattern)
    implied = 1 - pattern.str.extract(r"^(\d+):", 1).cast(pl.Float64) / pattern.str.extract(r":(\d+)$", 1).cast(
        pl.Float64)
    scope = column("scope", None).fill_null(
        pl.when((ranking == "wanda") | nm.is_not_null()).then(pl.lit("row")).otherwise(pl.lit("tensor")))
    name = pl.when(method == "sensitivity").then(pl.format("sensitivity·{}", ranking)).otherwise(method)
    label = pl.format("{} ({})", name, scope)
    if 1 < t["target"].n_unique() <= 6:
        label = pl.format("{}, {}", label, pl.col("target"))
    return t.with_columns(pl.coalesce(column("sparsity", None).cast(pl.Float64), implied).alias("x"),
                          nm.alias("nm"), label.alias("label"))


def _panels(count: int, height: float):
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    axes = fig.subplots(count, 1, sharex=True, gridspec_kw={"height_ratios": [3] * (count - 1) + [2]})
    return fig, axes


def _draw_groups(axes: list, t: pl.DataFrame, x: str, groups: list[str], threshold: float,
                 seq: "Sequences | None") -> dict[str, bool]:
    """Dots, median lines (and interval bands) per group on the ratio panels, agreement on the last;
    returns which marks were drawn, so the caption and legend name only those."""
    ratio_axes, agreement = [a for a in axes[:-1] if a is not None], axes[-1]
    drawn = {"bands": False, "nonfinite": False, "nm": False, "random": is_random(t)}
    top = _top(t)
    for group, colour in zip(groups, palette(len(groups))):
        part = t.filter(pl.col("group") == group)
        dense = part.filter(pl.col("nm").is_null()) if "nm" in part.columns else part
        stats = summarize(dense, [x], threshold, seq).sort(x) if len(dense) else None
        for k, ax in enumerate(ratio_axes):
            drawn["nonfinite"] |= _dots(ax, dense, x, "delta_ppl", colour, top)
            if stats is not None:
                ax.plot(stats[x], np.minimum(stats["median"].to_numpy(), top), color=colour, linewidth=1.6,
                        marker="o" if len(stats) == 1 else None, label=group if k == 0 else None)
                drawn["bands"] |= _band(ax, stats, x, colour, top)
            drawn["nm"] |= _patterns(ax, part, colour, group if k == 0 and stats is None else None)
        if "top1_agreement" in t.columns:
            _dots(agreement, dense, x, "top1_agreement", colour, None)
            if stats is not None:
                agreement.plot(stats[x], stats["top1"], color=colour, linewidth=1.6)
    return drawn


def _top(t: pl.DataFrame) -> float:
    """Where non-finite trials are drawn: a little above the largest finite ratio."""
    finite = t.filter(pl.col("delta_ppl").is_finite())["delta_ppl"]
    return max(finite.max() if len(finite) else 1.0, 1.0) * 1.5


def _dots(ax, part: pl.DataFrame, x: str, metric: str, colour, top: float | None) -> bool:
    ok = part.filter(pl.col(metric).is_finite())
    ax.scatter(ok[x], ok[metric], s=12, alpha=0.4, color=colour, linewidths=0)
    bad = part.filter(~pl.col(metric).is_finite() | pl.col("nonfinite"))
    if top is not None and len(bad):
        ax.scatter(bad[x], [top] * len(bad), marker="x", s=30, color=colour, clip_on=False)
        return True
    return False


def _band(ax, stats: pl.DataFrame, x: str, colour, top: float) -> bool:
    if "median_low" not in stats.columns or stats["median_low"].null_count() == len(stats):
        return False
    ok = stats.filter(pl.col("median_low").is_not_null())
    ax.fill_between(ok[x], ok["median_low"], np.minimum(ok["median_high"].to_numpy(), top), color=colour,
                    alpha=0.15, linewidth=0)
    return True


def _patterns(ax, part: pl.DataFrame, colour, label: str | None) -> bool:
    """N:M patterns as labelled diamonds at their implied sparsity."""
    if "nm" not in part.columns:
        return False
    structured = part.filter(pl.col("nm").is_not_null() & pl.col("delta_ppl").is_finite())
    for i, ((pattern,), cell) in enumerate(structured.group_by("nm", maintain_order=True)):
        x, y = cell["x"][0], cell["delta_ppl"].median()
        ax.scatter([x], [y], marker="D", s=40, color=colour, edgecolor="black", linewidth=0.6,
                   label=label if i == 0 else None)
        ax.annotate(pattern, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=TEXT - 1, color=colour)
    return len(structured) > 0


def _ratio_axis(ax, t: pl.DataFrame, threshold: float, ceiling: float | None) -> None:
    """Log y from the lowest trial to the worst, with the baseline; the threshold and the ceiling when some
    trial comes near them (else the legend says the threshold is above the panel: the data keep the room)."""
    finite = t.filter(pl.col("delta_ppl").is_finite())["delta_ppl"].to_numpy()
    worst = finite.max() if finite.size else 1.0
    near = worst >= threshold / 1.25  # else the threshold would squeeze every curve into the bottom third
    low = min(finite.min() if finite.size else 1.0, 1.0) / 1.02
    high = max(worst, threshold) * 1.6 if near else max(worst * 1.1, 1.05)
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.axhline(1.0, **BASELINE_STYLE, label="baseline")
    if near:
        ax.axhline(threshold, **THRESHOLD_STYLE, label=f"catastrophic threshold ({threshold:g}×)")
    else:
        ax.plot([], [], **THRESHOLD_STYLE, label=f"catastrophic threshold ({threshold:g}×): above the panel, "
                                                 "no trial near it")
    if ceiling and low < ceiling < high:
        ax.axhline(ceiling, **CEILING_STYLE, label=f"uniform output: ppl = vocabulary (×{fmt.sig(ceiling)})")
    plain_log_ticks(ax.yaxis, ratio_ticks(low, high, threshold, ceiling if ceiling and ceiling < high else None))
    ax.set_ylabel("ppl / baseline (log)", fontsize=TEXT)
    ax.tick_params(labelsize=TEXT)
    ax.grid(axis="y", alpha=0.3)


def _zoom(ax, t: pl.DataFrame, threshold: float) -> float | None:
    """Linear y from the baseline to the threshold, where the methods still differ by a few percent;
    returns the highest sparsity at which some method's median is under the threshold."""
    medians = t.group_by("group", "x").agg(pl.col("delta_ppl").median())
    frontier = medians.filter(pl.col("delta_ppl") <= threshold)["x"].max()
    ax.set_ylim(min(0.99, medians["delta_ppl"].min() or 1.0), threshold * 1.03)
    ax.axhline(1.0, **BASELINE_STYLE)
    ax.axhline(threshold, **THRESHOLD_STYLE)
    ax.set_ylabel("ppl / baseline (zoom)", fontsize=TEXT)
    ax.tick_params(labelsize=TEXT)
    ax.grid(axis="y", alpha=0.3)
    return frontier


def _agreement_axis(ax) -> None:
    ax.set_ylim(-0.02, 1.02)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1], ["0%", "25%", "50%", "75%", "100%"], fontsize=TEXT)
    ax.set_ylabel("top-1 agreement", fontsize=TEXT)
    ax.grid(axis="y", alpha=0.3)


def _legend(fig: Figure, ax, heading: str) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=TEXT,
               title=heading, title_fontsize=TEXT, frameon=False)


def _caption(drawn: dict[str, bool], group: str, intervals: bool, middle: str = "") -> str:
    text = (f"Top: ppl / baseline per {group} (log), every trial a dot, the median a line"
            + (", its 95% bootstrap interval (over eval sequences" + (" and draws" if drawn["random"] else "")
               + ") the band" if drawn["bands"] else "")
            + "." + middle + " Bottom: top-1 agreement with the unperturbed model (the median a line).")
    if drawn["nonfinite"]:
        text += " Crosses on the top edge: trials that went non-finite."
    if drawn["nm"]:
        text += " Diamonds: N:M patterns at their sparsity."
    if not intervals:
        text += " No interval: this run did not record per-sequence NLLs."
    return text
