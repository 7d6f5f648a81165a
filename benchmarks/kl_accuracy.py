"""How exact is sensray's KL? The default bit-flip study's trials, against an 80-bit reference.

    python benchmarks/kl_accuracy.py                    # all 256 trials of experiments/bitflip.yaml
    python benchmarks/kl_accuracy.py --trials 64

For every trial the perturbed model's logits are computed once, then KL(baseline || perturbed) is
taken three ways: sensray's (sensray.metrics, float64 without cancellation), the float32 formula
sensray used before (one float32 dot of p_ref and logp_ref - logp), and a reference in numpy's
longdouble (80-bit extended precision on x86: 64-bit mantissa) with the plain formula. Each way is
also run with 1 and with 2 torch threads (the Ray executor's replicas and the local executor),
to show whether the number depends on where a trial ran. Prints one table.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensray.metrics import reference, row_lse_kl  # noqa: E402
from sensray.models import load_model, load_tokenizer  # noqa: E402
from sensray.data import eval_batches  # noqa: E402
from sensray.perturbations import PERTURBATIONS  # noqa: E402
from sensray.plan import make_plan  # noqa: E402
from sensray.spec import load_spec  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "bitflip.yaml"


def float32_kl(ref_logits: list[torch.Tensor], logits: list[torch.Tensor]) -> float:
    """The formula sensray used before: one float32 dot over batch x seq x vocab per batch."""
    total, positions = 0.0, 0
    for zr, z in zip(ref_logits, logits):
        lr = F.log_softmax(zr, -1)
        lp = F.log_softmax(z, -1)
        total += float(torch.dot(lr.exp().view(-1), lp.neg_().add_(lr).view(-1)))
        positions += zr.shape[0] * zr.shape[1]
    return total / positions


def longdouble_kl(ref_logits: list[torch.Tensor], logits: list[torch.Tensor]) -> float:
    """The plain formula in 80-bit extended precision."""
    terms = []
    for zr, z in zip(ref_logits, logits):
        a = zr.reshape(-1, zr.shape[-1]).numpy().astype(np.longdouble)
        b = z.reshape(-1, z.shape[-1]).numpy().astype(np.longdouble)
        la = a - (a.max(-1, keepdims=True) + np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)))
        lb = b - (b.max(-1, keepdims=True) + np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True)))
        terms.append((np.exp(la) * (la - lb)).sum(-1))
    flat = np.concatenate(terms)
    return float(flat.sum() / len(flat))


def sensray_kl(ref, logits: list[torch.Tensor]) -> float:
    kls = [row_lse_kl(z, ref, i)[1] for i, z in enumerate(logits)]
    return math.fsum(v for kl in kls for v in kl.tolist()) / sum(len(kl) for kl in kls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=256, help="how many of the study's trials (default all 256)")
    args = parser.parse_args()
    spec = load_spec(SPEC)
    model, tokenizer = load_model(spec.model), load_tokenizer(spec.model)
    batches = eval_batches(spec.data, tokenizer)
    ref = reference(model, batches)
    trials = make_plan(spec, model).trials[: args.trials]
    rows = []
    for trial in trials:
        kind = PERTURBATIONS.get(trial.kind)
        edits = kind.apply(model, kind.parse(trial.params))
        with torch.inference_mode():
            logits = [model(input_ids=b, use_cache=False).logits.float() for b in batches]
        edits.restore()
        if not all(bool(torch.isfinite(z).all()) for z in logits):
            continue  # non-finite logits: KL is inf by definition, nothing to compare
        row = {"ref": longdouble_kl(ref.logits, logits)}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            row[f"new{threads}"] = sensray_kl(ref, logits)
            row[f"old{threads}"] = float32_kl(ref.logits, logits)
        rows.append(row)
    print(report(rows, len(trials)))
    return 0


def report(rows: list[dict], total: int) -> str:
    def rel(way: str, floor: float) -> float:
        errs = [abs(r[way] - r["ref"]) / r["ref"] for r in rows if r["ref"] > floor]
        return max(errs) if errs else math.nan

    lines = [f"{len(rows)} of {total} trials with finite logits; KL(ref) from {min(r['ref'] for r in rows):.3g} "
             f"to {max(r['ref'] for r in rows):.3g}",
             "| way | negative KLs | max rel. error (KL > 1e-6) | max rel. error (KL > 1e-10) | "
             "1 vs 2 threads: trials that differ | max rel. difference |",
             "|---|---|---|---|---|---|"]
    for way, name in (("old", "float32 dot (before)"), ("new", "sensray float64 (now)")):
        differ = [abs(r[f"{way}1"] - r[f"{way}2"]) / max(abs(r[f"{way}1"]), 1e-300) for r in rows]
        lines.append(f"| {name} | {sum(r[f'{way}1'] < 0 for r in rows)} | {rel(way + '1', 1e-6):.2g} | "
                     f"{rel(way + '1', 1e-10):.2g} | {sum(d > 0 for d in differ)} | {max(differ):.2g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
