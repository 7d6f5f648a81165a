"""Analysis of finished sweeps: tables, figures, reports, and comparisons between runs.

    python -m sensray.analyze results/bitflip/<run id>                 # see __main__.py for the CLI

    from sensray.analyze import load_run, rank_targets, by_layer
    run = load_run("results/bitflip/<run id>")
    rank_targets(run.trials).head(10)

Modules, one job each:
    run.py       read a run directory (trials.parquet, baseline.json, spec.yaml), clear errors
    tables.py    polars aggregations: DataFrame in, DataFrame out (notebook-friendly)
    reading.py   plain-language findings generated from those tables
    figures.py   matplotlib figures (heatmap, ablation bars, dose curves, distribution)
    render.py    terminal, Markdown and self-contained HTML output of one document
    report.py    one run -> report.md, report.html, summary.json, figures
    compare.py   several runs -> joined table, side-by-side and scatter figures
"""

from sensray.analyze.run import AnalysisError, Run, load_run
from sensray.analyze.tables import (
    CATASTROPHIC,
    annotate,
    by_flip,
    by_layer,
    by_module,
    by_sigma,
    catastrophic_share,
    conditions,
    parse_target,
    rank_targets,
    summarize,
    threshold_sigma,
    wilson_interval,
)

__all__ = [
    "AnalysisError", "CATASTROPHIC", "Run", "annotate", "by_flip", "by_layer", "by_module", "by_sigma",
    "catastrophic_share", "conditions", "load_run", "parse_target", "rank_targets", "summarize",
    "threshold_sigma", "wilson_interval",
]
