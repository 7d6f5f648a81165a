"""sensray saliency: a whole-model sensitivity map from gradients, and how well it predicts a sweep.

    sensray saliency --model sensray-tiny                                  # map of the bundled eval text
    sensray saliency --model sensray-tiny --dtype bfloat16 --corpus notes/eval.txt --num-sequences 32
    sensray saliency --model sensray-tiny --quantization nf4 --double-quant   # codes, scales and their bits
    sensray saliency --check results/noise/<run> --check results/ablation/<run> --check results/bitflip/<run>
    sensray saliency --model llama-2-7b --dtype bfloat16 --checkpoint --dry-run

One backward pass over the eval text gives every weight's gradient g (consumed as it is made: peak
memory is weights + activations, never a second model of gradients), then one small backward per
window gives the empirical Fisher diagonal. Tables (Parquet), figures and report.md land in
<output-dir>/saliency/<id>/, written atomically; the last line printed is that directory.

With --check RUN (repeatable) the model and text are the run's own, and every trial of the run
(bit flips and `zero` element by element, noise and zero/mean ablation tensor by tensor) gets its
predicted loss change, ranked against its measured delta_nll by Spearman's rho per granularity.
Invalid arguments exit with status 2 and one line saying what is wrong; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from sensray.errors import SpecError, run_cli

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other invalid argument
        raise SpecError("", message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sensray.saliency", description=__doc__.split("\n\n")[0],
                epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[2:]),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="alias (sensray list models), HF id or local directory (default: sensray-tiny, "
                                   "or the --check run's)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="weight dtype (default float32)")
    p.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"],
                   help="load through bitsandbytes and score the dequantized weights, their codes and scales "
                        "(default none)")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the block scales again (QLoRA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped with the model")
    p.add_argument("--corpus", help="eval or calibration text: bundled, bundled-train, a .txt/.jsonl file or "
                                    "hf:<dataset>[/<config>] (default bundled)")
    p.add_argument("--seq-len", type=int, metavar="TOKENS", help="window length (default 128)")
    p.add_argument("--num-sequences", type=int, metavar="N", help="windows (default 16)")
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per forward (default 16)")
    p.add_argument("--check", action="append", default=[], metavar="RUN",
                   help="a finished sweep (noise, ablation, bitflip, zero) to predict and rank (repeatable)")
    p.add_argument("--top-k", type=int, default=16, metavar="K", help="top elements and flips kept per tensor")
    p.add_argument("--fisher-windows", type=int, metavar="N",
                   help="windows the Fisher diagonal averages (one small backward each; 0: none; default all)")
    p.add_argument("--checkpoint", action="store_true",
                   help="recompute each decoder block in the backward (activation memory: block inputs only)")
    p.add_argument("--output-dir", default="results", help="write to DIR/saliency/<id> (default results)")
    p.add_argument("--dry-run", action="store_true", help="check the model, text and runs; load no weights")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(build_parser().parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    from sensray.saliency.setup import Setup

    setup = Setup(args)  # every check that needs no weights: raises before anything is loaded or written
    if args.dry_run:
        print(setup.describe())
        return 0
    model, batches = setup.load()
    from sensray.saliency.measure import measure
    from sensray.saliency.probes import Probes
    from sensray.saliency.tables import tables

    rows = [row for run in setup.runs for row in run.rows]
    probes = Probes(model, rows) if rows else None
    print(f"saliency: {setup.describe().splitlines()[0]}", file=sys.stderr)
    measured = measure(model, batches, args.top_k, args.fisher_windows, args.checkpoint, probes)
    fisher = measured.windows > 0
    frames = tables(measured.scores, fisher)
    check = None
    if probes is not None:
        check = _check(setup, probes, fisher)
    out = _write(setup, measured, frames, check)
    print(out)
    return 0


def _check(setup, probes, fisher: bool) -> dict:
    import polars as pl

    from sensray.saliency.check import correlations, joined, unused

    predictions, magnitude = probes.predictions(fisher), probes.magnitude
    parts, start = [], 0
    for run in setup.runs:
        end = start + len(run.rows)
        parts.append(joined(run, {k: v[start:end] for k, v in predictions.items()}, magnitude[start:end]))
        start = end
    table = pl.concat(parts, how="diagonal_relaxed")
    return {"check": table, "correlations": correlations(table), "unused": unused(table)}


def _write(setup, measured, frames: dict, check: dict | None) -> Path:
    """Everything into a hidden directory beside the final one, renamed into place at the end."""
    from sensray.results import new_run_id
    from sensray.saliency import figures
    from sensray.saliency.report import document
    from sensray.analyze import render

    final = Path(setup.args.output_dir) / "saliency" / new_run_id()
    tmp = final.with_name(f".{final.name}.partial")
    tmp.mkdir(parents=True)
    try:
        for name, frame in {**frames, **({k: v for k, v in check.items() if k != "unused"} if check else {})}.items():
            frame.write_parquet(tmp / f"{name}.parquet")
        context = setup.context(measured.tokens)
        made = {"heatmap": figures.heatmap(frames["tensors"], check and check["check"], context)}
        if check is not None:
            made["check"] = figures.scatter(check["check"], check["correlations"], context)
        paths = {name: figures.save(fig, tmp / name)[0] for name, fig in made.items()}
        summary = {"setup": setup.summary(), **measured.summary(),
                   "checked": {run.label: str(run.path) for run in setup.runs}}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        doc = document(setup.summary(), measured.summary(), frames, paths, check)
        (tmp / "report.md").write_text(render.markdown(doc, tmp), encoding="utf-8")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


if __name__ == "__main__":
    sys.exit(main())
