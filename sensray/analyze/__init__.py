"""Analysis of finished sweeps: tables, figures, reports, and comparisons between runs.

    python -m sensray.analyze results/bitflip/<run id>                 # see __main__.py for the CLI

    from sensray.analyze import load_run, rank_targets, by_layer, Sequences
    run = load_run("results/bitflip/<run id>")
    rank_targets(run.trials, seq=Sequences.of(run.trials, run.baseline)).head(10)

Modules, one job each:
    run.py        read a run directory (trials.parquet, baseline.json, spec.yaml), clear errors
    tables.py     polars aggregations: DataFrame in, DataFrame out (notebook-friendly)
    stats.py      bootstrap intervals over eval sequences (and draws); paired comparisons
    fmt.py        how numbers are written: one policy per kind of column
    sections.py   the report as sections, contributed per analysis in a fixed order
    faults.py     bit flips: fields, bit positions and matrices actually hit
    dose.py       noise (any numeric dose): where each module kind breaks
    ablations.py  which components matter, per mode, layer and module kind
    pruning.py    methods x sparsity, highest sparsity under the threshold, achieved sparsity
    overview.py   what every run gets: ranked conditions, layers, distribution, worst trials, all trials
    figures.py    matplotlib heatmaps and the distribution; curves.py: curves against a dose or sparsity
    reading.py    the findings every run gets, in words
    explorer.py   every trial, sortable and filterable inside report.html
    render.py     terminal, Markdown and self-contained HTML output of one document
    report.py     one run -> report.md, report.html, summary.json, figures
    compare.py    several runs -> joined table, side-by-side and scatter figures
"""

from sensray.analyze.run import AnalysisError, Run, load_run
from sensray.analyze.stats import Sequences
from sensray.analyze.tables import (
    CATASTROPHIC,
    achieved_sparsity,
    annotate,
    by_bit,
    by_flip,
    by_layer,
    by_matrix,
    by_module,
    by_sigma,
    catastrophic_share,
    conditions,
    parse_target,
    rank_targets,
    summarize,
    threshold_sigma,
    wilson_interval,
    worst_trials,
)

__all__ = [
    "AnalysisError", "CATASTROPHIC", "Run", "Sequences", "achieved_sparsity", "annotate", "by_bit", "by_flip",
    "by_layer", "by_matrix", "by_module", "by_sigma", "catastrophic_share", "conditions", "load_run",
    "parse_target", "rank_targets", "summarize", "threshold_sigma", "wilson_interval", "worst_trials",
]
