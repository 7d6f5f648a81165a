"""What lm-eval tasks cost per trial, beside sensray's own metrics of the same trial.

    python benchmarks/tasks_cost.py                   # the table for docs/BENCHMARKS.md
    python benchmarks/tasks_cost.py --rounds 1 --limit 32

The shipped model resident in one Replica (the default sweep's data: 16 windows of 128 tokens, prefix
reuse on); each round runs, on the same perturbed model (block 3's down projection zeroed), sensray's
own trial (perturb, ppl/KL/top-1, restore, verify) and one evaluation of each shipped task, taking turns
so that a busy minute of the machine hits them alike. The table gives the median seconds per
evaluation, the documents and the tokens the task's requests hold, and the ratio to sensray's trial.
Tasks get no prefix reuse: their inputs are not the recorded eval windows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

TASKS = ("sensray-pydoc-choice", "sensray-pydoc-swap", "sensray-pydoc-ppl", "sensray-data-ppl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, help="documents per task (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sensray.models import load_tokenizer
    from sensray.perturbations import PERTURBATIONS
    from sensray.replica import Replica
    from sensray.space import Trial
    from sensray.spec import validate
    from sensray.tasks import TaskScorer

    spec = validate({"name": "bench", "perturbation": "ablation", "space": {},
                     "data": {"num_sequences": 16, "seq_len": 128, "batch_size": 16}})
    replica = Replica(spec)
    tokenizer = load_tokenizer(spec.model)
    text = tokenizer.decode(torch.cat([b.flatten() for b in replica.batches]).tolist())
    start = time.perf_counter()
    scorers = {t: TaskScorer(replica.model, tokenizer, [t], limit=args.limit, data_text=text) for t in TASKS}
    print(f"load the {len(TASKS)} tasks and build HFLM: {time.perf_counter() - start:.1f} s (once per replica)")
    trial = Trial("bench", "ablation", {"target": "blocks.3.mlp.down", "mode": "zero"}, 0)
    kind = PERTURBATIONS.get("ablation")
    times = {name: [] for name in ("sensray trial", *TASKS)}
    docs = {}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        start = time.perf_counter()
        replica.run_trial(trial)
        times["sensray trial"].append(time.perf_counter() - start)
        edits = kind.apply(replica.model, kind.parse(trial.params))
        try:
            for task, scorer in scorers.items():
                result = scorer.score()
                times[task].append(result.seconds)
                docs[task] = int(result.columns.get(f"{task}/n") or 0)
        finally:
            edits.restore()
    base = statistics.median(times["sensray trial"])
    print(f"\n1-minute load average: {load:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds, "
          f"{args.threads} torch thread(s)\n")
    print("| what | documents | median s per evaluation | × sensray's trial |\n|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {docs.get(name, '16 windows × 128 tokens')} | {median:.2f} | {median / base:.1f} |")


if __name__ == "__main__":
    main()
