"""Synthetic trial tables with known answers, and minimal run directories built from them.

Shared by the analysis tests (test_analyze, test_figures, test_report, test_report_browser); no
model, no sweep. Rows carry what a sweep writes: provenance (tensor, element, bit, old -> new;
the touched tensors), per-sequence NLLs consistent with the row's perplexity, and both agreement
metrics; the baseline carries its own per-sequence NLLs and the vocabulary size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from sensray.results import to_frame

BASELINE_PPL = 20.0
VOCAB = 2048  # the uniform-output ceiling: ppl 2048, x102.4 the baseline
INF = math.inf
SEQUENCES = 8
# Per-sequence NLLs whose mean is log(BASELINE_PPL): sequences differ, as real text does.
BASE_SEQ = (math.log(BASELINE_PPL) + np.linspace(-0.3, 0.3, SEQUENCES)).tolist()
MATRICES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
SHAPES = {"attn.q": (128, 128), "attn.k": (32, 128), "attn.v": (32, 128), "attn.o": (128, 128),
          "mlp.gate": (384, 128), "mlp.up": (384, 128), "mlp.down": (128, 384)}


def seq_nll(delta: float, wobble: float = 0.0) -> list[float] | None:
    """Per-sequence NLLs of a trial whose ppl is `delta` x the baseline; `wobble` moves sequences apart
    (in opposite directions, so the mean, and delta, are unchanged)."""
    if math.isinf(delta):
        return None
    shift = np.linspace(-wobble, wobble, SEQUENCES)
    return [b + math.log(delta) + s for b, s in zip(BASE_SEQ, shift)]


def _row(i: int, kind: str, target: str, params: dict, delta: float | None, error: str | None = None,
         top1: float = 0.9, changed: dict | None = None, wobble: float = 0.0) -> dict:
    ok = error is None
    ppl = None if not ok else (INF if math.isinf(delta) else delta * BASELINE_PPL)
    return {
        "trial_id": f"{kind[:2]}{i:014x}", "kind": kind, "sample": 0, "target": target, **params,
        **(changed or {}),
        "ppl": ppl, "nll": None if not ok else math.log(ppl), "delta_ppl": delta if ok else None,
        "kl": None if not ok else (INF if math.isinf(delta) else 0.01 * math.log(delta) ** 2 + 1e-6),
        "top1_agreement": None if not ok else top1,
        "nonfinite": None if not ok else math.isinf(delta), "seq_nll": seq_nll(delta, wobble) if ok else None,
        "seconds": 0.5, "replica": f"local-{i % 2}", "error": error,
    }


def flip_delta(layer: int, field: str, seed: int) -> float:
    """The known answer: mantissa never matters, sign a little, exponent more in deeper layers,
    exponent_msb is catastrophic everywhere and non-finite for seeds 0-1 of layer 0."""
    if field == "mantissa":
        return 1.0
    if field == "sign":
        return 1.0 + 0.001 * (seed + 1)
    if field == "exponent":
        return 1.0 + 0.1 * layer + 0.01 * seed
    return INF if layer == 0 and seed < 2 else 10.0 ** (4 - layer) + seed


FLIPPED = {"sign": lambda seed: 31, "exponent_msb": lambda seed: 30, "mantissa": lambda seed: 5 + seed,
           "exponent": lambda seed: 30 if seed == 0 else 23 + seed}  # seed 0 of `exponent` hits the MSB


def element(layer: int, seed: int, bit: int, old: float = 0.02) -> dict:
    """Provenance of one flipped element: the matrix cycles with the seed, the element with the layer."""
    matrix = MATRICES[seed % len(MATRICES)]
    tensor, shape = f"blocks.{layer}.{matrix}.weight", SHAPES[matrix]
    coords = [layer + seed, 3 * seed + 1]
    index = coords[0] * shape[1] + coords[1]
    new = -old if bit == 31 else old * 2.0 ** (128 if bit == 30 else 1)
    change = {"tensor": tensor, "index": index, "coords": coords, "bit": bit, "old": old, "new": new,
              "old_bits": 0, "new_bits": 1 << bit}
    touched = {"tensor": tensor, "how": "elements", "numel": shape[0] * shape[1], "changed": 1,
               "fraction_changed": 1 / (shape[0] * shape[1]), "rel_norm": None, "sparsity": None}
    return {"tensor": tensor, "index": index, "flipped_bit": bit, "old": old, "new": new, "elements_changed": 1,
            "changes": [change], "bit_counts": [{"bit": bit, "count": 1}], "tensors": [touched]}


def bitflip_table(layers: int = 4, seeds: int = 4) -> pl.DataFrame:
    rows = []
    for layer in range(layers):
        for field in ("sign", "exponent_msb", "exponent", "mantissa"):
            for seed in range(seeds):
                params = {"field": field, "count": 1, "seed": seed}
                delta = flip_delta(layer, field, seed)
                top1 = 0.0 if delta > 100 else (0.999 if field == "sign" else 1.0 if field == "mantissa" else 0.98)
                rows.append(_row(len(rows), "bitflip", f"blocks.{layer}", params, delta, top1=top1,
                                 changed=element(layer, seed, FLIPPED[field](seed)), wobble=0.002))
    return to_frame(rows)


def whole(tensors: list[str], rel: float | None = None, sparsity: float | None = None) -> dict:
    """Provenance of a trial that overwrote whole tensors (noise, ablation, pruning)."""
    touched = [{"tensor": t, "how": "tensor", "numel": 16384, "changed": 16384 if sparsity is None else int(
        16384 * sparsity), "fraction_changed": 1.0 if sparsity is None else sparsity, "rel_norm": rel,
                "sparsity": sparsity} for t in tensors]
    return {"tensor": tensors[0] if len(tensors) == 1 else None, "elements_changed": sum(t["changed"] for t in touched),
            "tensors": touched}


def noise_table() -> pl.DataFrame:
    """ppl grows with sigma; mlp.down breaks (median > 2) at sigma 0.3, attn.q never; one failed trial.
    Top-1 agreement falls with sigma faster than perplexity rises."""
    rows = []
    for module, scale in (("attn.q", 0.5), ("mlp.down", 20.0)):
        for sigma in (0.01, 0.1, 0.3, 1.0):
            for seed in (0, 1):
                params = {"dist": "gaussian", "relative": True, "sigma": sigma, "seed": seed}
                delta = 1.0 + scale * sigma * sigma * (1 + 0.1 * seed)
                tensors = [f"blocks.{layer}.{module}.weight" for layer in range(2)]
                rows.append(_row(len(rows), "noise", f"blocks.*.{module}", params, delta, top1=1 - 0.6 * sigma,
                                 changed=whole(tensors, rel=sigma), wobble=0.05 if sigma < 0.05 else 0.0))
    rows.append(_row(len(rows), "noise", "blocks.*.attn.q", {"dist": "gaussian", "relative": True, "sigma": 1.0,
                                                            "seed": 2}, None, error="RuntimeError: out of memory"))
    return to_frame(rows)


def ablation_table(layers: int = 3) -> pl.DataFrame:
    """Zeroing mlp.down of layer 0 is non-finite; mean is harmless; skipping a block costs 1.5x."""
    rows = []
    for layer in range(layers):
        for module in ("attn.q", "attn.o", "mlp.up", "mlp.down"):
            for mode in ("zero", "mean"):
                broken = layer == 0 and module == "mlp.down" and mode == "zero"
                delta = INF if broken else (1.0 + 0.05 * layer if mode == "zero" else 1.001)
                target = f"blocks.{layer}.{module}"
                rows.append(_row(len(rows), "ablation", target, {"mode": mode}, delta, top1=0.95,
                                 changed=whole([target + ".weight"], rel=1.0), wobble=0.01))
        rows.append(_row(len(rows), "ablation", f"blocks.{layer}", {"mode": "skip"}, 1.5, top1=0.7))
    rows.append(_row(len(rows), "ablation", "lm_head", {"mode": "zero"}, 3.0, top1=0.2,
                     changed=whole(["lm_head.weight"], rel=1.0)))
    return to_frame(rows)


def prune_delta(method: str, scope: str, sparsity: float) -> float:
    """The known answer: wanda (row) degrades slowest; every method passes 2x by sparsity 0.8."""
    rate = {"wanda": 1.0, "magnitude": 1.6}[method] * (1.0 if scope == "row" else 1.3)
    return math.exp(rate * sparsity ** 3 * 4)


def prune_table() -> pl.DataFrame:
    rows = []
    for method in ("magnitude", "wanda"):
        for scope in ("tensor", "row"):
            for sparsity in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8):
                delta = prune_delta(method, scope, sparsity)
                params = {"method": method, "scope": scope, "sparsity": sparsity, "calibration": "bundled-train"}
                achieved = sparsity + (0.001 if scope == "row" else 0.0)
                tensors = [f"blocks.{layer}.mlp.up.weight" for layer in range(2)]
                rows.append(_row(len(rows), "prune", "blocks.*", params, delta, top1=1 - 0.8 * sparsity ** 1.5,
                                 changed=whole(tensors, sparsity=achieved), wobble=0.01))
    return to_frame(rows)


def write_run(root: Path, trials: pl.DataFrame, name: str = "bitflip", run_id: str = "20260101-120000-abcdef",
              dtype: str = "float32", model: str = "sensray-tiny", recorded: bool = True) -> Path:
    """A run directory as the sweep leaves it: trials.parquet, baseline.json, spec.yaml. `recorded=False`
    writes the baseline of a run from before per-sequence NLLs, versions and the command were recorded."""
    path = root / name / run_id
    path.mkdir(parents=True)
    trials.write_parquet(path / "trials.parquet")
    baseline = {
        "model": model, "source": model, "dtype": dtype, "device": "cpu", "parameters": 1234,
        "tokens": 2048, "sequences": SEQUENCES, "nll": math.log(BASELINE_PPL), "ppl": BASELINE_PPL,
        "checksum_at_load": "abc", "checksum_after_sweep": "abc", "versions": {"sensray": "0.1.0"},
    }
    if recorded:
        baseline |= {"vocab_size": VOCAB, "seq_nll": BASE_SEQ, "command": f"sensray sweep experiments/{name}.yaml",
                     "versions": {"sensray": "0.1.0", "sensray_commit": "0123abc", "torch": "2.13.0"}}
    (path / "baseline.json").write_text(json.dumps(baseline), encoding="utf-8")
    spec = {
        "name": name, "description": f"synthetic {name} study", "model": {"name": model, "dtype": dtype},
        "data": {"corpus": "bundled", "seq_len": 128, "num_sequences": SEQUENCES},
        "perturbation": str(trials["kind"][0]), "space": {"target": {"each": "blocks.*"}},
        "num_samples": 1, "seed": 0, "output_dir": str(root),
    }
    (path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path
