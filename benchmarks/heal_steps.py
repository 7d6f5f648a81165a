"""What a heal costs on this machine: seconds per optimizer step of `sensray heal`, per method and thread count.

    python benchmarks/heal_steps.py                          # lora and masked x 1 and 2 threads, 30 steps each
    python benchmarks/heal_steps.py --steps 100 --threads 1  # one thread count only

The shipped model pruned to 50% by magnitude, healed for --steps steps of 8 windows x 128 tokens of
bundled-train (the shipped studies' shape), each configuration in its own process. The step time is
the training loop's own clock (sensray-heal.json `seconds` / steps); `wall` is the whole command: imports,
loading, the two evaluations, the merge and the export. The load average before each run is printed:
on a shared machine it says more about the numbers than anything else. Markdown, for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*argv: str, env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sensray", *argv], check=True, cwd=REPO, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    env = os.environ | {"PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / "pruned"
        run("prune", "--model", "sensray-tiny", "--method", "magnitude", "--sparsity", "0.5", "--output-dir",
            str(pruned), env=env)
        print(f"sensray heal, shipped model at 50% magnitude sparsity, {args.steps} steps of 8 x 128 tokens\n")
        print("| method | threads | s / step | tokens / s | wall (s) | load average before |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for method, lr in (("lora", "1e-3"), ("masked", "1e-4")):
            for threads in args.threads:
                load = os.getloadavg()[0]
                out = Path(tmp) / f"{method}-{threads}"
                wall = run("heal", "--model", str(pruned), "--method", method, "--steps", str(args.steps),
                           "--lr", lr, "--threads", str(threads), "--output-dir", str(out),
                           env=env | {"OMP_NUM_THREADS": str(threads)})
                seconds = json.loads((out / "sensray-heal.json").read_text())["seconds"] / args.steps
                print(f"| {method} | {threads} | {seconds:.3f} | {8 * 128 / seconds:,.0f} | {wall:.1f} | {load:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
