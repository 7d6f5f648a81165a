"""Figures of a trial table: matplotlib, rendered by the Agg canvas, PNG (and SVG on request).

    from sensray.analyze import figures
    fig = figures.flip_heatmap(trials, baseline_ppl=43.18, ceiling=47.4)   # a matplotlib Figure, or None
    figures.save(fig, Path("analysis/bitflip-heatmap"), formats=("png", "svg"))

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no global state,
no window, and a notebook's own backend is left alone. They are sized for the report's width
(about 8 inches at 130 dpi, shown at 900 px or less), so no text is smaller than 9 points. Each
figure is titled, its axes carry units, the baseline is drawn on it, and so are the catastrophic
threshold and the uniform-output ceiling (ppl = vocabulary size) where they are in range. Trials
that went non-finite are never dropped: they are clipped to the top of the scale and marked. Each
figure returns with the caption that describes what it draws in *this* run (`Plot`).
Curves against a dose or a sparsity live in curves.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from sensray.analyze import fmt
from sensray.analyze.tables import CATASTROPHIC, FIELD_ORDER, annotate, module_rank, summarize

BASELINE_STYLE = dict(color="black", linewidth=1.2, linestyle="-")
THRESHOLD_STYLE = dict(color="#b2182b", linewidth=1.0, linestyle="--")
CEILING_STYLE = dict(color="#555555", linewidth=1.0, linestyle=":")
NONFINITE = "#7f0000"  # colour of non-finite trials wherever they are drawn
WIDTH = 8.0  # inches: the report's width at 130 dpi
TEXT = 9  # points: the smallest text on any figure


@dataclass
class Plot:
    """A figure and the caption that says what it shows in this run."""

    fig: Figure
    caption: str


def finished(trials: pl.DataFrame, kind: str | None = None) -> pl.DataFrame:
    t = annotate(trials).filter(pl.col("error").is_null() & pl.col("delta_ppl").is_not_null())
    return t.filter(pl.col("kind") == kind) if kind else t


def title(fig: Figure, text: str, context: str) -> None:
    fig.suptitle(text + (f"\n{context}" if context else ""), fontsize=TEXT + 2)


def _significant(low: float, high: float) -> int:
    """Significant digits that tell apart ticks between low and high (5 for 1.000-1.001, 2 for 0.01-1)."""
    if not (0 < low < high and math.isfinite(high)):
        return 3
    return max(2, min(7, 2 + math.ceil(math.log10(high / (high - low)))))


def _tick_label(value: float, digits: int) -> str:
    if 10 ** digits <= value < 1e7:
        return f"{value:.0f}"  # 12000, not 1.2e+04
    return f"{value:.{digits}g}"


def plain_log_ticks(axis, ticks: Sequence[float] = ()) -> None:
    """Log-axis ticks as plain numbers (0.99, 1, 2, 500), not 10^x; `ticks` replace the automatic ones
    (the values that matter: the baseline, the threshold, the ceiling)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    low, high = axis.get_view_interval()
    digits = _significant(low, high)
    if ticks:
        axis.set_major_locator(FixedLocator(sorted(ticks)))
        axis.set_minor_locator(NullLocator())
        axis.set_major_formatter(FuncFormatter(lambda v, _: fmt.sig(v)))
        return
    few_decades = high / max(low, 1e-300) < 30  # label the minor ticks only when few major ones show
    axis.set_major_formatter(FuncFormatter(lambda v, _: _tick_label(v, digits)))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: _tick_label(v, digits) if few_decades else ""))


def ratio_ticks(low: float, high: float, threshold: float, ceiling: float | None) -> list[float]:
    """Ticks for a ppl / baseline axis from low to high: 1, the threshold and the ceiling when in range, and
    round values between (1-2-5 per decade over a wide range, about five even steps over a narrow one)."""
    from matplotlib.ticker import MaxNLocator

    marks = [1.0, threshold] + ([ceiling] if ceiling else [])
    if high / low < 10:
        round_ = MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high).tolist()
    else:
        exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        round_ = [m * 10.0 ** k for k in exponents for m in (1, 2, 5)]
    ticks = [t for t in marks if low <= t <= high]
    for t in round_:  # round values, unless they would overprint a mark
        if low <= t <= high and all(abs(math.log(t / m)) > 0.08 * math.log(max(high / low, 1.5)) for m in ticks):
            ticks.append(t)
    return sorted(ticks)


