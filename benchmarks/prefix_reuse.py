"""Prefix reuse vs the full forward vs a bare loop, side by side in one process.

    python benchmarks/prefix_reuse.py                     # the table for docs/BENCHMARKS.md
    python benchmarks/prefix_reuse.py --blocks 12 --seeds 1

The study: a uniform sweep of block-level bit flips (`target: {each: "blocks.*"}`, one flip of
the exponent's top bit per trial, `--seeds` seeds per block) on a random Llama saved in HF format
(hidden 512, `--blocks` decoder blocks, the shipped tokenizer's 2048-token vocabulary), 16 x 128
eval tokens, the trials in a seeded shuffled order (so a busy stretch of the machine does not fall
on the early or the late blocks). Three ways run each trial in turn, on the same loaded model, so a
busy minute hits all three alike:

    bare     a hand-written loop: flip in place, full forward, loss, restore
    full     sensray's replica with prefix reuse off: perturb, evaluate (nll, KL, top-1), restore, verify
    reuse    the same replica with prefix reuse on (the default): blocks before the flipped one replay

The table gives the median seconds per trial, the sweep's rate relative to the bare loop (total
time), the same from per-trial ratios (mean of this way's time / bare time over trials, which a
load that drifts over the run does not skew), and `identical`
counts the trials whose metrics (nll, ppl, KL, top-1 agreement) are equal, bit for bit, with and
without reuse.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SEQ_LEN, SEQUENCES = 128, 16


def build_model(root: Path, blocks: int) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sensray.models import load_tokenizer
    from sensray.spec import ModelSpec

    config = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=blocks,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = root / f"llama-{blocks}blocks"
    model.save_pretrained(path)
    load_tokenizer(ModelSpec(name="sensray-tiny")).save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    print(f"random Llama: {blocks} blocks, {params / 1e6:.1f}M parameters", file=sys.stderr)
    return str(path)


def spec_for(model_dir: str, seeds: int):
    from sensray.spec import validate

    return validate({
        "name": "bench-prefix", "model": {"name": model_dir, "device": "cpu"},
        "data": {"corpus": "bundled", "seq_len": SEQ_LEN, "num_sequences": SEQUENCES, "batch_size": SEQUENCES},
        "perturbation": "bitflip",
        "space": {"target": {"each": "blocks.*"}, "field": "exponent_msb", "count": 1,
                  "seed": {"grid_search": list(range(seeds))}},
    })


def bare_trial(model, blocks, batch, seed: int, block: int) -> None:
    """Flip bit 30 of one random element of one random tensor of the block, forward, loss, restore."""
    rng = np.random.default_rng(seed)
    params = list(blocks[block].parameters())
    param = params[rng.integers(len(params))]
    bits = param.data.view(-1).view(torch.int32)
    i = int(rng.integers(param.numel()))
    saved = bits[i].clone()
    bits[i] ^= 1 << 30
    with torch.inference_mode():
        logits = model(input_ids=batch, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    bits[i] = saved


METRICS = ("nll", "ppl", "kl", "top1_agreement")


def run(model_dir: str, seeds: int) -> dict:
    from sensray.architectures import decoder_blocks
    from sensray.plan import make_plan
    from sensray.replica import Replica

    spec = spec_for(model_dir, seeds)
    start = time.perf_counter()
    replica = Replica(spec)
    setup = time.perf_counter() - start
    cache = replica.prefix
    trials = make_plan(spec, replica.model).trials
    random.Random(0).shuffle(trials)
    blocks = decoder_blocks(replica.model)
    batch = replica.batches[0]
    seconds = {"bare": [], "full": [], "reuse": []}
    identical = 0
    for i, trial in enumerate(trials):
        block = int(trial.params["target"].split(".")[1])
        t0 = time.perf_counter()
        bare_trial(replica.model, blocks, batch, i, block)
        t1 = time.perf_counter()
        replica.prefix = None
        full = replica.run_trial(trial)
        t2 = time.perf_counter()
        replica.prefix = cache
        reused = replica.run_trial(trial)
        t3 = time.perf_counter()
        seconds["bare"].append(t1 - t0)
        seconds["full"].append(t2 - t1)
        seconds["reuse"].append(t3 - t2)
        identical += all(full[m] == reused[m] for m in METRICS)
    return {"seconds": seconds, "identical": identical, "trials": len(trials), "cache_mb": cache.bytes / 2**20,
            "setup": setup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=16, help="decoder blocks of the random Llama (12+)")
    parser.add_argument("--seeds", type=int, default=2, help="trials per block")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(build_model(Path(tmp), args.blocks), args.seeds)
    medians = {way: statistics.median(s) for way, s in result["seconds"].items()}
    totals = {way: sum(s) for way, s in result["seconds"].items()}
    print(f"{result['trials']} trials ({args.seeds} per block, {args.blocks} blocks), {args.threads} threads; "
          f"recorded block outputs: {result['cache_mb']:.1f} MB; replica setup {result['setup']:.1f} s\n")
    print("| way | median s/trial | total s | rate vs bare (totals) | rate vs bare (per-trial ratios) "
          "| metrics identical to full |\n|---|---|---|---|---|---|")
    bare = result["seconds"]["bare"]
    for way in ("bare", "full", "reuse"):
        same = f"{result['identical']}/{result['trials']}" if way == "reuse" else ""
        relative = statistics.mean(t / b for t, b in zip(result["seconds"][way], bare))
        print(f"| {way} | {medians[way]:.3f} | {totals[way]:.1f} | {totals['bare'] / totals[way]:.2f}x "
              f"| {1 / relative:.2f}x | {same} |")


if __name__ == "__main__":
    main()
