"""Early stopping vs the exhaustive study: the same top-k, fewer token evaluations.

    python benchmarks/early_stopping.py                                  # experiments/worst-noise.yaml
    python benchmarks/early_stopping.py experiments/worst-noise.yaml --set early_stop.top_k=5

Runs the study twice with the local executor, in this process: once with early stopping off
(every trial evaluated on every batch) and once as the spec says. Prints the token evaluations
each spent, the trials stopped, the wall time, and whether the top-k (by delta_ppl, ties broken by
trial id) is the same set of trials.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from sensray.early_stop import savings
from sensray.spec import load_spec
from sensray.sweep import main as sweep


def run(spec_path: str, overrides: list[str]) -> tuple[pl.DataFrame, int, float]:
    """(trials table, baseline tokens, wall seconds) of one local sweep."""
    out = io.StringIO()
    start = time.perf_counter()
    args = [spec_path, "--executor", "local", *[a for o in overrides for a in ("--set", o)]]
    with contextlib.redirect_stdout(out):
        if sweep(args) != 0:
            raise SystemExit(f"sweep failed: {args}")
    seconds = time.perf_counter() - start
    run_dir = Path(out.getvalue().strip().splitlines()[-1])
    tokens = __import__("json").loads((run_dir / "baseline.json").read_text())["tokens"]
    return pl.read_parquet(run_dir / "trials.parquet"), tokens, seconds


def top_k(table: pl.DataFrame, k: int, mode: str) -> list[str]:
    if "stopped_rung" in table.columns:
        table = table.filter(pl.col("stopped_rung").is_null())
    ranked = table.filter(pl.col("error").is_null()).sort(["delta_ppl", "trial_id"], descending=[mode == "max", False])
    return ranked["trial_id"][:k].to_list()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?", default="experiments/worst-noise.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    spec = load_spec(args.spec, args.overrides)
    if spec.early_stop is None:
        raise SystemExit(f"{args.spec}: no early_stop section to compare against")
    k, mode = spec.early_stop.top_k, spec.early_stop.mode
    with tempfile.TemporaryDirectory() as tmp:
        common = [*args.overrides, f"output_dir={tmp}"]
        exhaustive, tokens, t_full = run(args.spec, [*common, "early_stop=null"])
        stopped, _, t_stop = run(args.spec, common)
    spent, full = savings(stopped.to_dicts(), tokens)
    same = top_k(stopped, k, mode) == top_k(exhaustive, k, mode)
    print(f"{args.spec}: {stopped.height} trials, top_k {k}, rungs {spec.early_stop.rungs}, "
          f"{tokens} eval tokens per trial\n")
    print("| run | trials stopped | token evaluations | saved | wall (s) | top-k equals exhaustive |")
    print("|---|---|---|---|---|---|")
    print(f"| exhaustive | 0 | {exhaustive.height * tokens:,} | | {t_full:.1f} | |")
    rungs = stopped["stopped_rung"].drop_nulls()
    by_rung = ", ".join(f"{(rungs == r).sum()} at rung {r}" for r in range(len(spec.early_stop.rungs)))
    print(f"| early stopping | {rungs.len()} ({by_rung}) | {spent:,} | {1 - spent / full:.1%} | {t_stop:.1f} | {same} |")
    if not same:
        print(f"exhaustive top-{k}: {top_k(exhaustive, k, mode)}\nearly-stop top-{k}: {top_k(stopped, k, mode)}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