def _colour_ticks(norm: Normalize, threshold: float, ceiling: float | None) -> list[float]:
    ticks = ratio_ticks(norm.vmin, norm.vmax, threshold, ceiling)
    crowd = 0.05 * math.log(norm.vmax / norm.vmin)
    if norm.vmax not in ticks and all(abs(math.log(norm.vmax / t)) > crowd for t in ticks):
        ticks.append(norm.vmax)  # label the top, where the worst sits
    return sorted(ticks)


def threshold_line(ax, value: float, data: np.ndarray, label: str, vertical: bool = False) -> None:
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


def ceiling_line(ax, ceiling: float | None, data: np.ndarray, unit: float = 1.0) -> bool:
    """The uniform-output ceiling (ppl = vocabulary size) when some trial comes within 2× of it."""
    finite = data[np.isfinite(data)]
    if not ceiling or not finite.size or finite.max() * unit < ceiling / 2:
        return False
    ax.axhline(ceiling * unit, **CEILING_STYLE, label="uniform output (ppl = vocabulary size)")
    return True


def palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _luminance(rgba) -> float:
    r, g, b = rgba[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def heatmap(ax, values: np.ndarray, text: np.ndarray, rows: list[str], cols: list[str], norm: Normalize,
            cmap: str) -> object:
    """A grid coloured by `values` (non-finite: the top colour, hatched; NaN: empty), each cell labelled
    with its `text` in dark or light ink as its colour needs; returns the image for a colour bar."""
    from matplotlib import colormaps

    shown = np.where(np.isinf(values), norm.vmax, values)
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=norm, aspect="auto")
    colours = colormaps[cmap]
    size = TEXT + 1 if len(cols) <= 8 else TEXT
    for (i, j), value in np.ndenumerate(values):
        if np.isinf(value):
            ax.add_patch(_hatch(j, i))
        if np.isnan(value):
            ax.text(j, i, "no trials", ha="center", va="center", fontsize=TEXT, color="grey")
            continue
        dark = np.isinf(value) or _luminance(colours(norm(shown[i, j]))) < 0.5
        ax.text(j, i, text[i, j], ha="center", va="center", fontsize=size, color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), cols, fontsize=TEXT)
    ax.set_yticks(range(len(rows)), rows, fontsize=TEXT)
    ax.tick_params(length=0)
    return image


def _hatch(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="///", edgecolor="white", linewidth=0)


def ratio_norm(values: np.ndarray, threshold: float, ceiling: float | None) -> LogNorm:
    """A log colour scale over the finite values, from at most the baseline (1.0) to at least the
    threshold (a run where nothing broke stays pale), and past the ceiling when a value reaches it."""
    finite = values[np.isfinite(values)]
    low = min(finite.min(), 1.0) if finite.size else 1.0
    high = max(finite.max(), threshold) if finite.size else threshold
    if ceiling and finite.size and finite.max() >= ceiling / 2:
        high = max(high, ceiling * 1.15)  # the ceiling sits inside the scale, marked, not at its end
    return LogNorm(vmin=low, vmax=max(high, low * 1.01))


def ratio_colourbar(fig: Figure, ax, image, norm: LogNorm, baseline_ppl: float, threshold: float,
                    ceiling: float | None) -> None:
    bar = fig.colorbar(image, ax=ax, label="median ppl / baseline ppl (log)")
    labels = {1.0: f"1 = baseline (ppl {baseline_ppl:.2f})", threshold: f"{fmt.sig(threshold)} = threshold"}
    if ceiling:
        labels[ceiling] = f"{fmt.sig(ceiling)} = uniform output"
    ticks = _colour_ticks(norm, threshold, ceiling)
    bar.set_ticks(ticks, labels=[labels.get(t, fmt.sig(t)) for t in ticks])
    bar.ax.tick_params(labelsize=TEXT)
    bar.ax.minorticks_off()
    bar.ax.axhline(1.0, **BASELINE_STYLE)
    if ceiling and norm.vmin < ceiling < norm.vmax:
        bar.ax.axhline(ceiling, color="white", linewidth=1.5, linestyle=":")


def _flip_order(flips: Sequence[str]) -> list[str]:
    """Fields in IEEE order (sign first), then bit positions from the most significant down."""
    fields = [f for f in FIELD_ORDER if f in flips]
    bits = [f for f in flips if f not in FIELD_ORDER]  # "bit 30", "bit 7", ...
    return fields + sorted(bits, key=lambda f: -int(f.split()[-1]) if f.split()[-1].isdigit() else 0)


