"""The analysis of one run: tables, findings, figures, and the files they are written to.

    from sensray.analyze.report import analyse, write
    analysis = analyse(load_run("results/bitflip/<run id>"), threshold=2.0)
    write(analysis, out=Path("results/bitflip/<run id>/analysis"))

writes, into `out`:
    report.md      what was run, the baseline, the reading, the top tables, the figures inline
    report.html    the same, one self-contained page (figures embedded as base64)
    summary.json   the same numbers for machines (non-finite values as the string "inf")
    <kind>-*.png   the figures (and .svg with formats=("png", "svg"))
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import polars as pl
import yaml

from sensray.analyze import figures, tables
from sensray.analyze.reading import findings
from sensray.analyze.render import Bullets, Code, Document, Figure, Heading, Para, Table, html, markdown
from sensray.analyze.run import Run

TOP = 10  # rows of the ranked tables in the report and on the terminal
CAPTIONS = {
    "heatmap": "Median perplexity change per target and flipped bit (log colour scale; hatched: non-finite).",
    "bars": "Perplexity change per layer and module kind for each ablation mode (log scale, bars rise from the "
            "baseline).",
    "curves": "Perplexity against the perturbation's strength per module kind (log-log; x on the top edge: "
              "non-finite).",
    "sparsity": "Perplexity against sparsity per pruning method (log scale; lines through the median per sparsity, "
                "diamonds: N:M patterns at their sparsity; in parentheses, whether weights compete per matrix or "
                "per output row).",
    "distribution": "Distribution of the perplexity change over all trials; non-finite trials in the right-hand bar.",
}


@dataclass
class Analysis:
    run: Run
    threshold: float
    tables: dict[str, pl.DataFrame]  # title -> summary, in report order
    findings: list[str]
    figures: dict[str, list[Path]] = field(default_factory=dict)  # stem -> files written


def analyse(run: Run, threshold: float = tables.CATASTROPHIC) -> Analysis:
    """Every aggregation and the plain-language reading of a run (nothing written)."""
    t = tables.annotate(run.trials)
    named = {
        "Most sensitive conditions": tables.rank_targets(t, threshold),
        "Per layer": tables.by_layer(t, threshold),
        "Per module kind": tables.by_module(t, threshold),
        "Per flipped bit": tables.by_flip(t, threshold),
        "Per module kind and sigma": tables.by_sigma(t, threshold),
        "Worst trials, exactly what they changed": tables.worst_trials(t, TOP),
    }
    return Analysis(run, threshold, {k: v for k, v in named.items() if not v.is_empty()}, findings(t, threshold))


def context(run: Run) -> str:
    """One line under every figure title: which model, which run, which baseline."""
    b = run.baseline
    return f"{b['model']} [{b.get('dtype', '?')}] · baseline ppl {b['ppl']:.4g} · {run.name}/{run.run_id}"


def write(analysis: Analysis, out: Path, formats: Sequence[str] = ("png",),
          log: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Figures, report.md, report.html and summary.json into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    run = analysis.run
    made = figures.figures_for(run.trials, run.baseline["ppl"], analysis.threshold, context(run))
    for i, (stem, fig) in enumerate(made.items(), 1):
        log(f"figure {i}/{len(made)}: {stem}")
        analysis.figures[stem] = figures.save(fig, out / stem, formats)
    doc = document(analysis)
    written = [p for paths in analysis.figures.values() for p in paths]
    for name, text in (("report.md", markdown(doc, out)), ("report.html", html(doc)),
                       ("summary.json", json.dumps(summary(analysis), indent=2, allow_nan=False) + "\n")):
        log(f"writing {name}")
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written


def document(analysis: Analysis) -> Document:
    run = analysis.run
    doc = Document(f"sensray analysis: {run.name} / {run.run_id}")
    doc.add(Heading("What was run"), Bullets(what_was_run(run)), Heading("Baseline"), Bullets(baseline_lines(run)))
    doc.add(Heading("Reading"), Bullets(analysis.findings))
    if analysis.figures:
        doc.add(Heading("Figures"))
    for stem, paths in analysis.figures.items():
        doc.add(Figure(paths[0], CAPTIONS.get(stem.rsplit("-", 1)[-1], stem)))
    doc.add(Heading("Tables"), Para(
        f"Numbers are perplexity / baseline perplexity over the trials of each group (seeds, samples); q25–q75 is "
        f"the middle half. Catastrophic: non-finite, or above {analysis.threshold:g}× the baseline (`--threshold`); "
        f"95% CI is a Wilson interval on that share, where the trials are random draws (the kind takes a seed)."))
    for title, table in analysis.tables.items():
        shown = TOP if title == "Most sensitive conditions" else None
        suffix = f" (top {TOP} of {len(table)})" if shown and len(table) > TOP else ""
        doc.add(Heading(title + suffix, 3), Table.of(table, shown))
    doc.add(Heading("Next"), Code(next_commands(run, analysis.threshold)))
    return doc


def what_was_run(run: Run) -> list[str]:
    spec, b, t = run.spec, run.baseline, run.trials
    data = spec.get("data", {})
    failed = t["error"].is_not_null().sum()
    space = yaml.safe_dump(spec.get("space", {}), default_flow_style=True, width=10_000).strip()
    return [
        f"experiment `{run.name}`" + (f": {spec['description']}" if spec.get("description") else ""),
        f"run `{run.path}`" + (f", started {started(run.run_id)}" if started(run.run_id) else ""),
        f"model `{b['model']}` ({b.get('source', b['model'])}), {b.get('dtype', '?')} on {b.get('device', '?')}, "
        f"{b.get('parameters', 0):,} parameters",
        f"data `{data.get('corpus', '?')}`: {b.get('sequences', '?')} sequences of {data.get('seq_len', '?')} "
        f"tokens ({b['tokens']:,} scored)",
        f"perturbation `{spec.get('perturbation', run.kind)}`, space `{space}`, num_samples "
        f"{spec.get('num_samples', '?')}, seed {spec.get('seed', '?')}",
        *_search_line(spec.get("search")),
        f"{len(t)} trials ({failed} failed); {timing(t)}",
    ]


def _search_line(search: dict | None) -> list[str]:
    """Adaptive runs pick each trial from the results so far: say so, their draws are not independent."""
    if not search:
        return []
    return [f"adaptive search `{search.get('algorithm')}` ({search.get('mode')} {search.get('metric')}, "
            f"{search.get('num_trials')} trials): trials are not independent draws, read shares with care"]


def started(run_id: str) -> str | None:
    """Run ids start with the local time they were created: 20261126-161055-6a52c0."""
    match = re.match(r"(\d{8}-\d{6})", run_id)
    if not match:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.strptime(match.group(1), "%Y%m%d-%H%M%S"))


def timing(t: pl.DataFrame) -> str:
    """Trial time: the sum over all trials, and the busiest replica's (replicas run in parallel)."""
    per_replica = t.group_by("replica").agg(pl.col("seconds").sum())
    total, busiest = t["seconds"].sum(), per_replica["seconds"].max()
    return (f"{total:.1f} s of trial time on {len(per_replica)} replica{'s' * (len(per_replica) != 1)} "
            f"(≈ {busiest:.1f} s wall for the busiest)")


