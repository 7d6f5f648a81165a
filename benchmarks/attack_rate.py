"""Attack steps per minute on the shipped model: the local executor, and the Ray pool with 1 and 2 replicas.

    python benchmarks/attack_rate.py                  # 8 mantissa flips each way, the table for docs/BENCHMARKS.md
    python benchmarks/attack_rate.py --flips 4 --evaluate 16
    python benchmarks/attack_rate.py --format nf4     # the shipped model in nf4 (double quant): codes only

A step is one backward pass on one replica (the ranking) and `--evaluate` exact bitflip trials spread over
the pool, then a commit on every replica (which re-records its prefix). Mantissa-only flips, so the search
does not stop at its first flip (an unrestricted one breaks the model at once). Each way runs
`sensray attack` in its own process (its own Ray) and reads steps_per_minute from attack.json: the search
loop only, not the replicas' startup nor the random baseline (switched off here). Every way runs with
OMP_NUM_THREADS=1 (a Ray actor pins one thread per replica anyway): on a shared CPU torch's default of a
thread per core oversubscribes it and a local step costs 10-30x more (docs/BENCHMARKS.md, "Attack").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAYS = {"local": ["--executor", "local"], "ray x1": ["--executor", "ray", "--replicas", "1"],
        "ray x2": ["--executor", "ray", "--replicas", "2"]}


# What a quantized format's search flips so that it does not stop at its first flip: its codes (a statistic's
# exponent MSB, like a float's, ends it at once).
FORMATS = {"fp32": ["--set", "attack.field=mantissa"],
           "int8": ["--set", "model.quantization=int8", "--set", "attack.target=blocks.*.*.*.weight"],
           "nf4": ["--set", "model.quantization=nf4", "--set", "model.double_quant=true",
                   "--set", "attack.target=blocks.*.*.*.weight"]}


def one(way: str, flips: int, evaluate: int, out: Path, fmt: str = "fp32") -> dict:
    command = [sys.executable, "-m", "sensray", "attack", str(REPO / "experiments" / "attack-bitflip.yaml"),
               *WAYS[way], "--output-dir", str(out), *FORMATS[fmt],
               "--set", f"stop.max_flips={flips}", "--set", "random.seeds=0", "--set", f"attack.evaluate={evaluate}"]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{way} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((Path(done.stdout.strip().splitlines()[-1]) / "attack.json").read_text())
    return {"way": way, "steps": summary["steps_this_session"], "seconds": summary["search_seconds"],
            "per_minute": summary["steps_per_minute"], "replicas": summary["replicas"],
            "ppl": summary["final"]["delta_ppl"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flips", type=int, default=8)
    parser.add_argument("--evaluate", type=int, default=8, help="candidates evaluated per step (the spec's 8)")
    parser.add_argument("--ways", nargs="*", default=list(WAYS), choices=list(WAYS))
    parser.add_argument("--format", default="fp32", choices=list(FORMATS),
                        help="fp32 (mantissa flips), or int8 / nf4 (their codes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one(way, args.flips, args.evaluate, Path(tmp) / way.replace(" ", ""), args.format) for way in args.ways]
    what = "mantissa flips" if args.format == "fp32" else "code flips"
    print(f"attack steps on sensray-tiny ({args.format}, {what}, {args.evaluate} candidates a step, {args.flips} steps)")
    print(f"  {'way':<8} {'replicas':>8} {'steps':>6} {'seconds':>8} {'steps/min':>10} {'ppl after':>10}")
    for r in rows:
        print(f"  {r['way']:<8} {r['replicas']:>8} {r['steps']:>6} {r['seconds']:>8.1f} {r['per_minute']:>10.2f} "
              f"{r['ppl']:>10.4f}")


if __name__ == "__main__":
    main()
