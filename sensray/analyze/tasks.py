"""lm-eval task scores in runs: what a model can still do, against how hard it was perturbed.

    python -m sensray.analyze results/ablation-tasks/<run id>           # + analysis/tasks.md, tasks.png
    python -m sensray.analyze results/evaluate/<dense> results/evaluate/<wanda50>   # + compare-tasks.md

    from sensray.analyze.tasks import task_table, compare_tasks
    task_table(run)          # one row per (scored trial, task metric): value, 95% interval, baseline, change
    compare_tasks(runs)      # the task metrics of several runs side by side (baselines, then shared trials)

A run's task scores are the `<task>/<metric>` columns of the trials that scored lm-eval tasks
(spec `eval:`; `sensray evaluate`), and the unperturbed model's in baseline.json `tasks`.
Intervals are 95%: a metric that is a share of documents (acc, acc_norm, exact_match) gets the
Wilson interval of its `<task>/n` documents, which stays inside [0, 1] and is not zero-width at
0 or 1 as lm-eval's normal stderr is; any other metric ±1.96 lm-eval stderrs where lm-eval has
one (perplexities have none). The figure draws each metric against the perturbation's strength
(sigma, sparsity, rate, count: the numeric condition that varies) with one line per target, or
per target when nothing numeric varies (an ablation), over the baseline and its interval.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from sensray.analyze.run import Run
from sensray.results import TASK_SECONDS, is_task_column
from sensray.analyze.tables import Z95, conditions, parse_target, wilson_interval

SHARES = ("acc", "acc_norm", "exact_match", "acc_mutual_info")  # lm-eval metrics that are means of 0/1
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")  # substrings of metric names
REDUNDANT = ("word_perplexity", "byte_perplexity", "bits_per_byte")  # beside token_perplexity: same ranking
MAX_PANELS = 6


def task_metrics(columns: Sequence[str]) -> list[str]:
    """The `<task>/<metric>` columns that are scores (not their stderr or document count)."""
    return [c for c in columns if is_task_column(c) and c != TASK_SECONDS and not c.endswith(("_stderr", "/n"))]


def has_tasks(run: Run) -> bool:
    return bool(task_metrics(run.trials.columns) or run.baseline.get("tasks"))


def lower_is_better(column: str) -> bool:
    return any(word in column for word in LOWER_IS_BETTER)


def interval(column: str, value: float | None, stderr: float | None, n: float | None) -> tuple:
    """95% interval of one task metric: Wilson for a share of n documents, else ±1.96 stderr, else none."""
    if value is None or not math.isfinite(value):
        return None, None
    metric = column.split("/", 1)[1].split("@")[0]
    if metric in SHARES and n and 0 <= value <= 1:
        return wilson_interval(round(value * n), int(n))
    if isinstance(stderr, (int, float)) and math.isfinite(stderr):
        return value - Z95 * stderr, value + Z95 * stderr
    return None, None


def task_table(run: Run) -> pl.DataFrame:
    """One row per scored trial and task metric: its conditions, the value with its interval, the
    baseline's value and the change (value - baseline), and the trial's delta_ppl; sorted with the
    most damaged first for each metric (lowest accuracy, highest perplexity)."""
    trials = run.trials
    metrics = task_metrics(trials.columns)
    if not metrics:
        return pl.DataFrame()
    keep = ["trial_id", "kind", "target", *conditions(trials), "delta_ppl"]
    scored = trials.filter(pl.any_horizontal([pl.col(m).is_not_null() for m in metrics]))
    base = run.baseline.get("tasks") or {}
    rows = []
    for row in scored.iter_rows(named=True):
        layer, module = parse_target(str(row["target"]))
        for m in metrics:
            low, high = interval(m, row[m], row.get(f"{m}_stderr"), row.get(f"{m.split('/')[0]}/n"))
            rows.append({**{k: row.get(k) for k in keep}, "layer": layer, "module": module, "task_metric": m,
                         "value": row[m], "ci_low": low, "ci_high": high, "baseline": base.get(m),
                         "change": None if row[m] is None or base.get(m) is None else row[m] - base[m]})
    table = pl.DataFrame(rows, infer_schema_length=None)
    rank = pl.col("task_metric").replace_strict({m: i for i, m in enumerate(metrics)}, return_dtype=pl.Int64)
    worst_first = pl.when(pl.col("task_metric").map_elements(lower_is_better, return_dtype=pl.Boolean))
    return table.sort([rank, worst_first.then(-pl.col("value")).otherwise(pl.col("value"))], nulls_last=True)


def baseline_table(run: Run) -> pl.DataFrame:
    """The unperturbed model's task metrics with their intervals (baseline.json `tasks`)."""
    base = run.baseline.get("tasks") or {}
    rows = []
    for m in task_metrics(list(base)):
        low, high = interval(m, base[m], base.get(f"{m}_stderr"), base.get(f"{m.split('/')[0]}/n"))
        rows.append({"task_metric": m, "value": base[m], "ci_low": low, "ci_high": high})
    return pl.DataFrame(rows, schema={"task_metric": pl.String, "value": pl.Float64, "ci_low": pl.Float64,
                                      "ci_high": pl.Float64})


