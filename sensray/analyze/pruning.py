"""Pruning, reported the way pruning papers report it: methods x sparsity, the highest sparsity under
the threshold per method, the sparsity actually achieved, and which criterion keeps the model best.

    python -m sensray.analyze results/prune/<run id>      # section "Methods and sparsity"

    from sensray.analyze.pruning import grid, limits
    grid(trials, "ppl", fmt.ppl)         # one row per sparsity, one column per method (the median)
    limits(trials, threshold=2.0)        # per method: the highest sparsity whose median stays under 2x

`grid` takes any per-trial metric column, so an analysis that adds one (task accuracy from lm-eval,
say) gets its own methods x sparsity table with one call. A method is the criterion plus the scope
over which weights compete (`magnitude (tensor)`, `wanda (row)`; curves.prune_conditions). The
achieved sparsity is read from the pruned tensors themselves (`tensors.sparsity` in each row: zeros
after the trial, over every pruned matrix), not from the sparsity asked for.
"""

from __future__ import annotations

from typing import Callable

import polars as pl

from sensray.analyze import fmt, tables
from sensray.analyze.curves import prune_conditions, prune_curves
from sensray.analyze.overview import summary_note
from sensray.analyze.render import Figure as FigureBlock
from sensray.analyze.render import Table
from sensray.analyze.sections import Context, Section, section


def conditions(trials: pl.DataFrame) -> pl.DataFrame:
    """The prune trials that finished, with `x` (sparsity), `label` (method) and `achieved` sparsity."""
    t = prune_conditions(tables.annotate(trials).filter(pl.col("error").is_null()))
    achieved = tables.achieved_sparsity(t)
    return t.with_columns(achieved.alias("achieved") if achieved is not None else pl.lit(None, pl.Float64)
                          .alias("achieved"))


def grid(trials: pl.DataFrame, metric: str, write: Callable[[float | None], str]) -> pl.DataFrame:
    """Sparsity (rows, ascending; N:M patterns by name) x method (columns): the median of `metric`,
    written with `write`, and the achieved sparsity of the row (its range when methods differ)."""
    t = conditions(trials).with_columns(pl.coalesce(pl.col("nm"), pl.col("x").cast(pl.String)).alias("sparsity"))
    medians = t.group_by("sparsity", "x", "label").agg(pl.col(metric).median().alias("value"))
    methods = sorted(t["label"].unique().to_list())
    rows = medians.select("sparsity", "x").unique().sort("x", "sparsity")
    cells = {(r["sparsity"], r["label"]): write(r["value"]) for r in medians.iter_rows(named=True)}
    achieved = t.group_by("sparsity").agg(pl.col("achieved").min().alias("low"), pl.col("achieved").max().alias("high"))
    span = {r["sparsity"]: _achieved(r["low"], r["high"]) for r in achieved.iter_rows(named=True)}
    return pl.DataFrame({"sparsity": rows["sparsity"], "achieved": [span.get(s, "–") for s in rows["sparsity"]],
                         **{m: [cells.get((s, m), "–") for s in rows["sparsity"]] for m in methods}})


def _achieved(low: float | None, high: float | None) -> str:
    if low is None:
        return "–"
    return fmt.percent(low) if abs(high - low) < 5e-4 else f"{fmt.percent(low)}–{fmt.percent(high)}"


def limits(trials: pl.DataFrame, threshold: float = tables.CATASTROPHIC) -> pl.DataFrame:
    """Per method: `highest` (the largest unstructured sparsity whose median ppl / baseline stays at or
    under the threshold, every lower one too), its ratio, ppl, top-1 and achieved sparsity there, and
    `next` (the sparsity after it, the first over); best method first."""
    t = conditions(trials).filter(pl.col("nm").is_null())
    medians = t.group_by("label", "x").agg(
        pl.col("delta_ppl").median().alias("median"), pl.col("ppl").median().alias("ppl"),
        pl.col("top1_agreement").median().alias("top1"), pl.col("achieved").median().alias("achieved"),
    ).sort("label", "x")
    rows = []
    for (label,), part in medians.group_by("label", maintain_order=True):
        cells = part.to_dicts()
        under = [c for c in _prefix_under(cells, threshold)]
        last = under[-1] if under else None
        after = cells[len(under)] if len(under) < len(cells) else None
        rows.append({"method": label, "highest": last and last["x"], "median": last and last["median"],
                     "ppl": last and last["ppl"], "top1": last and last["top1"], "achieved": last and last["achieved"],
                     "next": after and after["x"], "next_median": after and after["median"]})
    out = pl.DataFrame(rows, schema_overrides={k: pl.Float64 for k in ("highest", "median", "ppl", "top1", "achieved",
                                                                       "next", "next_median")})
    return out.sort(pl.col("highest").fill_null(-1.0), pl.col("median").fill_null(float("inf")),
                    descending=[True, False])


