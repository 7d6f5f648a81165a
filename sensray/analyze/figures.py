"""Figures of a trial table: matplotlib, rendered by the Agg canvas, PNG (and SVG on request).

    from sensray.analyze import figures
    fig = figures.flip_heatmap(trials, baseline_ppl=23.4)      # a matplotlib Figure, or None
    figures.save(fig, Path("analysis/bitflip-heatmap"), formats=("png", "svg"))
    figures.figures_for(trials, baseline_ppl=23.4)             # every figure that applies, by name
    figures.prune_curves(trials, baseline_ppl=23.4)            # pruning: perplexity against sparsity per method

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no global state,
no window, and a notebook's own backend is left alone. Each figure is titled, its axes carry
units, and the baseline (delta_ppl = 1, or the baseline perplexity) is drawn on it. Trials that
went non-finite are never dropped: they are clipped to the top of the scale and marked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from sensray.analyze.render import ratio
from sensray.analyze.tables import CATASTROPHIC, FIELD_ORDER, annotate, module_rank, summarize

BASELINE_STYLE = dict(color="black", linewidth=1.2, linestyle="-")
THRESHOLD_STYLE = dict(color="#b2182b", linewidth=1.0, linestyle="--")
NONFINITE = "#7f0000"  # colour of non-finite trials wherever they are drawn
DOSES = {  # numeric parameters drawn as curves, with their axis label
    "sigma": "noise sigma",
    "rate": "bit-error rate (flipped bits / bits)",
    "count": "flipped bits per trial",
}


def _finished(trials: pl.DataFrame, kind: str | None = None) -> pl.DataFrame:
    t = annotate(trials).filter(pl.col("error").is_null() & pl.col("delta_ppl").is_not_null())
    return t.filter(pl.col("kind") == kind) if kind else t


def _title(fig: Figure, title: str, context: str) -> None:
    fig.suptitle(title + (f"\n{context}" if context else ""), fontsize=11)


def _significant(low: float, high: float) -> int:
    """Significant digits that tell apart ticks between low and high (5 for 1.000-1.001, 2 for 0.01-1)."""
    if not (0 < low < high and math.isfinite(high)):
        return 3
    return max(2, min(7, 2 + math.ceil(math.log10(high / (high - low)))))


def _tick_label(value: float, digits: int) -> str:
    if 10 ** digits <= value < 1e7:
        return f"{value:.0f}"  # 12000, not 1.2e+04
    return f"{value:.{digits}g}"


def plain_log_ticks(axis) -> None:
    """Log-axis ticks as plain numbers (0.99, 1, 2, 500), not 10^x: ratios near 1 must stay readable."""
    from matplotlib.ticker import FuncFormatter

    low, high = axis.get_view_interval()
    digits = _significant(low, high)
    few_decades = high / max(low, 1e-300) < 30  # label the minor ticks only when few major ones show
    axis.set_major_formatter(FuncFormatter(lambda v, _: _tick_label(v, digits)))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: _tick_label(v, digits) if few_decades else ""))


def _colour_ticks(norm: LogNorm) -> list[float]:
    """Round ticks (1, 2, 5, 10, 20, ...; decades alone over a wide range), else five steps; always 1."""
    low, high = norm.vmin, norm.vmax
    exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    round_ = [m * 10.0 ** k for k in exponents for m in (1, 2, 5) if low <= m * 10.0 ** k <= high]
    if len(round_) > 8:
        round_ = [t for t in round_ if math.log10(t).is_integer()]
    ticks = round_ if len(round_) >= 3 else np.geomspace(low, high, 5).tolist()
    crowd = 0.04 * math.log(high / low)  # ticks closer than this would overprint each other's labels
    ticks = sorted({1.0, *(t for t in ticks if abs(math.log(t)) > crowd)})
    return ticks + [high] * (math.log(high / ticks[-1]) > 2 * crowd)  # label the top, where the worst sits


def _threshold_line(ax, value: float, data: np.ndarray, label: str, vertical: bool) -> None:
    """The catastrophic threshold, drawn only when the data come near it: a line far above every
    trial would squash them into one pixel, so then the legend says so instead."""
    finite = data[np.isfinite(data) & (data > 0)]
    spread = math.log(finite.max() / finite.min()) if finite.size else 0.0
    if finite.size and math.log(value / finite.max()) > max(spread, math.log(1.5)):
        ax.plot([], [], **THRESHOLD_STYLE, label=f"{label}: off scale, no trial near it")
    elif vertical:
        ax.axvline(value, **THRESHOLD_STYLE, label=label)
    else:
        ax.axhline(value, **THRESHOLD_STYLE, label=label)


def _row_order(stats: pl.DataFrame) -> list[str]:
    """Targets in model order: by layer (spanning patterns last), then module kind."""
    rows = stats.select("target", "layer", "module").unique().to_dicts()
    rows.sort(key=lambda r: (r["layer"] is None, r["layer"] or 0, module_rank(r["module"]), r["target"]))
    return [r["target"] for r in rows]


def _flip_order(flips: Sequence[str]) -> list[str]:
    """Fields in IEEE order (sign first), then bit positions from the most significant down."""
    fields = [f for f in FIELD_ORDER if f in flips]
    bits = [f for f in flips if f not in FIELD_ORDER]  # "bit 30", "bit 7", ...
    return fields + sorted(bits, key=lambda f: -int(f.split()[-1]) if f.split()[-1].isdigit() else 0)


def _log_norm(values: np.ndarray, threshold: float) -> LogNorm:
    """A log colour scale over the finite values, from at most the baseline (1.0) to at least the
    catastrophic threshold: a run where nothing broke stays pale instead of stretching noise to black."""
    finite = values[np.isfinite(values)]
    low = min(finite.min(), 1.0) if finite.size else 1.0
    high = max(finite.max(), threshold) if finite.size else threshold
    return LogNorm(vmin=low, vmax=max(high, low * 1.01))


def flip_heatmap(trials: pl.DataFrame, baseline_ppl: float, threshold: float = CATASTROPHIC,
                 context: str = "") -> Figure | None:
    """Bit flips: target (layer) x field or bit position, coloured by median delta_ppl (log).

    A cell whose median is non-finite takes the top colour, is hatched and reads `inf`; a cell
    where some (not most) trials went non-finite notes how many."""
    t = _finished(trials, "bitflip")
    if t.is_empty() or "flip" not in t.columns or t["flip"].null_count() == len(t):
        return None
    rows, cols, median, notes = _flip_grid(summarize(t, ["target", "layer", "module", "flip"], threshold), threshold)
    norm = _log_norm(median, threshold)
    fig = Figure(figsize=(min(3 + 1.5 * len(cols), 16), min(2.2 + 0.42 * len(rows), 30)), layout="constrained")
    ax = fig.add_subplot()
    shown = np.where(np.isinf(median), norm.vmax, median)  # non-finite: top of the scale, marked below
    image = ax.imshow(np.ma.masked_invalid(shown), cmap="magma_r", norm=norm, aspect="auto")
    _mark_cells(ax, median, notes, norm, annotate_cells=median.size <= 400)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("flipped bit (IEEE field, or bit position with 0 = least significant)")
    ax.set_ylabel("target (decoder block or component)")
    _colourbar(fig, ax, image, norm, baseline_ppl)
    single = "count" not in t.columns or set(t["count"].drop_nulls()) <= {1}
    what = "Single-bit faults" if single and "rate" not in t.columns else "Bit flips"
    _title(fig, f"{what}: median perplexity change per target and flipped bit", context)
    return fig


def _flip_grid(stats: pl.DataFrame, threshold: float) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Rows (targets), columns (flips), the median per cell (nan: no trials), and each cell's text:
    the median, and how many trials broke when the median hides them."""
    rows, cols = _row_order(stats), _flip_order(stats["flip"].unique().drop_nulls().to_list())
    median = np.full((len(rows), len(cols)), np.nan)  # (targets, flips)
    notes = np.full(median.shape, "", dtype=object)
    for r in stats.iter_rows(named=True):
        i, j = rows.index(r["target"]), cols.index(r["flip"])
        median[i, j] = r["median"]
        notes[i, j] = ratio(r["median"])
        if r["nonfinite"] and np.isfinite(r["median"]):
            notes[i, j] += f"\n{r['nonfinite']}/{r['n']} non-finite"
        elif r["catastrophic"] and r["median"] <= threshold:
            notes[i, j] += f"\n{r['catastrophic']}/{r['n']} over {threshold:g}×"
    return rows, cols, median, notes