def compare_tasks(runs: Sequence[Run], names: Sequence[str]) -> pl.DataFrame:
    """Task metrics side by side: each run's baseline (`trial_id` "baseline"), then every trial
    that scored tasks in all the runs (the same trial id is the same perturbation), with
    `<name>`, `<name>_low`, `<name>_high` per run."""
    frames = []
    for run, name in zip(runs, names):
        base = baseline_table(run).with_columns(pl.lit("baseline").alias("trial_id"), pl.lit(None, pl.String)
                                                .alias("target"))
        trials = task_table(run)
        if not trials.is_empty():
            base = pl.concat([base, trials.select(base.columns)], how="vertical_relaxed")
        frames.append(base.rename({"value": name, "ci_low": f"{name}_low", "ci_high": f"{name}_high"}))
    out = frames[0]
    for frame in frames[1:]:
        out = out.join(frame.drop("target"), on=["trial_id", "task_metric"], how="inner")
    first = pl.col("trial_id") != "baseline"
    ids = ["trial_id", "target", "task_metric"]
    return out.sort([first, "task_metric", "target"], nulls_last=False).select(
        *ids, *[c for c in out.columns if c not in ids])


def strength(run: Run) -> str | None:
    """The numeric condition that varies (sigma, sparsity, rate, ...), the x axis of the figure."""
    numeric = [c for c in conditions(run.trials) if run.trials[c].dtype.is_numeric()]
    return numeric[0] if numeric else None


def figure(run: Run) -> Figure | None:
    """Each task metric against the perturbation's strength (or per target), with 95% intervals,
    over the baseline and its interval; None with fewer than two scored trials."""
    table = task_table(run)
    if table.is_empty() or table["trial_id"].n_unique() < 2:
        return None
    shown = _panels(table["task_metric"].unique(maintain_order=True).to_list())
    x = strength(run)
    cols = min(2, len(shown))
    fig = Figure(figsize=(6.2 * cols, 3.8 * math.ceil(len(shown) / cols)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(shown) / cols), cols, squeeze=False)).ravel()
    baseline = {r["task_metric"]: r for r in baseline_table(run).iter_rows(named=True)}
    for ax, metric in zip(axes, shown):
        part = table.filter(pl.col("task_metric") == metric)
        (_curves if x else _per_target)(ax, part, x)
        _baseline(ax, baseline.get(metric))
        values = part["value"].drop_nulls().to_numpy()
        if lower_is_better(metric) and len(values) and values.min() > 0 and values.max() > 10 * values.min():
            ax.set_yscale("log")  # a perplexity that jumps 60-fold would flatten every other point
        ax.set_title(metric, fontsize=10)
        ax.set_ylabel(metric.split("/", 1)[1] + (" (lower is better)" if lower_is_better(metric) else ""))
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    fig.suptitle(f"{run.name}: lm-eval task scores of the perturbed model (95% intervals)", fontsize=11)
    return fig


def _panels(metrics: list[str]) -> list[str]:
    tasks_with_tokens = {m.split("/")[0] for m in metrics if m.endswith("/token_perplexity")}
    kept = [m for m in metrics if not (m.split("/")[0] in tasks_with_tokens and m.split("/", 1)[1] in REDUNDANT)]
    return kept[:MAX_PANELS]


def _curves(ax, part: pl.DataFrame, x: str) -> None:
    for target in part["target"].unique(maintain_order=True).to_list():
        line = part.filter(pl.col("target") == target).sort(x)
        values = line["value"].to_numpy()
        ax.errorbar(line[x].to_numpy(), values, yerr=_yerr(line, values), marker="o", ms=4, capsize=2,
                    label=str(target))
    ax.set_xlabel(x)


