"""Noise (and any perturbation with a numeric dose): where each module kind breaks.

    python -m sensray.analyze results/noise/<run id>      # section "Where each module kind breaks"

    from sensray.analyze.dose import break_points
    break_points(trials, "sigma", threshold=2.0, seq=seq)

For every module kind, over the doses run: the largest dose whose median perplexity is still not
distinguishable from the baseline (95% interval of ppl / baseline includes 1), the first dose at
which median top-1 agreement falls below 90%, and the first at which median perplexity passes the
catastrophic threshold: the point where it breaks. Kinds that break at the lowest dose come first.
"""

from __future__ import annotations

import polars as pl

from sensray.analyze import fmt, tables
from sensray.analyze.curves import DOSES, dose_curves
from sensray.analyze.overview import summary_note
from sensray.analyze.render import Figure as FigureBlock
from sensray.analyze.render import Table
from sensray.analyze.sections import Context, Section, section

AGREEMENT = 0.9  # "the top prediction changed at one position in ten"


def break_points(trials: pl.DataFrame, x: str, threshold: float = tables.CATASTROPHIC, seq=None) -> pl.DataFrame:
    """Per module kind: `same_up_to` (the largest dose up to which every median is indistinguishable
    from the baseline; null: none, or no intervals), `top1_below` (first dose whose median agreement is
    under 90%), `breaks_at` (first dose whose median exceeds the threshold), and the median ratio and
    agreement at the largest dose; the most fragile first."""
    curves = tables.summarize(tables.annotate(trials), ["module", x], threshold, seq).sort(x)
    rows = []
    for (module,), part in curves.group_by("module", maintain_order=True):
        cells = part.to_dicts()
        rows.append({"module": module, "same_up_to": _same_up_to(cells, x),
                     "top1_below": next((c[x] for c in cells if c["top1"] is not None and c["top1"] < AGREEMENT),
                                        None),
                     "breaks_at": next((c[x] for c in cells if c["median"] > threshold), None),
                     "largest": cells[-1][x], "median_at_largest": cells[-1]["median"],
                     "top1_at_largest": cells[-1]["top1"]})
    out = pl.DataFrame(rows, schema_overrides={"same_up_to": pl.Float64, "top1_below": pl.Float64,
                                               "breaks_at": pl.Float64, "top1_at_largest": pl.Float64})
    return out.sort(pl.col("breaks_at").fill_null(float("inf")), pl.col("top1_below").fill_null(float("inf")),
                    tables.module_order())


def _same_up_to(cells: list[dict], x: str) -> float | None:
    same = None
    for c in cells:
        if c.get("median_low") is None or not c["median_low"] <= 1 <= c["median_high"]:
            break
        same = c[x]
    return same


def _dose(ctx: Context) -> str | None:
    found = [x for x in DOSES if x in tables.conditions(ctx.trials)]
    return found[0] if found else None


@section(order=10)
def breaking(ctx: Context) -> Section | None:
    x = _dose(ctx)
    if x is None:
        return None
    points = break_points(ctx.trials, x, ctx.threshold, ctx.seq)
    curves = tables.summarize(ctx.trials, ["module", x], ctx.threshold, ctx.seq).sort(tables.module_order(), x)
    blocks = [Table.plain(_display(points, x), title="Break points per module kind", labels=1, note=(
        f"Per module kind, fragile first (by the {x} at which it breaks, then at which top-1 agreement falls "
        f"below {AGREEMENT:.0%}). ≈ baseline up to: the largest {x} whose median ppl / baseline has a 95% CI "
        f"including 1; breaks at: the first {x} whose median exceeds {ctx.threshold:g}× the baseline; –: never "
        f"within the {x} values run."))]
    plot = dose_curves(ctx.trials, ctx.baseline_ppl, x, ctx.threshold, ctx.ceiling, ctx.seq, ctx.caption_context)
    if plot is not None:
        blocks.append(FigureBlock(plot.caption, f"{ctx.kind}-{x}-curves", plot.fig))
    blocks.append(Table.of(curves, title=f"Per module kind and {x}", note=summary_note(ctx, f"by module kind, then {x}")))
    return Section("breaking", "Where each module kind breaks", blocks, answers=_answers(points, x, ctx),
                   data={"break_points": points, "per_module_and_dose": curves}, replaces=frozenset({"modules", "top"}))


def _display(points: pl.DataFrame, x: str) -> pl.DataFrame:
    def dose(v) -> str:
        return "–" if v is None else fmt.cell(v)
    return pl.DataFrame({
        "module kind": points["module"],
        "≈ baseline up to": [dose(v) for v in points["same_up_to"]],
        f"top-1 < {AGREEMENT:.0%} from": [dose(v) for v in points["top1_below"]],
        "breaks at": [dose(v) for v in points["breaks_at"]],
        f"at {x} = max: × baseline": [fmt.sig(v) for v in points["median_at_largest"]],
        "top-1 agree": [fmt.agreement(v) for v in points["top1_at_largest"]],
    })


def _answers(points: pl.DataFrame, x: str, ctx: Context) -> list[str]:
    broke = points.filter(pl.col("breaks_at").is_not_null())
    held = points.filter(pl.col("breaks_at").is_null())
    curves = tables.summarize(ctx.trials, ["module", x], ctx.threshold).sort(x)
    out = []
    if len(broke):
        def at(r: dict) -> str:
            cell = curves.filter((pl.col("module") == r["module"]) & (pl.col(x) == r["breaks_at"])).row(0, named=True)
            return (f"`{r['module']}` at {x} {fmt.cell(r['breaks_at'])} ({fmt.times(cell['median'])}, top-1 "
                    f"{fmt.agreement(cell['top1'])})")
        out.append(f"**Where each module kind breaks** (median perplexity above {ctx.threshold:g}× the baseline), "
                   "most fragile first: " + ", ".join(at(r) for r in broke.iter_rows(named=True)) + ".")
    if len(held):
        held = held.sort("median_at_largest", descending=True)
        out.append(f"{'**No module kind breaks**' if not len(broke) else 'Never breaking'} (median perplexity above "
                   f"{ctx.threshold:g}× the baseline) up to the largest {x} run ({fmt.cell(held['largest'].max())}); "
                   f"there, most damaged first: " + ", ".join(
                       f"`{r['module']}` {fmt.times(r['median_at_largest'])} (top-1 "
                       f"{fmt.agreement(r['top1_at_largest'])})" for r in held.iter_rows(named=True)) + ".")
    early = points.filter(pl.col("top1_below").is_not_null() & (pl.col("breaks_at").is_null()
                                                                | (pl.col("top1_below") < pl.col("breaks_at"))))
    if len(early):
        out.append(f"Top-1 agreement falls below {AGREEMENT:.0%} before perplexity breaks for " + ", ".join(
            f"`{r['module']}` (from {x} {fmt.cell(r['top1_below'])})" for r in early.iter_rows(named=True)) + ".")
    same = points.filter(pl.col("same_up_to").is_not_null())
    if len(same):
        out.append(f"Not distinguishable from the baseline (95% CI of the median includes 1) up to: " + ", ".join(
            f"`{r['module']}` {x} {fmt.cell(r['same_up_to'])}" for r in same.iter_rows(named=True)) + ".")
    return out