def _colourbar(fig: Figure, ax, image, norm: LogNorm, baseline_ppl: float) -> None:
    bar = fig.colorbar(image, ax=ax, label="median ppl / baseline ppl (log)")
    ticks, digits = _colour_ticks(norm), _significant(norm.vmin, norm.vmax)
    labels = [_tick_label(v, digits) if v != 1.0 else f"1 = baseline ({baseline_ppl:.4g})" for v in ticks]
    bar.set_ticks(ticks, labels=labels)
    bar.ax.minorticks_off()
    bar.ax.axhline(1.0, **BASELINE_STYLE)


def _mark_cells(ax, median: np.ndarray, notes: np.ndarray, norm: LogNorm, annotate_cells: bool) -> None:
    for (i, j), value in np.ndenumerate(median):
        if np.isinf(value):
            ax.add_patch(_hatch(j, i))
        if annotate_cells and not np.isnan(value):
            dark = np.isinf(value) or norm(value) > 0.55  # light text on the dark end of magma_r
            ax.text(j, i, notes[i, j], ha="center", va="center", fontsize=7, color="white" if dark else "black")
        elif np.isnan(value):
            ax.text(j, i, "no trials", ha="center", va="center", fontsize=6, color="grey")


def _hatch(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="///", edgecolor="white", linewidth=0)


