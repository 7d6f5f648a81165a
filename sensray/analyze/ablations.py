"""Ablations: which components matter most, per mode (zero, mean, skip), layer and module kind.

    python -m sensray.analyze results/ablation/<run id>     # section "Which components matter"

An ablation of every component is a census, not a sample: each (component, mode) is one trial, so
its only uncertainty is the eval text's, which the bootstrap over sequences measures. Components
are ranked by ppl / baseline; top-1 agreement and KL say how much of the model's behaviour changed
when perplexity barely moves.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from sensray.analyze import fmt, tables
from sensray.analyze.figures import TEXT, WIDTH, heatmap, ratio_colourbar, ratio_norm, title
from sensray.analyze.overview import summary_note
from sensray.analyze.render import Figure as FigureBlock
from sensray.analyze.render import Table
from sensray.analyze.sections import Context, Section, section

MODES = ("zero", "mean", "skip")
SHOWN = 15


def _modes(t: pl.DataFrame) -> pl.DataFrame:
    return t if "mode" in t.columns else t.with_columns(pl.lit("zero").alias("mode"))


@section(order=10)
def components(ctx: Context) -> Section | None:
    if ctx.kind != "ablation":
        return None
    t = _modes(tables.annotate(ctx.trials))
    ranked = tables.summarize(t, ["target", "mode"], ctx.threshold, ctx.seq)
    kinds = tables.summarize(t, ["module", "mode"], ctx.threshold).sort(tables.module_order(), "mode")
    blocks = [Table.plain(_by_kind(kinds), title="Per module kind and mode", labels=1, note=(
        "Median over layers of ppl / baseline, and in parentheses of top-1 agreement, per module kind and mode; "
        "rows in model order."))]
    fig = ablation_heatmaps(t, ctx.baseline_ppl, ctx.threshold, ctx.ceiling, ctx.caption_context)
    if fig is not None:
        blocks.append(FigureBlock(
            "ppl / baseline of every ablated component (log colour scale), layer by module kind, one panel per "
            "mode; under each ratio, top-1 agreement with the unperturbed model." + _hatched(t), "ablation-grid", fig))
    more = f" (top {SHOWN} of {len(ranked)}; every trial is in the table of all trials)" if len(ranked) > SHOWN else ""
    blocks.append(Table.of(ranked, SHOWN, title="The costliest components", note=summary_note(ctx) + more))
    return Section("components", "Which components matter", blocks, answers=_answers(ranked, kinds, t),
                   data={"components": ranked, "per_module_kind_and_mode": kinds},
                   replaces=frozenset({"layers", "modules", "top"}))


def _hatched(t: pl.DataFrame) -> str:
    return " Hatched: the ablation made the output non-finite." if bool(t["nonfinite"].fill_null(False).any()) else ""


def _by_kind(kinds: pl.DataFrame) -> pl.DataFrame:
    modes = [m for m in MODES if m in kinds["mode"].to_list()]
    cells = {(r["module"], r["mode"]): f"{fmt.times(r['median'])} ({fmt.agreement(r['top1'])})"
             for r in kinds.iter_rows(named=True)}
    rows = list(dict.fromkeys(kinds["module"].to_list()))
    return pl.DataFrame({"module kind": rows, **{m: [cells.get((k, m), "–") for k in rows] for m in modes}})


def _answers(ranked: pl.DataFrame, kinds: pl.DataFrame, t: pl.DataFrame) -> list[str]:
    out = []
    for mode in [m for m in MODES if m in ranked["mode"].to_list()]:
        part = ranked.filter((pl.col("mode") == mode) & (pl.col("n") > 0))
        top = part.head(3).to_dicts()
        same = part.filter((pl.col("median_low") <= 1) & (pl.col("median_high") >= 1)) \
            if "median_low" in part.columns else part.clear()  # no intervals: say nothing about the noise
        lead = "**The components that matter most**, by ppl / baseline: with" if not out else "With"
        noise = (f"every one of the {len(part)} `{mode}` ablations moves perplexity beyond the eval text's noise"
                 if same.is_empty() else
                 f"{len(same)} of {len(part)} `{mode}` ablations are not distinguishable from the baseline")
        costliest = ", ".join(f"`{r['target']}` {fmt.times(r['median'])} (top-1 {fmt.agreement(r['top1'])})"
                              for r in top)
        out.append(f"{lead} `{mode}` ablation, {costliest}" + (f"; {noise}." if "median_low" in part.columns else "."))
    out.append(_ties(t))
    zero = kinds.filter(pl.col("mode") == "zero").sort("median", descending=True)
    if len(zero) > 1:
        out.append("By module kind (median over layers, `zero`): " + ", ".join(
            f"`{r['module']}` {fmt.times(r['median'])}" for r in zero.iter_rows(named=True)) + ".")
    layers = tables.summarize(t.filter(pl.col("layer").is_not_null()), ["layer"]).sort("median", descending=True)
    if len(layers) > 1:
        most, least = layers.row(0, named=True), layers.row(len(layers) - 1, named=True)
        out.append(f"By layer, ablating a component of block {most['layer']} costs most (median "
                   f"{fmt.times(most['median'])} over its components and modes), of block {least['layer']} least "
                   f"({fmt.times(least['median'])}).")
    return [s for s in out if s]


def _ties(t: pl.DataFrame) -> str:
    """Components of one block whose `zero` ablations give the identical perplexity (to 6 significant
    figures): they cut the same path (gate, up or down all silence the MLP). Said for the groups that
    tie in at least half the blocks."""
    zero = t.filter((pl.col("mode") == "zero") & pl.col("layer").is_not_null() & pl.col("ppl").is_finite())
    layers = zero["layer"].n_unique()
    found: dict[tuple[str, ...], int] = {}
    for _, block in zero.group_by("layer"):
        by_ppl: dict[str, list[str]] = {}
        for r in block.iter_rows(named=True):
            by_ppl.setdefault(f"{r['ppl']:.6g}", []).append(r["module"])
        for modules in by_ppl.values():
            if len(modules) > 1:
                key = tuple(sorted(modules, key=tables.module_rank))
                found[key] = found.get(key, 0) + 1
    common = [(k, n) for k, n in found.items() if layers > 1 and n >= layers / 2]
    if not common:
        return ""
    return ("Zeroing these components of one block gives the identical perplexity (to 6 significant figures), "
            "so they cut the same path: " + "; ".join(
                " / ".join(f"`{m}`" for m in group) + f" in {n} of {layers} blocks" for group, n in common) + ".")


def ablation_heatmaps(t: pl.DataFrame, baseline_ppl: float, threshold: float, ceiling: float | None,
                      context: str) -> Figure | None:
    """One panel per mode: layers (rows) x module kinds (columns), coloured by ppl / baseline."""
    t = t.filter(pl.col("layer").is_not_null() & pl.col("delta_ppl").is_not_null())
    if t.is_empty() or t["layer"].n_unique() < 2:
        return None
    stats = tables.summarize(t, ["mode", "layer", "module"], threshold)
    modes = [m for m in MODES if m in stats["mode"].to_list()]
    layers = sorted(stats["layer"].unique().to_list())
    norm = ratio_norm(stats["median"].to_numpy(), threshold, ceiling)
    fig = Figure(figsize=(WIDTH, 1.0 + len(modes) * (0.9 + 0.42 * len(layers))), layout="constrained")
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
    for ax, mode in zip(axes, modes):
        part = stats.filter(pl.col("mode") == mode)
        modules = sorted(part["module"].unique().to_list(), key=tables.module_rank)  # skip: only `block`
        values = np.full((len(layers), len(modules)), np.nan)
        text = np.full(values.shape, "", dtype=object)
        for r in part.iter_rows(named=True):
            i, j = layers.index(r["layer"]), modules.index(r["module"])
            ratio = f"×{fmt.sig(r['median'])}" if np.isfinite(r["median"]) else "non-finite"
            values[i, j], text[i, j] = r["median"], f"{ratio}\n{fmt.agreement(r['top1'])}"
        image = heatmap(ax, values, text, [str(layer) for layer in layers], modules, norm, "magma_r")
        ax.set_title(f"mode = {mode}", fontsize=TEXT + 1, loc="left")
        ax.set_ylabel("decoder block (layer)", fontsize=TEXT)
    axes[-1].set_xlabel("module kind ablated", fontsize=TEXT)
    ratio_colourbar(fig, axes, image, norm, baseline_ppl, threshold, ceiling)
    title(fig, "Ablations: ppl / baseline and top-1 agreement per layer and module kind", context)
    return fig