def _prefix_under(cells: list[dict], threshold: float) -> list[dict]:
    """The sparsities from the lowest up to the first whose median passes the threshold (excluded)."""
    under = []
    for c in cells:
        if not c["median"] <= threshold:
            break
        under.append(c)
    return under


@section(order=10)
def methods(ctx: Context) -> Section | None:
    if ctx.kind != "prune" or ("sparsity" not in ctx.trials.columns and "pattern" not in ctx.trials.columns):
        return None
    best = limits(ctx.trials, ctx.threshold)
    blocks = [
        Table.plain(_limits_display(best, ctx.threshold), title=f"Highest sparsity under {ctx.threshold:g}× per method",
                    labels=1, note=(
            f"Per method, best first: the highest sparsity whose median ppl / baseline stays at or under "
            f"{ctx.threshold:g}× (every lower sparsity too), with its ppl, top-1 agreement and achieved sparsity, "
            f"and the next sparsity run (the first over). Method: criterion (scope over which weights compete).")),
        Table.plain(grid(ctx.trials, "ppl", fmt.ppl), title="Perplexity, methods × sparsity", labels=0, note=(
            "Perplexity (median over the trials of each cell) per sparsity asked for and method; achieved: the share "
            "of zeros in the pruned matrices after the trial, from their provenance.")),
        Table.plain(grid(ctx.trials, "top1_agreement", fmt.agreement), title="Top-1 agreement, methods × sparsity",
                    labels=0, note=(
            "Top-1 agreement with the unperturbed model per sparsity and method: the share of positions whose "
            "most likely next token is unchanged.")),
    ]
    plot = prune_curves(ctx.trials, ctx.baseline_ppl, ctx.threshold, ctx.ceiling, ctx.seq, ctx.caption_context)
    if plot is not None:
        blocks.append(FigureBlock(plot.caption, "prune-sparsity", plot.fig))
    per_cell = tables.rank_targets(ctx.trials, ctx.threshold, ctx.seq)
    blocks.append(Table.of(per_cell.sort([c for c in ("method", "scope", "sparsity", "pattern")
                                          if c in per_cell.columns]), title="Every condition, with its intervals",
                           note=summary_note(ctx, "by method, scope and sparsity")))
    return Section("methods", "Methods and sparsity", blocks, answers=_answers(ctx, best), replaces=frozenset({"top"}),
                   data={"limits": best, "ppl_grid": grid(ctx.trials, "ppl", fmt.ppl),
                         "top1_grid": grid(ctx.trials, "top1_agreement", fmt.agreement), "per_condition": per_cell})


def _limits_display(best: pl.DataFrame, threshold: float) -> pl.DataFrame:
    return pl.DataFrame({
        "method": best["method"],
        f"highest sparsity ≤ {threshold:g}×": [fmt.cell(v) if v is not None else "none" for v in best["highest"]],
        "× baseline": [fmt.sig(v) for v in best["median"]],
        "ppl": [fmt.ppl(v) for v in best["ppl"]],
        "top-1 agree": [fmt.agreement(v) for v in best["top1"]],
        "achieved": [fmt.percent(v) for v in best["achieved"]],
        "next (over)": [f"{fmt.cell(s)} (×{fmt.sig(m)})" if s is not None else "–"
                        for s, m in zip(best["next"], best["next_median"])],
    })


def _answers(ctx: Context, best: pl.DataFrame) -> list[str]:
    if best.is_empty():
        return []
    same = best["highest"].n_unique() == 1  # then the first answer already gives every method's ratio there
    out = [*_criterion(ctx, best), "" if same else _under(best, ctx.threshold), _agreement_gap(ctx),
           _achieved_sentence(ctx)]
    return [s for s in out if s]


def _criterion(ctx: Context, best: pl.DataFrame) -> list[str]:
    """How far the model can be pruned under the threshold, and which method keeps it best there (with
    the paired comparisons that say whether the best is told apart from its rivals), then per sparsity."""
    lead = best.row(0, named=True)
    if lead["highest"] is None:
        return [f"**No method stays under {ctx.threshold:g}× the baseline at any pruned sparsity.**"]
    reach = best.filter(pl.col("highest") == lead["highest"])
    t = conditions(ctx.trials).filter(pl.col("nm").is_null())
    at = tables.summarize(t.filter(pl.col("x") == lead["highest"]), ["label"], ctx.threshold, ctx.seq).sort("median")
    who = ("every method reaches" if len(reach) == len(best) else
           f"{len(reach)} of {len(best)} methods reach" if len(reach) > 1 else f"only `{lead['method']}` reaches")
    ranked = ", ".join(f"`{r['label']}` {fmt.times(r['median'])}" + _ci(r) for r in at.iter_rows(named=True))
    text = (f"**How far, and which criterion keeps the model best**: {who} sparsity {fmt.cell(lead['highest'])} "
            f"under {ctx.threshold:g}× the baseline perplexity; there, from best to worst: {ranked}.")
    labels = at["label"].to_list()
    rivals = labels[1:2] + [r for r in labels[2:] if _criterion_of(r) != _criterion_of(labels[0])][:1]
    if _criterion_of(labels[1] if len(labels) > 1 else labels[0]) != _criterion_of(labels[0]):
        rivals = labels[1:2]  # the runner-up already uses another criterion
    paired = " ".join(_best_two(ctx, t.filter(pl.col("x") == lead["highest"]), labels[0], r) for r in rivals)
    return [text, paired.strip(), _winners(t)]