def ablation_bars(trials: pl.DataFrame, baseline_ppl: float, context: str = "") -> Figure | None:
    """Ablations: one panel per mode, bars per layer and module kind, rising from the baseline."""
    t = _finished(trials, "ablation")
    if t.is_empty():
        return None
    t = t.with_columns(pl.col("mode") if "mode" in t.columns else pl.lit("zero").alias("mode"))
    stats = summarize(t, ["mode", "target", "layer", "module"])
    modes = [m for m in ("zero", "mean", "skip") if m in stats["mode"].to_list()]
    fig = Figure(figsize=(11, 1.5 + 3.2 * len(modes)), layout="constrained")
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
    top = _top(stats["worst"].to_numpy())
    modules = sorted(stats["module"].unique().to_list(), key=module_rank)
    colours = dict(zip(modules, palette(len(modules))))  # one colour per module kind in every panel
    for ax, mode in zip(axes, modes):
        _bars(ax, stats.filter(pl.col("mode") == mode), top, colours)
        ax.set_title(f"mode = {mode}", fontsize=10, loc="left")
        ax.axhline(1.0, **BASELINE_STYLE, label=f"baseline (ppl {baseline_ppl:.4g})")
        ax.set_yscale("log")
        ax.set_ylabel("perplexity / baseline (log)")
        ax.autoscale_view()
        plain_log_ticks(ax.yaxis)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8, title="module kind")
    axes[-1].set_xlabel("decoder block (layer), or component outside the blocks")
    _title(fig, "Ablations: perplexity change per layer and module kind", context)
    return fig


def _top(values: np.ndarray) -> float:
    """Where non-finite bars are clipped: a little above the largest finite value (and the baseline)."""
    finite = values[np.isfinite(values)]
    return max(finite.max() if finite.size else 1.0, 1.0) * 1.5