def target_order(stats: pl.DataFrame) -> list[str]:
    """Targets in model order: by layer (spanning patterns last), then module kind."""
    rows = stats.select("target", "layer", "module").unique().to_dicts()
    rows.sort(key=lambda r: (r["layer"] is None, r["layer"] or 0, module_rank(r["module"]), r["target"]))
    return [r["target"] for r in rows]


def flip_heatmap(trials: pl.DataFrame, baseline_ppl: float, threshold: float = CATASTROPHIC,
                 ceiling: float | None = None, context: str = "") -> Plot | None:
    """Bit flips: target x field (or bit) asked for, coloured by the median ppl / baseline, each cell
    labelled with that median and how many of its trials were catastrophic."""
    t = finished(trials, "bitflip")
    if t.is_empty() or "flip" not in t.columns or t["flip"].null_count() == len(t):
        return None
    stats = summarize(t, ["target", "layer", "module", "flip"], threshold)
    rows, cols = target_order(stats), _flip_order(stats["flip"].unique().drop_nulls().to_list())
    median = np.full((len(rows), len(cols)), np.nan)  # (targets, flips)
    text = np.full(median.shape, "", dtype=object)
    for r in stats.iter_rows(named=True):
        i, j = rows.index(r["target"]), cols.index(r["flip"])
        median[i, j] = r["median"]
        ratio = f"×{fmt.sig(r['median'])}" if np.isfinite(r["median"]) else "non-finite"
        text[i, j] = f"{ratio}\n{r['catastrophic']}/{r['n']}"
    norm = ratio_norm(median, threshold, ceiling)
    fig = Figure(figsize=(WIDTH, min(2.4 + 0.5 * len(rows), 24)), layout="constrained")
    ax = fig.add_subplot()
    image = heatmap(ax, median, text, rows, cols, norm, "magma_r")
    ax.set_xlabel("flipped bit asked for (IEEE field, or bit position; 0 = least significant)", fontsize=TEXT)
    ax.set_ylabel("target", fontsize=TEXT)
    ratio_colourbar(fig, ax, image, norm, baseline_ppl, threshold, ceiling)
    title(fig, "Bit flips: median perplexity change per target and field", context)
    hatched = " Hatched: the median trial went non-finite." if np.isinf(median).any() else ""
    at_ceiling = int(np.sum(np.isfinite(median) & (np.abs(np.log(median / ceiling)) < 0.05))) if ceiling else 0
    ceil = (f" {at_ceiling} cell{'s' * (at_ceiling != 1)} sit at the uniform-output ceiling (×{fmt.sig(ceiling)}, "
            f"ppl = vocabulary size)." if at_ceiling else "")
    return Plot(fig, f"Median perplexity / baseline per target and field over {int(stats['n'].max())} draws per "
                     f"cell (log colour scale); under each median, catastrophic trials / trials.{ceil}{hatched}")


def share_heatmap(stats: pl.DataFrame, row: str, col: str, rows: list[str], cols: list[str], context: str,
                  heading: str, xlabel: str, ylabel: str) -> Figure:
    """Catastrophic share per (row, col) of a summary, labelled `k/n` and the median ppl / baseline."""
    share = np.full((len(rows), len(cols)), np.nan)
    text = np.full(share.shape, "", dtype=object)
    for r in stats.iter_rows(named=True):
        if r[row] in rows and r[col] in cols and r["n"]:
            i, j = rows.index(r[row]), cols.index(r[col])
            share[i, j], text[i, j] = r["share"], f"{r['catastrophic']}/{r['n']}  ×{fmt.sig(r['median'])}"
    fig = Figure(figsize=(WIDTH, min(2.0 + 0.38 * len(rows), 20)), layout="constrained")
    ax = fig.add_subplot()
    image = heatmap(ax, share, text, rows, cols, Normalize(0, 1), "Reds")
    ax.set_xlabel(xlabel, fontsize=TEXT)
    ax.set_ylabel(ylabel, fontsize=TEXT)
    bar = fig.colorbar(image, ax=ax, label="catastrophic share of trials")
    bar.set_ticks([0, 0.25, 0.5, 0.75, 1], labels=["0%", "25%", "50%", "75%", "100%"])
    bar.ax.tick_params(labelsize=TEXT)
    title(fig, heading, context)
    return fig


