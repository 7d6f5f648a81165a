"""A plain-language reading of a trial table, generated from the numbers (never hand-written).

    from sensray.analyze.reading import findings
    for sentence in findings(trials, threshold=2.0):
        print(sentence)

These are the findings every run gets, whatever its kind: how many trials were catastrophic (with
a Wilson interval when trials are random draws), the most damaging condition, whether the output
saturates at the uniform-output ceiling, which layers and module kinds matter most and least.
What a kind's study asks (which bits, where noise breaks a module kind, which component, which
pruning criterion) is answered by that kind's own section (sensray.analyze.sections), and the
report puts those answers first. Sentences use Markdown `code` spans for names; report.py renders
them in Markdown and HTML.
"""

from __future__ import annotations

import math

import polars as pl

from sensray.analyze import tables
from sensray.analyze.fmt import percent, span, times
from sensray.analyze.render import STATS


GENERIC = ("top", "layers", "modules")  # findings a kind's own section may say better (Section.replaces)


def findings(trials: pl.DataFrame, threshold: float = tables.CATASTROPHIC, vocab: int | None = None,
             skip: frozenset[str] = frozenset()) -> list[str]:
    """The reading every run gets: overall damage first, then what matters most and least (less what
    `skip` names from GENERIC: a kind's own section already answers it)."""
    t = tables.annotate(trials)
    if t["delta_ppl"].is_null().all():
        return [s for s in (_overall(t, threshold), _failures(t)) if s]
    out = [_overall(t, threshold), "top" not in skip and _top_condition(t, threshold),
           _plateau(t, threshold, vocab), "layers" not in skip and _by_layer(t, threshold),
           "modules" not in skip and _by_module(t, threshold), _failures(t)]
    return [s for s in out if s]


def _interval(row: dict) -> str:
    if row.get("ci_low") is None:
        return ""
    return f", 95% CI {span(row['ci_low'], row['ci_high'], percent)}"


def _overall(t: pl.DataFrame, threshold: float) -> str:
    row = tables.catastrophic_share(t, threshold).row(0, named=True)
    if row["n"] == 0:
        return "No trial finished, so there is nothing to measure."
    if row["catastrophic"] == 0:
        worst = tables.rank_targets(t, threshold).sort("worst", descending=True).row(0, named=True)
        return (f"No trial of {row['n']} was catastrophic (non-finite, or perplexity above {threshold:g}× the "
                f"baseline): the worst raised perplexity {times(worst['worst'])} (`{worst['target']}`).")
    above = row["catastrophic"] - row["nonfinite"]
    how = [f"{row['nonfinite']} produced non-finite outputs"] * bool(row["nonfinite"])
    how += [f"{above} {'more ' * bool(how)}raised perplexity above {threshold:g}× the baseline"] * bool(above)
    return (f"{row['catastrophic']} of {row['n']} trials ({percent(row['share'])}{_interval(row)}) were "
            f"catastrophic: " + " and ".join(how) + ".")


def _condition(row: dict, keys: list[str]) -> str:
    extra = ", ".join(f"{k}={row[k]}" for k in keys if k not in ("kind", "target") and row.get(k) is not None)
    return f"`{row['target']}`" + (f" with `{extra}`" if extra else "")


def _top_condition(t: pl.DataFrame, threshold: float) -> str:
    ranked = tables.rank_targets(t, threshold)
    if ranked.is_empty() or ranked["n"].max() == 0:
        return ""
    keys = [c for c in ranked.columns if c not in STATS]
    row = ranked.row(0, named=True)
    spread = ""
    if row["n"] > 1:
        spread = f"; middle half {span(row['q25'], row['q75'])}, worst {times(row['worst'])}"
    tied = _tied(ranked, row)
    lead = (f"{tied} conditions tie as the most damaging, e.g. {_condition(row, keys)}" if tied > 1
            else f"The most damaging condition is {_condition(row, keys)}")
    return (f"{lead}: median perplexity {times(row['median'])}{_absolute(t, row, keys)} over {row['n']} "
            f"trial{'s' * (row['n'] != 1)}{spread}.")


def _tied(ranked: pl.DataFrame, top: dict) -> int:
    """Conditions whose median and worst match the top one's (to 0.1%): often a saturated output."""
    def close(column: str) -> pl.Expr:
        value = top[column]
        if value is None or not math.isfinite(value):
            return pl.col(column) == value
        return (pl.col(column) - value).abs() <= 1e-3 * abs(value)

    return len(ranked.filter(close("median") & close("worst")))


