"""Synthetic trial tables with known answers, and minimal run directories built from them.

Shared by the analysis tests (test_analyze, test_figures, test_report); no model, no sweep.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import yaml

from sensray.results import to_frame

BASELINE_PPL = 20.0
INF = math.inf


def _row(i: int, kind: str, target: str, params: dict, delta: float | None, error: str | None = None) -> dict:
    ok = error is None
    ppl = None if not ok else (INF if math.isinf(delta) else delta * BASELINE_PPL)
    return {
        "trial_id": f"{kind[:2]}{i:014x}", "kind": kind, "sample": 0, "target": target, **params,
        "ppl": ppl, "nll": None if not ok else math.log(ppl), "delta_ppl": delta if ok else None,
        "kl": None if not ok else 0.01, "top1_agreement": None if not ok else 0.9,
        "nonfinite": None if not ok else math.isinf(delta), "seconds": 0.5, "replica": f"local-{i % 2}",
        "error": error,
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


def bitflip_table(layers: int = 4, seeds: int = 4) -> pl.DataFrame:
    rows = []
    for layer in range(layers):
        for field in ("sign", "exponent_msb", "exponent", "mantissa"):
            for seed in range(seeds):
                params = {"field": field, "count": 1, "seed": seed}
                rows.append(_row(len(rows), "bitflip", f"blocks.{layer}", params, flip_delta(layer, field, seed)))
    return to_frame(rows)


def noise_table() -> pl.DataFrame:
    """ppl grows with sigma; mlp.down breaks (median > 2) at sigma 0.3, attn.q never; one failed trial."""
    rows = []
    for module, scale in (("attn.q", 0.5), ("mlp.down", 20.0)):
        for sigma in (0.01, 0.1, 0.3, 1.0):
            for seed in (0, 1):
                params = {"dist": "gaussian", "relative": True, "sigma": sigma, "seed": seed}
                delta = 1.0 + scale * sigma * sigma * (1 + 0.1 * seed)
                rows.append(_row(len(rows), "noise", f"blocks.*.{module}", params, delta))
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
                rows.append(_row(len(rows), "ablation", f"blocks.{layer}.{module}", {"mode": mode}, delta))
        rows.append(_row(len(rows), "ablation", f"blocks.{layer}", {"mode": "skip"}, 1.5))
    rows.append(_row(len(rows), "ablation", "lm_head", {"mode": "zero"}, 3.0))
    return to_frame(rows)


def write_run(root: Path, trials: pl.DataFrame, name: str = "bitflip", run_id: str = "20260101-120000-abcdef",
              dtype: str = "float32", model: str = "sensray-tiny") -> Path:
    """A run directory as the sweep leaves it: trials.parquet, baseline.json, spec.yaml."""
    path = root / name / run_id
    path.mkdir(parents=True)
    trials.write_parquet(path / "trials.parquet")
    baseline = {
        "model": model, "source": model, "dtype": dtype, "device": "cpu", "parameters": 1234,
        "tokens": 2048, "sequences": 16, "nll": math.log(BASELINE_PPL), "ppl": BASELINE_PPL,
        "checksum_at_load": "abc", "checksum_after_sweep": "abc", "versions": {"sensray": "0.1.0"},
    }
    (path / "baseline.json").write_text(json.dumps(baseline), encoding="utf-8")
    spec = {
        "name": name, "description": "synthetic", "model": {"name": model, "dtype": dtype},
        "data": {"corpus": "bundled", "seq_len": 128, "num_sequences": 16},
        "perturbation": str(trials["kind"][0]), "space": {"target": {"each": "blocks.*"}},
        "num_samples": 1, "seed": 0, "output_dir": str(root),
    }
    (path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path
