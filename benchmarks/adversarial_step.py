"""Time per attack step on the shipped model: one gradient, then the exact losses of a candidate batch.

    python benchmarks/adversarial_step.py                          # the table for docs/BENCHMARKS.md
    python benchmarks/adversarial_step.py --candidates 64 512 --threads 2

A step of GCG (or HotFlip) on one attack is one forward and backward pass for the one-hot gradient
and one forward pass over `candidates` inputs of prompt + suffix + continuation tokens. This times
both, separately, at each budget (suffix length), on a window of the shipped held-out text (24
tokens of prompt, 16 of continuation: experiments/adversarial.yaml's shape), with random candidate
suffixes; the median of `--repeats` runs, wall and CPU time (one thread: the CPU time is what a step
costs when other processes share the cores). Candidates are evaluated in one batch (attack.batch_size
at least the candidate count), as the shipped experiment does.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of `fn`. On a shared machine the CPU time of this process (one thread) is
    what the step costs; the wall time adds what other processes took from it."""
    fn()  # warm up: first-call allocations
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    from sensray.adversarial.objective import Problem, Scorer
    from sensray.data import BUNDLED_CORPUS
    from sensray.models import load_model, load_tokenizer
    from sensray.spec import ModelSpec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--candidates", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec()
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    ids = tokenizer(BUNDLED_CORPUS.read_text(encoding="utf-8")[:400]).input_ids[:40]
    generator = torch.Generator().manual_seed(0)
    print(f"sensray-tiny, {args.threads} torch thread(s); prompt 24 + suffix + continuation 16 tokens; "
          f"median of {args.repeats}\n")
    print("| budget | candidates | tokens per step | gradient s | candidates s | step s (wall) | step s (CPU) | "
          "candidate tokens per CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        problem = Problem(tuple(ids[:24]), (), (), tuple(ids[24:]), "nll")
        edit = torch.randint(1, 2048, (budget,), generator=generator)
        for count in args.candidates:
            scorer = Scorer(model, count)
            edits = torch.randint(1, 2048, (count, budget), generator=generator)
            grad, grad_cpu = timed(lambda: scorer.gradient(problem, edit), args.repeats)
            cand, cand_cpu = timed(lambda: scorer.losses(problem, edits), args.repeats)
            tokens = count * (40 + budget)
            print(f"| {budget} | {count} | {tokens:,} | {grad:.3f} | {cand:.3f} | {grad + cand:.3f} | "
                  f"{grad_cpu + cand_cpu:.3f} | {tokens / cand_cpu:,.0f} |")


if __name__ == "__main__":
    main()