def _slot(row: dict) -> str:
    """A bar group: the layer, or the target itself when it has none (embed, lm_head, a pattern)."""
    return str(row["layer"]) if row["layer"] is not None else row["target"]


def _bars(ax, stats: pl.DataFrame, top: float, colours: dict) -> None:
    rows = sorted(stats.to_dicts(), key=lambda r: (r["layer"] is None, r["layer"] or 0, r["target"]))
    slots = list(dict.fromkeys(_slot(r) for r in rows))
    modules = sorted({r["module"] for r in rows}, key=module_rank)
    width = 0.8 / len(modules)
    for k, module in enumerate(modules):
        part = [r for r in rows if r["module"] == module]
        x = [slots.index(_slot(r)) - 0.4 + width * (k + 0.5) for r in part]
        y = np.array([r["median"] for r in part], dtype=float)
        heights = np.where(np.isinf(y), top, y) - 1.0
        bars = ax.bar(x, heights, bottom=1.0, width=width, color=colours[module], label=module)
        mark_nonfinite_bars(ax, bars, y, top)
    ax.set_xticks(range(len(slots)), slots, rotation=0 if len(slots) < 20 else 90)


def mark_nonfinite_bars(ax, bars, values: np.ndarray, top: float) -> None:
    """Bars of non-finite values were clipped to `top`: hatch them and write `inf` above them."""
    for bar, value in zip(bars, values):
        if np.isinf(value):
            bar.set_hatch("///")
            bar.set_edgecolor(NONFINITE)
            centre = bar.get_x() + bar.get_width() / 2
            ax.text(centre, top, "inf", ha="center", va="bottom", fontsize=6, color=NONFINITE)


def palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def dose_curves(trials: pl.DataFrame, baseline_ppl: float, x: str = "sigma", threshold: float = CATASTROPHIC,
                context: str = "") -> Figure | None:
    """Perplexity against a numeric dose (sigma, rate, count) per module kind, log-log; each trial a
    dot, the median per gridded value a line, non-finite trials as crosses on the top edge."""
    t = _finished(trials)
    if t.is_empty() or x not in t.columns or t[x].drop_nulls().n_unique() < 2:
        return None
    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    finite = t.filter(pl.col("ppl").is_finite())["ppl"].to_numpy()
    top = max(finite.max() if finite.size else baseline_ppl, baseline_ppl) * 1.5
    gridded = t[x].n_unique() < len(t)  # doses repeat: a grid, so a median per dose means something
    for module, colour in zip(sorted(t["module"].unique().to_list(), key=module_rank), palette(t["module"].n_unique())):
        _curve(ax, t.filter(pl.col("module") == module), x, top, colour, module, gridded)
    if len(finite) < len(t):
        ax.text(1.0, 1.0, "x on the top edge: non-finite", transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    ax.axhline(baseline_ppl, **BASELINE_STYLE, label=f"baseline (ppl {baseline_ppl:.4g})")
    _threshold_line(ax, baseline_ppl * threshold, finite, f"catastrophic (> {threshold:g}× baseline)", vertical=False)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.autoscale_view()
    plain_log_ticks(ax.xaxis)
    plain_log_ticks(ax.yaxis)
    relative = "relative" in t.columns and bool(t["relative"].drop_nulls().all())
    ax.set_xlabel(DOSES.get(x, x) + (" (x each tensor's std)" if x == "sigma" and relative else ""))
    ax.set_ylabel("perplexity (log scale)")
    ax.legend(fontsize=7, ncol=2)
    _title(fig, f"{t['kind'][0].capitalize()}: perplexity against {x} per module kind", context)
    return fig


def _curve(ax, t: pl.DataFrame, x: str, top: float, colour, label: str, gridded: bool) -> None:
    ok = t.filter(pl.col("ppl").is_finite())
    ax.scatter(ok[x], ok["ppl"], s=10, alpha=0.45, color=colour)
    bad = t.filter(~pl.col("ppl").is_finite() | pl.col("nonfinite"))
    if len(bad):
        ax.scatter(bad[x], [top] * len(bad), marker="x", s=30, color=colour, clip_on=False)
    if gridded:
        medians = t.group_by(x).agg(pl.col("ppl").median()).sort(x)
        ax.plot(medians[x], np.minimum(medians["ppl"].to_numpy(), top), color=colour, label=label, linewidth=1.6)
    else:
        ax.scatter([], [], color=colour, label=label)


def distribution(trials: pl.DataFrame, baseline_ppl: float, threshold: float = CATASTROPHIC,
                 context: str = "") -> Figure | None:
    """Histogram of delta_ppl on log bins, stacked by the main condition; non-finite trials in a
    separate bar on the right; the baseline and the catastrophic threshold as vertical lines."""
    t = _finished(trials)
    if t.is_empty():
        return None
    hue = next((c for c in ("flip", "mode", "module") if c in t.columns and 1 < t[c].n_unique() <= 10), None)
    groups = sorted(t[hue].unique().to_list(), key=_hue_key(hue)) if hue else [None]
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax, side = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [12, 1]})
    values = t.filter(pl.col("delta_ppl").is_finite())["delta_ppl"].to_numpy()
    bins = _log_bins(values)
    parts = [t.filter(pl.col(hue) == g) if hue else t for g in groups]
    finite = [p.filter(pl.col("delta_ppl").is_finite())["delta_ppl"].to_numpy() for p in parts]
    colours = palette(len(groups))
    ax.hist(finite, bins=bins, stacked=True, color=colours, label=[str(g) for g in groups] if hue else None)
    _nonfinite_bar(side, parts, colours)
    ax.set_xscale("log")
    ax.axvline(1.0, **BASELINE_STYLE, label=f"baseline (ppl {baseline_ppl:.4g})")
    _threshold_line(ax, threshold, values, f"catastrophic threshold ({threshold:g}×)", vertical=True)
    plain_log_ticks(ax.xaxis)
    ax.set_xlabel("perplexity / baseline perplexity (log scale)")
    ax.set_ylabel("trials")
    ax.legend(fontsize=7, title=hue, title_fontsize=7)
    _title(fig, f"Distribution of the perplexity change over {len(t)} trials", context)
    return fig


