"""What one saliency pass costs: time beside the sweeps it predicts, and peak memory against the ordinary way.

    python benchmarks/saliency_pass.py                                   # both parts, the tables for docs/BENCHMARKS.md
    python benchmarks/saliency_pass.py --sweeps results/bitflip/<run> results/noise/<run> results/ablation/<run>

memory  a ~110M-parameter random Llama (fp32 weights: 455 MiB) on a short text (4 x 64 tokens), so the
        gradients, not the activations, decide the peak. Two ways, each in its own process (its own RSS):
            hooked    sensray.saliency.gradients.backward_pass: each gradient consumed by a hook and freed
            ordinary  backward, then read every param.grad (naive_gradients): a second model of gradients
        each with a consumer that does nothing (the gradients alone) and with the per-row and top-element
        scores (Taylor, -g w, g^2; the flip scores work in fixed 4M-element chunks and are left out here).
        The children run with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every large tensor by mmap and
        returns it on free, so RSS is live memory; with its default (a threshold that rises to 32 MiB as
        tensors are freed) freed gradients stay in the heap and the high-water mark measures the allocator.
time    the shipped model on its 16 x 128-token eval text: the gradient pass and the Fisher window passes,
        against the summed trial seconds of finished sweeps of the same text (--sweeps), or a measured
        trial time x the trial counts of the shipped bitflip, noise and ablation studies.
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

import torch

LLAMA_110M = dict(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
                  tie_word_embeddings=False)
SHIPPED_TRIALS = {"bitflip": 256, "noise": 105, "ablation": 112}


def memory_way(model_dir: str, way: str, consumer: str) -> dict:
    """Runs in a child process: peak RSS above what the loaded model and text hold."""
    from transformers import AutoModelForCausalLM

    from sensray.saliency.gradients import backward_pass, naive_gradients
    from sensray.saliency.memory import PeakMemory
    from sensray.saliency.scores import Scores

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batches = [torch.randint(0, 8000, (4, 64), generator=torch.Generator().manual_seed(0))]
    scores = Scores(model, top_k=16, fields=())
    consume = scores.gradient if consumer == "scores" else (lambda name, weight, grad: None)
    start = time.perf_counter()
    with PeakMemory("cpu") as memory:
        if way == "hooked":
            backward_pass(model, batches, consume)
        else:
            for name, grad in naive_gradients(model, batches).items():
                consume(name, model.get_parameter(name).detach(), grad)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"way": way, "consumer": consumer, "above_MiB": memory.above / 2**20, "weights_MiB": weights / 2**20,
            "seconds": time.perf_counter() - start, "how": memory.how}


def memory_table() -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA_110M)).save_pretrained(tmp)
        out = []
        for consumer in ("none", "scores"):
            for way in ("hooked", "ordinary"):
                child = subprocess.run([sys.executable, __file__, "--child", tmp, way, consumer], capture_output=True,
                                       text=True, check=True, env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"})
                out.append(json.loads(child.stdout.strip().splitlines()[-1]))
        return out


def time_table(sweeps: list[str]) -> dict:
    from sensray.data import eval_batches
    from sensray.models import load_model, load_tokenizer
    from sensray.saliency.measure import measure
    from sensray.spec import DataSpec, ModelSpec

    torch.set_num_threads(1)
    spec, data = ModelSpec(), DataSpec(corpus="bundled", seq_len=128, num_sequences=16, batch_size=16)
    model, batches = load_model(spec), eval_batches(data, load_tokenizer(spec))
    measured = measure(model, batches, top_k=16)
    return {"gradient_s": measured.gradient_seconds, "fisher_s": measured.fisher_seconds,
            "forward_s": _forward_seconds(model, batches), "sweeps": _sweep_seconds(sweeps)}


def _forward_seconds(model, batches) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    return time.perf_counter() - start


def _sweep_seconds(sweeps: list[str]) -> dict:
    import polars as pl
    import yaml

    out = {}
    for path in sweeps:
        spec = yaml.safe_load((Path(path) / "spec.yaml").read_text())
        trials = pl.read_parquet(Path(path) / "trials.parquet")
        out[spec["perturbation"]] = {"trials": len(trials), "seconds": float(trials["seconds"].sum())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", nargs="*", default=[], help="finished sweep run directories of the shipped model")
    parser.add_argument("--child", nargs=3, metavar=("MODEL_DIR", "WAY", "CONSUMER"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true", help="only the time table")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_way(*args.child)))
        return
    if not args.skip_memory:
        print("peak memory of one gradient pass, ~110M-parameter Llama, fp32, 4 x 64 tokens")
        for row in memory_table():
            print(f"  {row['way']:<9} consumer {row['consumer']:<7} +{row['above_MiB']:7.1f} MiB above the loaded "
                  f"model (weights {row['weights_MiB']:.0f} MiB), {row['seconds']:.1f} s  [{row['how']}]")
    t = time_table(args.sweeps)
    print("\nshipped model, 16 x 128 tokens (1 torch thread)")
    print(f"  one eval forward {t['forward_s']:.2f} s; gradient pass {t['gradient_s']:.2f} s; "
          f"16 Fisher window passes {t['fisher_s']:.2f} s")
    for kind, sweep in t["sweeps"].items():
        print(f"  {kind} sweep: {sweep['trials']} trials, {sweep['seconds']:.0f} s of trials -> the saliency pass is "
              f"{sweep['seconds'] / (t['gradient_s'] + t['fisher_s']):.0f}x cheaper")


if __name__ == "__main__":
    main()