def _criterion_of(label: str) -> str:
    return label.split(" (")[0]


def _best_two(ctx: Context, t: pl.DataFrame, first: str, second: str) -> str:
    """The best method against the runner-up, paired on the same eval sequences."""
    paired = ctx.seq.versus(t.filter(pl.col("label") == first), t.filter(pl.col("label") == second)) \
        if ctx.seq is not None else None
    if paired is None:
        return ""
    ratio, low, high = paired
    verdict = ("cannot be told apart on this eval text" if low <= 1 <= high else
               "differ beyond the eval text's noise")
    return (f"`{first}` against `{second}` at that sparsity, paired on the same eval sequences: ×{fmt.sig(ratio)} "
            f"(95% CI {fmt.span(low, high)}): they {verdict}.")


def _ci(row: dict) -> str:
    return f" (95% CI {fmt.span(row['median_low'], row['median_high'])})" if row.get("median_low") is not None else ""


def _winners(t: pl.DataFrame) -> str:
    """Which method has the lowest median perplexity at each pruned sparsity, and how often."""
    medians = t.filter(pl.col("x") > 0).group_by("x", "label").agg(pl.col("delta_ppl").median().alias("median"))
    winners = medians.sort("median", "label").group_by("x", maintain_order=False).first().sort("x")
    if winners.is_empty():
        return ""
    counts = winners.group_by("label").agg(pl.len(), pl.col("x").sort().alias("at")).sort("len", "label",
                                                                                           descending=[True, False])
    return ("Lowest perplexity per sparsity above 0: " + "; ".join(
        f"`{r['label']}` at {', '.join(fmt.cell(x) for x in r['at'])}" for r in counts.iter_rows(named=True)) + ".")


def _under(best: pl.DataFrame, threshold: float) -> str:
    return f"Highest sparsity under {threshold:g}× the baseline perplexity, per method: " + ", ".join(
        f"`{r['method']}` {fmt.cell(r['highest']) if r['highest'] is not None else 'none'}"
        + (f" ({fmt.times(r['median'])}, top-1 {fmt.agreement(r['top1'])})" if r["highest"] is not None else "")
        for r in best.iter_rows(named=True)) + "."


def _agreement_gap(ctx: Context) -> str:
    """Where top-1 agreement has fallen while perplexity has barely moved: the first sparsity at which
    every method's median agreement is under 90% and every median ratio still under 1.25."""
    t = conditions(ctx.trials).filter(pl.col("nm").is_null())
    cells = t.group_by("x").agg(pl.col("delta_ppl").median().alias("median"),
                                pl.col("top1_agreement").median().alias("top1")).sort("x")
    per_method = t.group_by("x", "label").agg(pl.col("delta_ppl").median(), pl.col("top1_agreement").median())
    for x in cells["x"].to_list():
        at = per_method.filter(pl.col("x") == x)
        if at["top1_agreement"].max() < 0.9 and at["delta_ppl"].max() < 1.25:
            return (f"Top-1 agreement falls long before perplexity rises: at sparsity {x:g}, perplexity is "
                    f"{fmt.times(at['delta_ppl'].min())}–{fmt.times(at['delta_ppl'].max())} the baseline while top-1 "
                    f"agreement is already {fmt.agreement(at['top1_agreement'].min())}–"
                    f"{fmt.agreement(at['top1_agreement'].max())}.")
    return ""


def _achieved_sentence(ctx: Context) -> str:
    t = conditions(ctx.trials).filter(pl.col("achieved").is_not_null() & pl.col("nm").is_null())
    if t.is_empty():
        return ""
    gap = (t["achieved"] - t["x"]).abs()
    worst = t.row(int(gap.arg_max()), named=True)
    return (f"Achieved sparsity (zeros in the pruned matrices after each trial) is within "
            f"{100 * gap.max():.2g} percentage points of the sparsity asked for in every trial (largest gap: "
            f"`{worst['label']}` at {worst['x']:g}: {fmt.percent(worst['achieved'])}).")