def distribution(trials: pl.DataFrame, baseline_ppl: float, threshold: float = CATASTROPHIC,
                 ceiling: float | None = None, context: str = "") -> Plot | None:
    """Histogram of delta_ppl on log bins, stacked by the main condition; non-finite trials in a
    separate bar on the right (only when there are any); the baseline, the threshold and the ceiling."""
    t = finished(trials)
    if t.is_empty():
        return None
    hue = next((c for c in ("flip", "mode", "module", "method") if c in t.columns and 1 < t[c].n_unique() <= 10),
               None)
    broken = int((~t["delta_ppl"].is_finite()).sum())
    fig = Figure(figsize=(WIDTH, 4.4), layout="constrained")
    if broken:
        ax, side = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [12, 1]})
    else:
        ax, side = fig.add_subplot(), None
    values = t.filter(pl.col("delta_ppl").is_finite())["delta_ppl"].to_numpy()
    parts, colours = _stacked(ax, t, hue, values)
    if side is not None:
        _nonfinite_bar(side, parts, colours)
    _distribution_axis(ax, values, baseline_ppl, threshold, ceiling, hue)
    title(fig, f"Distribution of the perplexity change over {len(t)} trials", context)
    caption = f"Every finished trial's perplexity / baseline on log bins{f', stacked by {hue}' if hue else ''}"
    caption += f"; the {broken} non-finite trials in the bar on the right." if broken else "; no trial went non-finite."
    return Plot(fig, caption)


def _stacked(ax, t: pl.DataFrame, hue: str | None, values: np.ndarray) -> tuple[list[pl.DataFrame], list]:
    """The finite trials as a histogram stacked by `hue`; returns the groups and their colours."""
    groups = sorted(t[hue].unique().to_list(), key=_hue_key(hue)) if hue else [None]
    parts = [t.filter(pl.col(hue) == g) if hue else t for g in groups]
    finite = [p.filter(pl.col("delta_ppl").is_finite())["delta_ppl"].to_numpy() for p in parts]
    colours = palette(len(groups))
    ax.hist(finite, bins=_log_bins(values), stacked=True, color=colours,
            label=[str(g) for g in groups] if hue else None)
    return parts, colours


def _distribution_axis(ax, values: np.ndarray, baseline_ppl: float, threshold: float, ceiling: float | None,
                       hue: str | None) -> None:
    ax.set_xscale("log")
    ax.axvline(1.0, **BASELINE_STYLE, label=f"baseline (ppl {baseline_ppl:.2f})")
    threshold_line(ax, threshold, values, f"catastrophic threshold ({threshold:g}×)", vertical=True)
    shown_ceiling = ceiling if ceiling and values.size and values.max() >= ceiling / 2 else None
    if shown_ceiling:
        ax.axvline(ceiling, **CEILING_STYLE, label=f"uniform output (×{fmt.sig(ceiling)})")
    low, high = ax.get_xlim()
    plain_log_ticks(ax.xaxis, ratio_ticks(low, high, threshold, shown_ceiling))
    ax.set_xlabel("perplexity / baseline perplexity (log scale)", fontsize=TEXT)
    ax.set_ylabel("trials", fontsize=TEXT)
    ax.tick_params(labelsize=TEXT)
    ax.legend(fontsize=TEXT, title=hue, title_fontsize=TEXT, loc="upper right")


def _nonfinite_bar(ax, parts: list[pl.DataFrame], colours: list) -> None:
    """One stacked bar of the trials that went non-finite (they have no place on a log axis)."""
    bottom = 0
    for part, colour in zip(parts, colours):
        count = int((~part["delta_ppl"].is_finite()).sum())
        ax.bar(0, count, bottom=bottom, color=colour, hatch="///", edgecolor=NONFINITE)
        bottom += count
    ax.text(0, bottom, str(bottom), ha="center", va="bottom", fontsize=TEXT, color=NONFINITE)
    ax.set_xticks([0], ["non-\nfinite"], fontsize=TEXT)


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


def save(fig: Figure, stem: Path, formats: Sequence[str] = ("png",), dpi: int = 130) -> list[Path]:
    """Write `stem.png` (and `stem.svg`, ...); returns the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt_ in formats:
        path = stem.with_name(f"{stem.name}.{fmt_}")
        fig.savefig(path, dpi=dpi, facecolor="white")
        paths.append(path)
    return paths