def _per_target(ax, part: pl.DataFrame, _x) -> None:
    part = part.sort(["layer", "module"], nulls_last=True)
    values = part["value"].to_numpy()
    ax.errorbar(np.arange(len(part)), values, yerr=_yerr(part, values), fmt="o", ms=4, capsize=2)
    labels = [f"{t} ({m})" if m else str(t) for t, m in zip(part["target"], part.get_column("mode")
              if "mode" in part.columns else [None] * len(part))]
    ax.set_xticks(range(len(part)), labels, rotation=90, fontsize=7)


def _yerr(part: pl.DataFrame, values: np.ndarray):
    low = part["ci_low"].cast(pl.Float64).to_numpy()
    high = part["ci_high"].cast(pl.Float64).to_numpy()
    if np.isnan(low).all():
        return None
    return np.vstack([np.nan_to_num(values - low), np.nan_to_num(high - values)]).clip(min=0)


def _baseline(ax, row: dict | None) -> None:
    if row is None or row["value"] is None:
        return
    ax.axhline(row["value"], color="black", linewidth=1.0, label="unperturbed model")
    if row["ci_low"] is not None:
        ax.axhspan(row["ci_low"], row["ci_high"], color="black", alpha=0.08, linewidth=0)
    if len(ax.get_legend_handles_labels()[1]) <= 11:  # one line per target: beyond ten, a legend hides the plot
        ax.legend(fontsize=7, loc="best")


def text_tables(run: Run, top: int = 10) -> list[tuple[str, pl.DataFrame]]:
    """(title, table) for the terminal and the report: the baseline, then the most damaged trials per metric."""
    out = [("lm-eval tasks, unperturbed model (95% interval)", baseline_table(run))]
    table = task_table(run)
    if table.is_empty() or (table["kind"] == "none").all():  # `sensray evaluate`: its one trial is the baseline
        return out
    for metric in _panels(table["task_metric"].unique(maintain_order=True).to_list()):
        part = table.filter(pl.col("task_metric") == metric).drop("task_metric", "kind", "layer", "module")
        out.append((f"{metric}: most damaged trials first (of {len(part)} scored)", part.head(top)))
    return out


def markdown(tables: list[tuple[str, pl.DataFrame]], intro: str, figures: Sequence[Path] = ()) -> str:
    lines = [f"# {intro}", ""]
    for path in figures:
        lines += [f"![lm-eval task scores]({path.name})", ""]
    for title, table in tables:
        lines += [f"## {title}", "", _md_table(table), ""]
    return "\n".join(lines)


def _md_table(table: pl.DataFrame) -> str:
    if table.is_empty():
        return "(none)"
    head = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.iter_rows()]
    return "\n".join([head, rule, *body])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def write(run: Run, out: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """tasks.md (and tasks.png when trials were scored) into `out`; nothing when the run has no tasks."""
    from sensray.analyze.figures import save

    if not has_tasks(run):
        return []
    out.mkdir(parents=True, exist_ok=True)
    fig = figure(run)
    written = save(fig, out / "tasks", formats) if fig is not None else []
    doc = markdown(text_tables(run, top=20), f"{run.name}/{run.run_id}: lm-eval tasks", written[:1])
    (out / "tasks.md").write_text(doc, encoding="utf-8")
    return [*written, out / "tasks.md"]


def write_compare(runs: Sequence[Run], names: Sequence[str], out: Path) -> tuple[pl.DataFrame, list[Path]]:
    """compare-tasks.md: the runs' task metrics side by side (nothing when no run has tasks)."""
    if not all(has_tasks(run) for run in runs):
        return pl.DataFrame(), []
    table = compare_tasks(runs, names)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare-tasks.md"
    intro = "lm-eval tasks side by side: " + " vs ".join(names) + " (95% intervals)"
    path.write_text(markdown([("Task metrics", table)], intro), encoding="utf-8")
    return table, [path]


def report(run: Run, out: Path | None, formats: Sequence[str] = ("png",), top: int = 10) -> list[Path]:
    """`sensray analyze RUN`'s task section: the tables on stdout, the files into `out` (None: none)."""
    if not has_tasks(run):
        return []
    for title, table in text_tables(run, top):
        print(f"\n{title}\n{_md_table(table)}")
    return write(run, out, formats) if out is not None else []


def report_compare(runs: Sequence[Run], names: Sequence[str], out: Path | None) -> list[Path]:
    """`sensray analyze A B`'s task section: the runs' task metrics side by side."""
    if not all(has_tasks(run) for run in runs):
        return []
    print("\nlm-eval tasks side by side (95% intervals)\n" + _md_table(compare_tasks(runs, names)))
    return write_compare(runs, names, out)[1] if out is not None else []
