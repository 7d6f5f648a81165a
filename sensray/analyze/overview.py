"""The sections every run gets, after its kind's own: the ranked conditions, layers and module kinds,
the distribution of the damage, the worst trials with exactly what they changed, and every trial.

    python -m sensray.analyze results/<experiment>/<run id>    # report.html: "Most sensitive conditions" ...
"""

from __future__ import annotations

from sensray.analyze import tables
from sensray.analyze.explorer import payload
from sensray.analyze.figures import distribution
from sensray.analyze.render import Explorer, Para, Table
from sensray.analyze.render import Figure as FigureBlock
from sensray.analyze.sections import TOP, Context, Section, section

COLUMNS = ("Columns of the summary tables: × baseline, the median ppl / baseline over a group's trials{interval}; q25–q75, "
           "the middle half of the trials; worst, the largest; ppl, top-1 agree (the share of positions whose most "
           "likely next token is unchanged), KL (nats per position, from the unperturbed model): medians; "
           "catastrophic: trials non-finite or above {threshold:g}× the baseline{share}{distinct}.")


def columns_note(ctx: Context) -> str:
    """What the columns of a tables.summarize table mean in this run: said once, under the reading."""
    random = tables.is_random(ctx.trials)
    draws = " (bootstrap over eval sequences and draws)" if random else \
        " (bootstrap over eval sequences; a census, no draws to resample)"
    interval = (f" with its 95% CI{draws}, `≈` when that CI includes 1 (not distinguishable from the baseline on "
                "this eval text)" if ctx.seq is not None else
                " (no interval: this run did not record per-sequence NLLs)")
    return COLUMNS.format(
        interval=interval,
        threshold=ctx.threshold,
        share=", their share and its 95% Wilson interval (the draws are independent)" if random else ", their share",
        distinct="; distinct: the weight elements hit, where fewer than the trials" if random else "")


def summary_note(ctx: Context, sort: str = tables.SORTED) -> str:
    """How a summary table's rows are sorted (its columns are explained once, by columns_note)."""
    return f"Sorted {sort}."


@section(order=70)
def ranked(ctx: Context) -> Section | None:
    table = tables.rank_targets(ctx.trials, ctx.threshold, ctx.seq)
    if table.is_empty() or table["n"].max() == 0:
        return None
    more = f" (top {TOP} of {len(table)})" if len(table) > TOP else ""
    blocks = [Table.of(table, TOP, note=summary_note(ctx) + more)]
    return Section("conditions", "Most sensitive conditions", blocks, data={"most_sensitive_conditions": table})


@section(order=72)
def layers_and_modules(ctx: Context) -> Section | None:
    layers = tables.by_layer(ctx.trials, ctx.threshold, ctx.seq)
    modules = tables.by_module(ctx.trials, ctx.threshold, ctx.seq)
    blocks, data = [], {}
    if len(layers) > 1:
        blocks.append(Table.of(layers.sort("layer"), title="Per decoder layer of the target",
                               note=summary_note(ctx, "in layer order")))
        data["per_layer"] = layers
    if len(modules) > 1:
        blocks.append(Table.of(modules, title="Per module kind of the target pattern", note=summary_note(ctx)))
        data["per_module_kind"] = modules
    return Section("layers", "Per layer and module kind", blocks, data=data) if blocks else None


@section(order=75)
def spread(ctx: Context) -> Section | None:
    plot = distribution(ctx.trials, ctx.baseline_ppl, ctx.threshold, ctx.ceiling, ctx.caption_context)
    if plot is None:
        return None
    return Section("distribution", "Distribution", [FigureBlock(plot.caption, f"{ctx.kind}-distribution", plot.fig)])


@section(order=80)
def worst(ctx: Context) -> Section | None:
    table = tables.worst_trials(ctx.trials, TOP)
    if table.is_empty():
        return None
    shown = table.rename({"delta_ppl": "× baseline", "top1_agreement": "top-1 agree", "kl": "KL"}, strict=False)
    note = (f"Sorted {tables.WORST_ORDER}. Exactly what each trial changed, from its provenance columns; "
            "`generate --run ... --trial ID` replays one.")
    return Section("worst", "Worst trials, exactly what they changed", [Table.of(shown, note=note)],
                   data={"worst_trials": table})


@section(order=90)
def everything(ctx: Context) -> Section:
    rows = len(ctx.trials)
    note = ("Every trial of the run. Click a column header to sort (again to reverse); filter with words "
            "(any column) and terms such as `ppl>100`, `bit=30`, `matrix=mlp.down`, `target~blocks.3`, all of "
            "which must hold. CI low/high: the trial's 95% interval of ppl / baseline over resampled eval "
            "sequences." if ctx.seq is not None else "Every trial of the run; click a header to sort, type to filter.")
    return Section("trials", f"All trials ({rows:,})", [Para(note), Explorer(payload(ctx.trials, ctx.seq), rows)])

