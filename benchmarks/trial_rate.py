"""Trial rate of the same bit-flip sweep run three ways, and the peak memory of each.

    python benchmarks/trial_rate.py                       # both models, the table for docs/BENCHMARKS.md
    python benchmarks/trial_rate.py --models tiny --trials 20

    bare     a hand-written torch loop: load once; per trial flip in place, forward, loss, restore
    sensray  sensray's replica (what the local executor runs): perturb, evaluate nll/ppl/KL/top-1, restore, verify
    reload   what per-trial model copies amount to (the seed framework, PyTorchFI's deepcopy):
             from_pretrained from disk for every trial, then flip, forward, loss

Each (model, way) runs in its own process, so its peak RSS is its own; the ways alternate over
`--rounds` rounds and the table shows the median of each. Models: the shipped
tiny Llama, and a ~40M-parameter random Llama saved to a temp dir in HF format.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SEQ_LEN, SEQUENCES = 128, 16
LLAMA_40M = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=10,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False)


def spec_for(model_dir: str):
    from sensray.spec import validate

    return validate({
        "name": "bench", "model": {"name": model_dir, "device": "cpu"},
        "data": {"corpus": "bundled", "seq_len": SEQ_LEN, "num_sequences": SEQUENCES, "batch_size": SEQUENCES},
        "perturbation": "bitflip",
        "space": {"target": {"each": "blocks.*"}, "field": "exponent_msb", "count": 1, "seed": {"grid_search": list(range(64))}},
    })


def tokens() -> torch.Tensor:
    from sensray.data import eval_batches
    from sensray.models import load_tokenizer

    spec = spec_for("sensray-tiny")
    return eval_batches(spec.data, load_tokenizer(spec.model))[0]


def way_bare(model_dir: str, trials: int) -> float:
    """The floor: nothing but flip, forward, loss, restore."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tokens()
    blocks = model.model.layers
    start = time.perf_counter()
    for t in range(trials):
        rng = np.random.default_rng(t)
        params = [p for p in blocks[t % len(blocks)].parameters()]
        p = params[rng.integers(len(params))]
        i = int(rng.integers(p.numel()))
        bits = p.data.view(-1).view(torch.int32)
        saved = bits[i].clone()
        bits[i] ^= 1 << 30
        with torch.inference_mode():
            logits = model(input_ids=batch, use_cache=False).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        bits[i] = saved
    return time.perf_counter() - start


def way_sensray(model_dir: str, trials: int) -> float:
    from sensray.plan import make_plan
    from sensray.replica import Replica

    spec = spec_for(model_dir)
    replica = Replica(spec)
    plan = make_plan(spec, replica.model)
    start = time.perf_counter()
    for trial in plan.trials[:trials]:
        replica.run_trial(trial)
    return time.perf_counter() - start


def way_reload(model_dir: str, trials: int) -> float:
    from transformers import AutoModelForCausalLM

    batch = tokens()
    start = time.perf_counter()
    for t in range(trials):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        weight = model.model.layers[t % len(model.model.layers)].mlp.down_proj.weight
        weight.data.view(-1).view(torch.int32)[t] ^= 1 << 30
        with torch.inference_mode():
            logits = model(input_ids=batch, use_cache=False).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    return time.perf_counter() - start


WAYS = {"bare": way_bare, "sensray": way_sensray, "reload": way_reload}


def worker(way: str, model_dir: str, trials: int) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
    seconds = WAYS[way](model_dir, trials)
    peak_mb = peak_rss_mb()
    print(json.dumps({"rate": trials / seconds, "peak_mb": peak_mb}))


def in_process_ab(model_dir: str, pairs: int) -> tuple[float, float]:
    """Alternate one bare trial and one sensray trial on the same loaded model: the same machine state
    for both, so the ratio survives a busy machine. Median seconds per trial of each."""
    import torch.nn.functional as F

    from sensray.plan import make_plan
    from sensray.replica import Replica

    spec = spec_for(model_dir)
    replica = Replica(spec)
    trials = make_plan(spec, replica.model).trials
    batch = replica.batches[0]
    bare, ours = [], []
    for i in range(pairs):
        start = time.perf_counter()
        with torch.inference_mode():  # the bare loop's forward + loss (its flip/restore cost microseconds)
            logits = replica.model(input_ids=batch, use_cache=False).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        replica.run_trial(trials[i])
        ours.append(time.perf_counter() - start)
    return statistics.median(bare), statistics.median(ours)


def peak_rss_mb() -> float:
    """This process's RSS high-water mark. (ru_maxrss would include the parent's: Linux keeps it across exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(way: str, model_dir: str, trials: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", way, model_dir, str(trials)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(model_dir: str, args) -> dict:
    """Rounds of (bare, sensray, reload), medians per way: a busy or throttled minute hits all three alike."""
    rounds = {w: [] for w in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            rounds[way].append(measure(way, model_dir, args.reload_trials if way == "reload" else args.trials))
    return {w: {k: statistics.median(r[k] for r in rs) for k in ("rate", "peak_mb")} for w, rs in rounds.items()}


def build_40m(root: Path) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sensray.models import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_40M))
    model.save_pretrained(root / "llama-40m")
    tokenizer = load_tokenizer(spec_for("sensray-tiny").model)  # ids < 2048 are valid for vocab 8000
    tokenizer.save_pretrained(root / "llama-40m")
    params = sum(p.numel() for p in model.parameters())
    print(f"built random Llama with {params / 1e6:.1f}M parameters", file=sys.stderr)
    return str(root / "llama-40m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,llama-40m")
    parser.add_argument("--trials", type=int, default=64, help="trials for bare and sensray")
    parser.add_argument("--reload-trials", type=int, default=8, help="trials for reload (slow)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    parser.add_argument("--ab", type=int, metavar="PAIRS", help="only the in-process A/B of bare vs sensray")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        way, model_dir, trials = args.worker
        return worker(way, model_dir, int(trials))
    from sensray.models import BUNDLED_MODEL

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"tiny": str(BUNDLED_MODEL)}
        if "llama-40m" in args.models:
            dirs["llama-40m"] = build_40m(Path(tmp))
        if args.ab:
            print("| model | bare s/trial | sensray s/trial | sensray rate / bare rate |\n|---|---|---|---|")
            for name in args.models.split(","):
                bare, ours = in_process_ab(dirs[name], args.ab)
                print(f"| {name} | {bare:.3f} | {ours:.3f} | {bare / ours:.3f} |", flush=True)
            return
        print(f"| model | way | trials/s | vs bare | peak RSS (MB) | vs bare |\n|---|---|---|---|---|---|")
        for name in args.models.split(","):
            results = interleaved(dirs[name], args)
            for way, r in results.items():
                print(f"| {name} | {way} | {r['rate']:.2f} | {r['rate'] / results['bare']['rate']:.3f} | "
                      f"{r['peak_mb']:.0f} | {r['peak_mb'] / results['bare']['peak_mb']:.2f} |", flush=True)
            print(f"| {name} | sensray / reload | {results['sensray']['rate'] / results['reload']['rate']:.1f}x | | | |")


if __name__ == "__main__":
    main()