def baseline_lines(run: Run) -> list[str]:
    b = run.baseline
    after = b.get("checksum_after_sweep")
    restored = "weights restored bit-exactly (checksum at load = after the sweep)"
    if after != b.get("checksum_at_load"):
        restored = f"**weights checksum changed**: {b.get('checksum_at_load')} at load, {after} after the sweep"
    return [f"perplexity **{b['ppl']:.4f}** (mean NLL {b['nll']:.4f} nats/token) on {b['tokens']:,} tokens", restored]


def next_commands(run: Run, threshold: float) -> str:
    """What to run next: listen to the most damaging finite trial, and to the mildest catastrophic one."""
    finite = run.trials.filter(pl.col("delta_ppl").is_finite()).sort("delta_ppl", descending=True)
    lines = [f"python -m sensray.analyze {run.path} --threshold 10    # count only 10x perplexity as catastrophic"]
    picks = {"the most damaging finite trial": finite.head(1),
             "the mildest catastrophic one": finite.filter(pl.col("delta_ppl") > threshold).tail(1)}
    seen: set[str] = set()
    for what, pick in picks.items():
        if len(pick) and pick["trial_id"][0] not in seen:
            seen.add(pick["trial_id"][0])
            lines.append(f"python -m sensray.generate --run {run.path} --trial {pick['trial_id'][0]} --ignore-eos"
                         f"    # {what} (×{pick['delta_ppl'][0]:.4g})")
    return "\n".join(lines)


def summary(analysis: Analysis) -> dict[str, Any]:
    """Everything in the report as plain JSON: non-finite numbers become the string "inf"."""
    run, t = analysis.run, analysis.run.trials
    overall = tables.catastrophic_share(t, analysis.threshold).row(0, named=True)
    return _json_safe({
        "run": {"path": str(run.path), "id": run.run_id, "name": run.name, "kind": run.kind,
                "started": started(run.run_id),
                "trials": len(t), "failed": int(t["error"].is_not_null().sum()),
                "replicas": t["replica"].n_unique(), "trial_seconds": t["seconds"].sum()},
        "model": {k: run.baseline.get(k) for k in ("model", "source", "dtype", "device", "parameters")},
        "data": run.spec.get("data", {}),
        "space": run.spec.get("space", {}),
        "baseline": {k: run.baseline.get(k) for k in ("ppl", "nll", "tokens", "sequences", "checksum_at_load",
                                                      "checksum_after_sweep")},
        "threshold": analysis.threshold,
        "catastrophic": overall,
        "tables": {_slug(title): table.to_dicts() for title, table in analysis.tables.items()},
        "findings": analysis.findings,
        "figures": {stem: [p.name for p in paths] for stem, paths in analysis.figures.items()},
    })


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