def _nonfinite_bar(ax, parts: list[pl.DataFrame], colours: list) -> None:
    """One stacked bar of the trials that went non-finite (they have no place on a log axis)."""
    bottom = 0
    for part, colour in zip(parts, colours):
        count = int((~part["delta_ppl"].is_finite()).sum())
        ax.bar(0, count, bottom=bottom, color=colour, hatch="///", edgecolor=NONFINITE)
        bottom += count
    ax.text(0, bottom, str(bottom), ha="center", va="bottom", fontsize=8, color=NONFINITE)
    ax.set_xticks([0], ["non-\nfinite"])


def _hue_key(hue: str | None):
    if hue == "module":
        return module_rank
    if hue == "flip":
        return lambda f: (FIELD_ORDER.index(f) if f in FIELD_ORDER else len(FIELD_ORDER), f)
    return lambda v: str(v)


def _log_bins(values: np.ndarray, count: int = 40) -> np.ndarray:
    low = min(values.min(), 1.0) if values.size else 1.0
    high = max(values.max(), 1.0) if values.size else 1.0
    if high / low < 1.002:  # every trial at the baseline: widen so the bins have a width
        low, high = low / 1.001, high * 1.001
    return np.geomspace(low, high, count + 1)


def prune_curves(trials: pl.DataFrame, baseline_ppl: float, threshold: float = CATASTROPHIC,
                 context: str = "") -> Figure | None:
    """Pruning: perplexity against sparsity per method (magnitude, wanda, sensitivity; per matrix or
    per row), log y; the median per sparsity a line, N:M patterns as labelled diamonds at their
    sparsity, non-finite trials as crosses on the top edge."""
    t = _finished(trials, "prune")
    if t.is_empty() or ("sparsity" not in t.columns and "pattern" not in t.columns):
        return None
    t = prune_conditions(t)
    if t["x"].drop_nulls().n_unique() < 2 and t["nm"].is_null().all():
        return None  # one sparsity, no N:M: nothing to draw a curve through
    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    finite = t.filter(pl.col("ppl").is_finite())["ppl"].to_numpy()
    top = max(finite.max() if finite.size else baseline_ppl, baseline_ppl) * 1.5
    labels = t["label"].unique(maintain_order=True).sort().to_list()
    for label, colour in zip(labels, palette(len(labels))):
        _prune_curve(ax, t.filter(pl.col("label") == label), top, colour, label)
    if len(finite) < len(t):
        ax.text(1.0, 1.0, "x on the top edge: non-finite", transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    ax.axhline(baseline_ppl, **BASELINE_STYLE, label=f"baseline (ppl {baseline_ppl:.4g})")
    _threshold_line(ax, baseline_ppl * threshold, finite, f"catastrophic (> {threshold:g}× baseline)", vertical=False)
    ax.set_yscale("log")
    ax.autoscale_view()
    plain_log_ticks(ax.yaxis)
    ax.set_xlabel("sparsity (share of each pruned weight matrix set to zero)")
    ax.set_ylabel("perplexity (log scale)")
    ax.legend(fontsize=7, title="method (weights compete per)", title_fontsize=7)
    _title(fig, "Pruning: perplexity against sparsity per method", context)
    return fig


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


def _prune_curve(ax, t: pl.DataFrame, top: float, colour, label: str) -> None:
    dense = t.filter(pl.col("nm").is_null())
    ok = dense.filter(pl.col("ppl").is_finite())
    ax.scatter(ok["x"], ok["ppl"], s=10, alpha=0.45, color=colour)
    bad = t.filter(~pl.col("ppl").is_finite() | pl.col("nonfinite"))
    if len(bad):
        ax.scatter(bad["x"], [top] * len(bad), marker="x", s=30, color=colour, clip_on=False)
    if len(dense):
        medians = dense.group_by("x").agg(pl.col("ppl").median()).sort("x")
        ax.plot(medians["x"], np.minimum(medians["ppl"].to_numpy(), top), color=colour, label=label, linewidth=1.6,
                marker="o" if len(medians) == 1 else None)
    structured = t.filter(pl.col("nm").is_not_null() & pl.col("ppl").is_finite())
    for i, ((pattern,), part) in enumerate(structured.group_by("nm", maintain_order=True)):
        x, y = part["x"][0], part["ppl"].median()
        ax.scatter([x], [y], marker="D", s=36, color=colour, edgecolor="black", linewidth=0.6,
                   label=label if i == 0 and not len(dense) else None)
        ax.annotate(pattern, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7, color=colour)


def figures_for(trials: pl.DataFrame, baseline_ppl: float, threshold: float = CATASTROPHIC,
                context: str = "") -> dict[str, Figure]:
    """Every figure that applies to this table, by file stem (e.g. `bitflip-heatmap`)."""
    t = annotate(trials)
    kind = str(t["kind"][0])
    made = {
        f"{kind}-heatmap": flip_heatmap(t, baseline_ppl, threshold, context),
        "ablation-bars": ablation_bars(t, baseline_ppl, context),
        **{f"{kind}-{x}-curves": dose_curves(t, baseline_ppl, x, threshold, context) for x in DOSES},
        "prune-sparsity": prune_curves(t, baseline_ppl, threshold, context),
        f"{kind}-distribution": distribution(t, baseline_ppl, threshold, context),
    }
    return {name: fig for name, fig in made.items() if fig is not None}


def save(fig: Figure, stem: Path, formats: Sequence[str] = ("png",), dpi: int = 130) -> list[Path]:
    """Write `stem.png` (and `stem.svg`, ...); returns the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, dpi=dpi, facecolor="white")
        paths.append(path)
    return paths
