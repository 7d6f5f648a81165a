"""Analyse sweep results: ranked tables on the terminal, figures and a report on disk.

    python -m sensray.analyze results/bitflip/<run id>                  # one run
    python -m sensray.analyze results/bitflip/<run id> --threshold 10 --svg
    python -m sensray.analyze results/a/<run id> results/b/<run id>     # compare (the first is the reference)
    python -m sensray.analyze results/bitflip/<run id> --no-write       # the tables only, nothing written
    python -m sensray.analyze results/bitflip-formats/<study id>        # a format study (analyze/formats.py)

One run writes <run>/analysis/: report.md, report.html (self-contained), summary.json and the
figures (PNG; SVG too with --svg). Several runs write <first run>/analysis/compare-<other run ids>/
(or --output-dir): compare.parquet (the joined table), compare.md, compare.html and two figures.
A run directory without trials.parquet, or a table or baseline missing a column or key, exits
with status 2 and a message naming the file.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import shutil
import sys
import textwrap
import time
from pathlib import Path

from sensray.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sensray.analyze",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + "\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory (results/<experiment>/<run id>); "
                        "two or more to compare them")
    parser.add_argument("--output-dir", "--out", dest="out", metavar="DIR",
                        help="where to write (default: <run>/analysis, or <first run>/analysis/compare-<other run "
                             "ids> when comparing); --out is the older spelling")
    parser.add_argument("--threshold", type=float, default=2.0, metavar="X",
                        help="a trial is catastrophic when non-finite or its ppl exceeds X times the baseline "
                             "(default 2)")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="rows per table on the terminal (default 10; "
                        "the report's own tables show at most 10 or 15 rows, every trial is in report.html)")
    parser.add_argument("--svg", action="store_true", help="write every figure as SVG too")
    parser.add_argument("--no-write", action="store_true", help="print the tables; write no figure or report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    from sensray.analyze.run import AnalysisError, load_run

    if not args.threshold > 1:
        raise AnalysisError(f"--threshold: a multiple of the baseline perplexity above 1, got {args.threshold:g}")
    from sensray.analyze import formats as format_study

    if len(args.runs) == 1 and format_study.is_study(args.runs[0]):  # a format study: formats x bit roles
        return format_study.main(Path(args.runs[0]), Path(args.out) if args.out else None, args.threshold,
                                 args.svg, args.no_write)
    log = Progress()
    runs = []
    for i, path in enumerate(args.runs, 1):
        log(f"reading run {i}/{len(args.runs)}: {path}")
        runs.append(load_run(path))
    formats = ("png", "svg") if args.svg else ("png",)
    if len(runs) == 1:
        return _one(runs[0], args, formats, log)
    return _compare(runs, args, formats, log)


def _one(run, args: argparse.Namespace, formats: tuple[str, ...], log: "Progress") -> int:
    from sensray.analyze import tasks
    from sensray.analyze.render import Table, text_table
    from sensray.analyze.report import analyse, timing, write

    log("aggregating")
    analysis = analyse(run, args.threshold)
    b, t = run.baseline, run.trials
    print(f"{run.name}/{run.run_id}: {len(t)} trials of {run.kind} on {b['model']} [{b.get('dtype', '?')}], "
          f"baseline ppl {b['ppl']:.2f} on {b['tokens']:,} tokens; {timing(t)}\n")
    for sentence in analysis.findings:
        print(_wrap("- " + sentence.replace("**", "").replace("`", "")))
    for title, table in analysis.tables():
        more = f" (first {args.top} of {len(table.rows)} rows)" if len(table.rows) > args.top else ""
        shown = replace(table, rows=table.rows[:args.top])
        print(f"\n{title}{': ' + table.title if table.title else ''}{more}\n" + text_table(shown))
    if not args.no_write:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, none opened
        out = Path(args.out) if args.out else run.path / "analysis"
        written = write(analysis, out, formats, log) + tasks.report(run, out, formats, args.top)  # + lm-eval tasks
        print(f"\nwrote {len(written)} files to {out}/: " + ", ".join(p.name for p in written))
    else:
        tasks.report(run, None, formats, args.top)
    return 0


def _compare(runs, args: argparse.Namespace, formats: tuple[str, ...], log: "Progress") -> int:
    from sensray.analyze import compare, tasks
    from sensray.analyze.render import text_table

    names = compare.labels(runs)
    for name, run in zip(names, runs):
        print(f"{name}: {run.path} ({run.baseline['model']} [{run.baseline.get('dtype', '?')}], {len(run.trials)} "
              f"trials of {run.kind}, baseline ppl {run.baseline['ppl']:.4f})")
    log("joining")
    if args.no_write:
        table = compare.joined(runs, args.threshold)
    else:
        import matplotlib

        matplotlib.use("Agg")
        out = Path(args.out) if args.out else compare.default_out(runs)
        table, written = compare.write(runs, out, args.threshold, formats, log)
    print(f"\n{len(table)} conditions in common (joined on {', '.join(compare.join_keys(runs))}); "
          f"largest differences first:\n" + text_table(compare.display(table, names, args.top)))
    if not args.no_write:
        written += tasks.report_compare(runs, names, out)  # lm-eval task metrics side by side, if any
        print(f"\nwrote {len(written)} files to {out}/: " + ", ".join(p.name for p in written))
    else:
        tasks.report_compare(runs, names, None)
    return 0


class Progress:
    """Steps of long work, on stderr with the time since start, so stdout stays the result."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, step: str) -> None:
        print(f"[{time.perf_counter() - self.start:5.1f}s] {step}", file=sys.stderr, flush=True)


def _wrap(text: str) -> str:
    width = min(shutil.get_terminal_size((100, 24)).columns, 110)
    return textwrap.fill(text, width=width, subsequent_indent="  ")


if __name__ == "__main__":
    sys.exit(main())
