"""Comparing runs whose targets overlap: bf16 against float32, dense against pruned, model A against B.

    python -m sensray.analyze results/bitflip/<run a> results/bitflip-bf16/<run b>

    from sensray.analyze.compare import joined, labels
    table = joined([run_a, run_b])     # one row per shared (kind, target, condition); ratio_<b> = b / a

Runs are joined on the kind, the target and the conditions (field, sigma, mode, ...) that vary
in every run; a parameter held fixed in a run (`count: 1` here, `count: 8` there) is what
differs, so it is not a join key. Each run is labelled by the first thing that tells them apart
(experiment name, model, dtype, corpus, run id). The first run is the reference: `ratio_<label>`
is that run's median delta_ppl over the reference's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from sensray.analyze import tables
from sensray.analyze.figures import BASELINE_STYLE, NONFINITE, palette, plain_log_ticks, save
from sensray.analyze.render import Code, Document, Heading, Para, Table, html, markdown, percent, ratio
from sensray.analyze.render import Figure as FigureBlock
from sensray.analyze.run import AnalysisError, Run


def labels(runs: Sequence[Run]) -> list[str]:
    """Short distinct names: the first property that differs across all the runs."""
    candidates: list[Callable[[Run], str]] = [
        lambda r: r.name,
        lambda r: Path(str(r.baseline["model"])).name,
        lambda r: str(r.baseline.get("dtype")),
        lambda r: Path(str(r.spec.get("data", {}).get("corpus"))).name,
        lambda r: r.run_id,
    ]
    for name in candidates:
        values = [name(r) for r in runs]
        if len(set(values)) == len(values):
            return values
    return [f"{i}:{r.run_id}" for i, r in enumerate(runs)]  # the same run given twice


def join_keys(runs: Sequence[Run]) -> list[str]:
    """kind, target, and the conditions every run varies (in the first run's order)."""
    shared = [set(tables.conditions(r.trials)) for r in runs]
    first = tables.conditions(runs[0].trials)
    return ["kind", "target", *[c for c in first if all(c in s for s in shared)]]


def joined(runs: Sequence[Run], threshold: float = tables.CATASTROPHIC) -> pl.DataFrame:
    """One row per condition present in every run: n, median, worst, share per run, and ratios."""
    names, keys = labels(runs), join_keys(runs)
    frames = [_per_run(r, keys, name, threshold) for r, name in zip(runs, names)]
    out = frames[0]
    for frame in frames[1:]:
        out = out.join(frame, on=keys, how="inner", nulls_equal=True)
    if out.is_empty():
        raise AnalysisError(_no_overlap(runs, names))
    ref = pl.col(f"median_{names[0]}")
    out = out.with_columns([(pl.col(f"median_{n}") / ref).alias(f"ratio_{n}") for n in names[1:]])
    spread = pl.max_horizontal([pl.col(f"ratio_{n}").log().abs() for n in names[1:]])
    return out.sort(spread.fill_nan(math.inf), descending=True, nulls_last=True)


def _per_run(run: Run, keys: list[str], name: str, threshold: float) -> pl.DataFrame:
    stats = tables.summarize(run.trials, keys, threshold).select(*keys, "n", "median", "worst", "share")
    # A key read back as int in one run and float in another must still match.
    stats = stats.with_columns([pl.col(k).cast(pl.String) for k in keys if stats[k].dtype != pl.String])
    return stats.rename({c: f"{c}_{name}" for c in ("n", "median", "worst", "share")})


def _no_overlap(runs: Sequence[Run], names: list[str]) -> str:
    kinds = [r.kind for r in runs]
    if len(set(kinds)) > 1:
        listed = ", ".join(f"{n}: {k}" for n, k in zip(names, kinds))
        return f"the runs perturb in different ways ({listed}): nothing to join"
    seen = [", ".join(sorted(r.trials["target"].unique().to_list())[:4]) for r in runs]
    listed = "; ".join(f"{n} ({r.path}): {s}" for n, r, s in zip(names, runs, seen))
    return f"the runs share no (kind, target, condition) to compare; targets per run: {listed}"


def by_slot(run: Run, threshold: float) -> pl.DataFrame:
    """Per layer when every target names one, else per target: the unit of the side-by-side figure.

    `geomean` is the geometric mean of delta_ppl over the finite trials: a layer's typical
    multiplicative damage. The median would hide it whenever most flips are harmless (mantissa,
    sign) and a few are disastrous; the non-finite trials are in the catastrophic share."""
    t = tables.annotate(run.trials)
    key = "layer" if t["layer"].null_count() == 0 else "target"
    finite = pl.col("delta_ppl").filter(pl.col("delta_ppl").is_finite())
    geomean = t.group_by(key).agg(finite.log().mean().exp().alias("geomean"))
    out = tables.summarize(t, [key], threshold).join(geomean, on=key, how="left").rename({key: "slot"})
    return out.with_columns(pl.col("slot").cast(pl.String))


def side_by_side(runs: Sequence[Run], threshold: float = tables.CATASTROPHIC) -> Figure:
    """Per layer (or target): typical perplexity change and catastrophic share, one bar per run."""
    names = labels(runs)
    per_run = [{r["slot"]: r for r in by_slot(run, threshold).iter_rows(named=True)} for run in runs]
    slots = sorted(set.intersection(*[set(rows) for rows in per_run]), key=_slot_key)
    typical = np.array([rows[s]["geomean"] for rows in per_run for s in slots], dtype=float)
    finite = typical[np.isfinite(typical)]
    # From the baseline to at least the threshold: differences of 1e-5 must not fill the panel.
    low, high = min(finite.min(initial=1.0), 1.0) / 1.02, max(finite.max(initial=1.0), threshold) * 1.5
    fig = Figure(figsize=(min(max(8, 0.5 * len(slots) * len(runs) + 3), 15), 7.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(runs)
    for k, (name, rows, colour) in enumerate(zip(names, per_run, palette(len(runs)))):
        x = np.arange(len(slots)) - 0.4 + width * (k + 0.5)
        values = np.array([rows[s]["geomean"] for s in slots], dtype=float)  # nan: no finite trial, no bar
        top.bar(x, values - 1.0, bottom=1.0, width=width, color=colour, label=name)
        _share_bars(bottom, x, [rows[s] for s in slots], width, colour)
    top.axhline(1.0, **BASELINE_STYLE, label="baseline")
    top.set(yscale="log", ylim=(low, high), ylabel="geometric mean of ppl / baseline\n(finite trials, log)")
    plain_log_ticks(top.yaxis)
    top.legend(fontsize=8)
    bottom.set_ylabel(f"catastrophic trials (%, > {threshold:g}× or non-finite)")
    bottom.set_xticks(range(len(slots)), slots, rotation=0 if len(slots) < 16 else 90)
    bottom.set_xlabel("decoder block (layer)" if all(s.isdigit() for s in slots) else "target")
    fig.suptitle("Sensitivity per layer, side by side: " + " vs ".join(names)
                 + "\n(each run against its own baseline; error bars: 95% Wilson interval)", fontsize=11)
    return fig


def _slot_key(slot: str) -> tuple:
    return (0, int(slot), "") if slot.isdigit() else (1, 0, slot)


def _share_bars(ax, x: np.ndarray, rows: list[dict], width: float, colour) -> None:
    """Catastrophic share in percent, with the Wilson interval where trials are random draws."""
    share = np.array([r["share"] or 0.0 for r in rows])
    err = None
    if all(r["ci_low"] is not None for r in rows):  # a census (no seed) has no sampling error to draw
        err = np.vstack([share - [r["ci_low"] for r in rows], [r["ci_high"] for r in rows] - share]).clip(min=0)
    ax.bar(x, 100 * share, width=width, color=colour, yerr=None if err is None else 100 * err, capsize=2)


def scatter(table: pl.DataFrame, names: list[str]) -> Figure:
    """Each shared condition's median delta_ppl: reference run on x, every other run on y (log-log)."""
    fig = Figure(figsize=(6.8, 6.2), layout="constrained")
    ax = fig.add_subplot()
    ref = table[f"median_{names[0]}"].to_numpy()
    values = np.concatenate([table[f"median_{n}"].to_numpy() for n in names])
    finite = values[np.isfinite(values)]
    # A margin of ~10% (log scale) keeps points at the baseline, 1, off the corner.
    low, high = min(finite.min(initial=1.0), 1.0) / 1.1, max(finite.max(initial=1.0), 1.0) * 1.1
    edge = high * 1.3 if np.isinf(values).any() else high  # where non-finite medians are drawn
    for name, colour in zip(names[1:], palette(len(names))[1:]):
        other = table[f"median_{name}"].to_numpy()
        x, y = np.where(np.isinf(ref), edge, ref), np.where(np.isinf(other), edge, other)  # non-finite: on the edge
        broken = np.isinf(ref) | np.isinf(other)
        ax.scatter(x[~broken], y[~broken], s=22, alpha=0.7, color=colour, label=name)
        ax.scatter(x[broken], y[broken], s=40, marker="x", color=NONFINITE, clip_on=False,
                   label=f"{name}: non-finite (on the edge)" if broken.any() else None)
    limit = edge * (1.25 if edge > high else 1.0)  # room around the non-finite markers on the edge
    ax.plot([low, limit], [low, limit], **BASELINE_STYLE, label="equal sensitivity")
    ax.set(xscale="log", yscale="log", xlim=(low, limit), ylim=(low, limit))
    plain_log_ticks(ax.xaxis)
    plain_log_ticks(ax.yaxis)
    ax.set_xlabel(f"{names[0]}: median ppl / baseline (log)")
    ax.set_ylabel("other run: median ppl / baseline (log)")
    ax.legend(fontsize=8)
    fig.suptitle(f"Per condition ({len(table)} shared): above the line, more sensitive than {names[0]}", fontsize=11)
    return fig


def display(table: pl.DataFrame, names: list[str], limit: int = 10) -> Table:
    """The joined table for people: keys, then median and catastrophic share per run, then ratios."""
    keys = [c for c in table.columns if not c.startswith(("n_", "median_", "worst_", "share_", "ratio_"))]
    if table["kind"].n_unique() == 1:
        keys.remove("kind")
    cols = keys + [f"median_{n}" for n in names] + [f"share_{n}" for n in names] + [f"ratio_{n}" for n in names[1:]]
    formats = {c: percent if c.startswith("share_") else ratio for c in cols if c not in keys}
    shown = Table.plain(table.select(cols).head(limit), formats)
    renames = (("median_", "median "), ("share_", "catastrophic "), ("ratio_", f"ratio vs {names[0]}: "))
    for old, new in renames:
        shown.headers = [h.replace(old, new) for h in shown.headers]
    return shown


def default_out(runs: Sequence[Run]) -> Path:
    """<first run>/analysis/compare-<other run ids joined by '+'>/"""
    return runs[0].path / "analysis" / ("compare-" + "+".join(r.run_id for r in runs[1:]))


def write(runs: Sequence[Run], out: Path, threshold: float = tables.CATASTROPHIC, formats: Sequence[str] = ("png",),
          log: Callable[[str], None] = lambda _: None) -> tuple[pl.DataFrame, list[Path]]:
    """compare.parquet, the two figures, compare.md and compare.html into `out`."""
    names, table = labels(runs), joined(runs, threshold)
    out.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out / "compare.parquet")
    log("figure 1/2: compare-layers")
    written = [out / "compare.parquet", *save(side_by_side(runs, threshold), out / "compare-layers", formats)]
    log("figure 2/2: compare-scatter")
    written += save(scatter(table, names), out / "compare-scatter", formats)
    doc = Document("sensray comparison: " + " vs ".join(names))
    doc.add(Heading("Runs"), Para("; ".join(f"**{n}**: `{r.path}` ({r.baseline['model']}, {r.baseline.get('dtype')}, "
                                          f"baseline ppl {r.baseline['ppl']:.4g})" for n, r in zip(names, runs))))
    doc.add(Para(f"{len(table)} conditions in common, joined on {', '.join(join_keys(runs))}; sorted by how much "
                 f"the runs disagree. Each run is measured against its own baseline."))
    doc.add(Heading("Largest differences"), display(table, names, limit=20))
    doc.add(Heading("Figures"), FigureBlock("Per layer, side by side", path=written[1]),
            FigureBlock("Per condition, run against run", path=written[1 + len(formats)]))
    doc.add(Heading("Table"), Code(f"import polars as pl\npl.read_parquet('{out / 'compare.parquet'}')"))
    for name, text in (("compare.md", markdown(doc, out)), ("compare.html", html(doc))):
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return table, written
