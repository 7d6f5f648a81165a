"""The analysis of one run: its sections, the reading, and the files they are written to.

    from sensray.analyze.report import analyse, write
    analysis = analyse(load_run("results/bitflip/<run id>"), threshold=2.0)
    write(analysis, out=Path("results/bitflip/<run id>/analysis"))

writes, into `out`:
    report.md      what was run (the study's question, the command, versions), the baseline with its
                   interval and ceiling, the reading, then each section's tables and figures
    report.html    the same, one self-contained page (figures embedded as base64, every trial in a
                   sortable, filterable table, no network)
    summary.json   the same numbers for machines (non-finite values as the string "inf")
    <kind>-*.png   the figures (and .svg with formats=("png", "svg"))

Sections come from sensray.analyze.sections: the perturbation kind's own (faults, dose, ablations,
pruning), other analyses' (formats, tasks), then those every run gets (overview).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import polars as pl
import yaml

from sensray.analyze import fmt, tables
from sensray.analyze.figures import save
from sensray.analyze.overview import columns_note
from sensray.analyze.reading import findings
from sensray.analyze.render import Bullets, Code, Document, Figure, Heading, Para, Table, html, markdown
from sensray.analyze.run import Run
from sensray.analyze.sections import TOP, Context, Section, collect

__all__ = ["Analysis", "TOP", "analyse", "document", "summary", "timing", "write"]


@dataclass
class Analysis:
    run: Run
    threshold: float
    context: Context
    sections: list[Section]
    findings: list[str]  # the reading: the sections' answers to the study's question first

    def tables(self) -> Iterator[tuple[str, Table]]:
        """(section title, table) of every table in the report, in order (the terminal prints these)."""
        for part in self.sections:
            for block in part.blocks:
                if isinstance(block, Table):
                    yield part.title, block


def analyse(run: Run, threshold: float = tables.CATASTROPHIC) -> Analysis:
    """Every section and the plain-language reading of a run (nothing written)."""
    ctx = Context(run, tables.annotate(run.trials), threshold)
    parts = collect(ctx)
    answers = [a for part in parts for a in part.answers]
    extra = [f for part in parts for f in part.findings]
    skip = frozenset().union(*(part.replaces for part in parts))
    return Analysis(run, threshold, ctx, parts, answers + findings(ctx.trials, threshold, ctx.vocab, skip) + extra)


def write(analysis: Analysis, out: Path, formats: Sequence[str] = ("png",),
          log: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Figures, report.md, report.html and summary.json into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    pending = [b for part in analysis.sections for b in part.blocks if isinstance(b, Figure) and b.fig is not None]
    written = []
    for i, block in enumerate(pending, 1):
        log(f"figure {i}/{len(pending)}: {block.stem}")
        paths = save(block.fig, out / block.stem, formats)
        block.path, block.fig = paths[0], None  # saved: the page embeds the file, the figure is freed
        written += paths
    doc = document(analysis)
    for name, text in (("report.md", lambda: markdown(doc, out)), ("report.html", lambda: html(doc)),
                       ("summary.json", lambda: json.dumps(summary(analysis), indent=2, allow_nan=False) + "\n")):
        log(f"writing {name}")
        (out / name).write_text(text(), encoding="utf-8")
        written.append(out / name)
    return written


def document(analysis: Analysis) -> Document:
    run, ctx = analysis.run, analysis.context
    doc = Document(f"sensray analysis: {run.name} / {run.run_id}")
    doc.add(Heading("What was run", anchor="run"), Bullets(what_was_run(run)),
            Heading("Baseline", anchor="baseline"), Bullets(baseline_lines(ctx)),
            Heading("Reading", anchor="reading"), Bullets(analysis.findings),
            Para("How numbers are written: " + fmt.POLICY + ". " + columns_note(ctx)))
    for part in analysis.sections:
        doc.add(Heading(part.title, anchor=part.key), *part.blocks)
    doc.add(Heading("Next", anchor="next"), Code(next_commands(run, analysis.threshold)))
    return doc


def what_was_run(run: Run) -> list[str]:
    spec, b, t = run.spec, run.baseline, run.trials
    data = spec.get("data", {})
    failed = t["error"].is_not_null().sum()
    space = yaml.safe_dump(spec.get("space", {}), default_flow_style=True, width=10_000).strip()
    question = f"**{spec['description']}**" if spec.get("description") else "(the spec has no description)"
    return [
        f"experiment `{run.name}`: {question}",
        f"run `{run.path}`" + (f", started {started(run.run_id)}" if started(run.run_id) else ""),
        f"command `{b['command']}`" if b.get("command") else "command: not recorded (a run from before sensray "
                                                             "recorded it)",
        f"versions: {versions_line(b.get('versions') or {})}",
        f"model `{b['model']}` ({b.get('source', b['model'])}), {b.get('dtype', '?')} on {b.get('device', '?')}, "
        f"{b.get('parameters', 0):,} parameters" + (f", vocabulary {b['vocab_size']:,}" if b.get("vocab_size") else ""),
        f"data `{data.get('corpus', '?')}`: {b.get('sequences', '?')} sequences of {data.get('seq_len', '?')} "
        f"tokens ({b['tokens']:,} scored)",
        f"perturbation `{spec.get('perturbation', run.kind)}`, space `{space}`, num_samples "
        f"{spec.get('num_samples', '?')}, seed {spec.get('seed', '?')}",
        *_search_line(spec.get("search")),
        f"{len(t)} trials ({failed} failed); {timing(t)}",
    ]


def versions_line(versions: dict[str, str]) -> str:
    """sensray first (with its commit), then the packages that compute the numbers."""
    if not versions:
        return "not recorded"
    commit = versions.get("sensray_commit")
    head = f"sensray {versions.get('sensray', '?')}" + (f" (git {commit})" if commit else "")
    rest = [f"{k} {v}" for k, v in versions.items() if k not in ("sensray", "sensray_commit")]
    return ", ".join([head, *rest])


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


def baseline_lines(ctx: Context) -> list[str]:
    b = ctx.run.baseline
    lines = [f"perplexity **{fmt.ppl(b['ppl'])}**" + _baseline_interval(ctx)
             + f" (mean NLL {b['nll']:.4f} nats/token) on {b['tokens']:,} tokens"]
    if ctx.ceiling:
        lines.append(f"uniform-output ceiling: a uniform guess over the {ctx.vocab:,}-token vocabulary scores ppl "
                     f"{ctx.vocab:,}, ×{fmt.sig(ctx.ceiling)} the baseline; a model whose output collapses to such a "
                     f"guess lands there whatever broke it (one that is confidently wrong can go beyond)")
    after = b.get("checksum_after_sweep")
    restored = "weights restored bit-exactly (checksum at load = after the sweep)"
    if after is None:
        restored = "weights checksum after the sweep: not recorded (the sweep did not finish)"
    elif after != b.get("checksum_at_load"):
        restored = f"**weights checksum changed**: {b.get('checksum_at_load')} at load, {after} after the sweep"
    return lines + [restored]


def _baseline_interval(ctx: Context) -> str:
    if ctx.seq is None:
        return " (no interval: this run did not record per-sequence NLLs)"
    _, low, high = ctx.seq.baseline()
    return (f", 95% CI {fmt.span(low, high, fmt.ppl)} over resampled eval sequences ({ctx.seq.count} sequences; "
            f"what another sample of this text could give)")


def next_commands(run: Run, threshold: float) -> str:
    """What to run next: listen to the most damaging finite trial, and to the mildest catastrophic one."""
    finite = run.trials.filter(pl.col("delta_ppl").is_finite()).sort("delta_ppl", descending=True)
    # Each comment on its own line above its command: a narrow page wraps the command, never hides the why.
    lines = ["# count only 10x perplexity as catastrophic", f"python -m sensray.analyze {run.path} --threshold 10"]
    picks = {"the most damaging finite trial": finite.head(1),
             "the mildest catastrophic one": finite.filter(pl.col("delta_ppl") > threshold).tail(1)}
    seen: set[str] = set()
    for what, pick in picks.items():
        if len(pick) and pick["trial_id"][0] not in seen:
            seen.add(pick["trial_id"][0])
            lines += [f"# hear {what} (×{fmt.sig(pick['delta_ppl'][0])})",
                      f"python -m sensray.generate --run {run.path} --trial {pick['trial_id'][0]} --ignore-eos"]
    return "\n".join(lines)


def summary(analysis: Analysis) -> dict[str, Any]:
    """Everything in the report as plain JSON: non-finite numbers become the string "inf"."""
    run, ctx, t = analysis.run, analysis.context, analysis.run.trials
    overall = tables.catastrophic_share(t, analysis.threshold).row(0, named=True)
    baseline = {k: run.baseline.get(k) for k in ("ppl", "nll", "tokens", "sequences", "vocab_size",
                                                 "checksum_at_load", "checksum_after_sweep")}
    if ctx.seq is not None:
        baseline["ppl_low"], baseline["ppl_high"] = ctx.seq.baseline()[1:]
    return _json_safe({
        "run": {"path": str(run.path), "id": run.run_id, "name": run.name, "kind": run.kind,
                "question": run.spec.get("description"), "started": started(run.run_id),
                "command": run.baseline.get("command"), "versions": run.baseline.get("versions"),
                "trials": len(t), "failed": int(t["error"].is_not_null().sum()),
                "replicas": t["replica"].n_unique(), "trial_seconds": t["seconds"].sum()},
        "model": {k: run.baseline.get(k) for k in ("model", "source", "dtype", "device", "parameters")},
        "data": run.spec.get("data", {}),
        "space": run.spec.get("space", {}),
        "baseline": baseline,
        "ceiling": ctx.ceiling,
        "threshold": analysis.threshold,
        "catastrophic": overall,
        "findings": analysis.findings,
        "sections": {part.key: {"title": part.title, "answers": part.answers,
                                **{name: _rows(value) for name, value in part.data.items()}}
                     for part in analysis.sections},
        "figures": {b.stem: b.path.name for part in analysis.sections for b in part.blocks
                    if isinstance(b, Figure) and b.path is not None},
    })


def _rows(value: Any) -> Any:
    return value.to_dicts() if isinstance(value, pl.DataFrame) else value


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
