"""Load time and trial time of the shipped model stored in float32, int8, nf4 (with and without double
quantization) and fp4, as a sensray replica runs it.

    python benchmarks/quantized.py                    # the table for docs/BENCHMARKS.md
    python benchmarks/quantized.py --trials 3 --rounds 1 --sequences 4   # a quick look

Per storage format, in its own process (so one format's warm caches do not flatter the next): the
`Replica` constructor (load through transformers' BitsAndBytesConfig, quantize, prepare, eval batches,
baseline, prefix recordings), then `--trials` bit-flip trials (one `field: sign` flip in a block drawn in
turn, full forward, provenance, restore, verify) on `--sequences` x 128 tokens (default 16), with
prefix reuse off so every trial runs the whole model. The formats alternate over `--rounds` rounds; the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

FORMATS = {
    "float32": {},
    "int8": {"quantization": "int8"},
    "nf4": {"quantization": "nf4"},
    "nf4 + double quant": {"quantization": "nf4", "double_quant": True},
    "fp4": {"quantization": "fp4"},
}


def measure(keys: dict, trials: int, sequences: int) -> dict:
    """(load seconds, median seconds per trial) of one storage format, in this process."""
    import torch

    torch.set_num_threads(1)
    from sensray.replica import Replica
    from sensray.space import Trial, trial_id
    from sensray.spec import validate

    spec = validate({
        "name": "bench", "model": {"name": "sensray-tiny", "device": "cpu", **keys},
        "data": {"corpus": "bundled", "seq_len": 128, "num_sequences": sequences, "batch_size": sequences},
        "perturbation": "bitflip", "space": {"target": "blocks.0", "field": "sign"}, "reuse": {"prefix": False},
    })
    start = time.perf_counter()
    replica = Replica(spec)
    load = time.perf_counter() - start
    seconds = []
    for t in range(trials):
        params = {"target": f"blocks.{t % 8}", "field": "sign", "count": 1, "seed": t}
        row = replica.run_trial(Trial(trial_id("bitflip", params), "bitflip", params, 0))
        assert row["error"] is None, row["error"]
        seconds.append(row["seconds"])
    return {"load": load, "trial": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=16, help="eval windows of 128 tokens, one batch")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one format here and print its numbers as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(FORMATS[args.one], args.trials, args.sequences)))
        return
    results: dict[str, list[dict]] = {name: [] for name in FORMATS}
    for _ in range(args.rounds):
        for name in FORMATS:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--trials", str(args.trials),
                                  "--sequences", str(args.sequences)],
                                 check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    print("| storage | replica load (s) | trial (s, median) | trials/s |\n|---|---|---|---|")
    for name, runs in results.items():
        load, trial = (statistics.median(r[k] for r in runs) for k in ("load", "trial"))
        print(f"| {name} | {load:.2f} | {trial:.3f} | {1 / trial:.1f} |")


if __name__ == "__main__":
    main()