def _absolute(t: pl.DataFrame, row: dict, keys: list[str]) -> str:
    """The perplexity itself, not only its ratio: a ceiling such as the vocabulary size shows up here."""
    match = t.filter(pl.all_horizontal([pl.col(k) == row[k] for k in keys if row.get(k) is not None]))
    median = match["ppl"].median()
    return f" (ppl {median:,.2f})" if median is not None and math.isfinite(median) else ""


def _extremes(table: pl.DataFrame) -> tuple[dict, dict] | None:
    """Most and least sensitive rows: by catastrophic share when any, else by median."""
    table = table.filter(pl.col("n") > 0)
    if len(table) < 2:
        return None
    order = ["share", "nonfinite", "median", "worst"] if table["catastrophic"].sum() > 0 else ["median", "worst"]
    table = table.sort(order, descending=True)
    return table.row(0, named=True), table.row(len(table) - 1, named=True)


def _by_layer(t: pl.DataFrame, threshold: float) -> str:
    layers = tables.by_layer(t, threshold)
    ends = _extremes(layers)
    if ends is None:
        return ""
    most, least = ends
    if most["catastrophic"] and all(layers[c].n_unique() == 1 for c in ("n", "catastrophic", "nonfinite")):
        return (f"No layer stands out: every block has {most['catastrophic']} of {most['n']} trials catastrophic "
                f"({percent(most['share'])}), worst {_span(layers['worst'])}; medians {_span(layers['median'])}.")

    def say(r: dict) -> str:
        return (f"`blocks.{r['layer']}` (median {times(r['median'])}, catastrophic {percent(r['share'])}"
                f"{_interval(r)}, worst {times(r['worst'])})")
    overlap = (most.get("ci_low") is not None and least["ci_high"] >= most["ci_low"]
               and most["catastrophic"] != least["catastrophic"])
    tail = (": their intervals overlap, so no block is more fragile than another beyond chance" if overlap else "")
    return f"By layer, the most sensitive is {say(most)} and the least {say(least)}{tail}."


def _span(values: pl.Series) -> str:
    low, high = values.min(), values.max()
    return times(low) if times(low) == times(high) else f"{times(low)} to {times(high)}"


def _by_module(t: pl.DataFrame, threshold: float) -> str:
    ends = _extremes(tables.by_module(t, threshold))
    if ends is None:
        return ""
    most, least = ends
    return (f"By module kind, `{most['module']}` matters most (median {times(most['median'])}, catastrophic "
            f"{percent(most['share'])}) and `{least['module']}` least (median {times(least['median'])}).")


def _plateau(t: pl.DataFrame, threshold: float, vocab: int | None) -> str:
    """Many catastrophic trials at one identical perplexity: the output saturates, whatever broke."""
    broken = t.filter(tables.catastrophic_expr(threshold) & pl.col("ppl").is_finite())
    if len(broken) < 4:
        return ""
    counts = broken.group_by(pl.col("ppl").round(2).alias("level")).agg(pl.len(), pl.col("target").n_unique())
    level, count, targets = counts.sort("len", "level", descending=[True, False]).row(0)
    if count < max(3, len(broken) // 4):
        return ""
    if vocab and abs(math.log(level / vocab)) < 0.01:
        where = (f"the uniform-output ceiling: a guess spread evenly over the {vocab:,}-token vocabulary scores "
                 f"exactly ppl {vocab:,}")
    elif vocab:  # the same level whatever broke: one fixed distribution, not uniform (worse when above V)
        side = "above" if level > vocab else "below"
        where = (f"one fixed output distribution, {side} the uniform-output ceiling (ppl {vocab:,}, the vocabulary "
                 f"size){': confidently wrong, worse than guessing' if level > vocab else ''}")
    else:
        where = "one fixed output distribution (uniform guessing over a vocabulary of V tokens gives perplexity V)"
    return (f"{count} of the {len(broken)} catastrophic trials that stayed finite land on the same perplexity, "
            f"{level:,.2f}, across {targets} target{'s' * (targets != 1)}: the damaged model's output saturates at "
            f"{where}.")


def _failures(t: pl.DataFrame) -> str:
    failed = t.filter(pl.col("error").is_not_null())
    if failed.is_empty():
        return ""
    first = str(failed["error"][0]).splitlines()[0]
    return (f"{len(failed)} trial{'s' * (len(failed) != 1)} failed and {'are' if len(failed) != 1 else 'is'} left "
            f"out of every number above (first error: `{first}`).")
