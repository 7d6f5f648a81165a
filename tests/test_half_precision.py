"""Half precision on the shipped model: what every 7B experiment runs (bf16), checked on the CPU.

The baseline and the trial metrics stay finite and close to float32; prefix reuse stays
bit-identical to the full forward; every kind restores the weights bit-exactly (the checksum of
every parameter's bytes); and a whole sweep runs in bfloat16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
import torch

from sensray.checksum import weights_checksum
from sensray.replica import METRICS, Replica
from sensray.space import Trial, trial_id
from sensray.spec import validate

REPO = Path(__file__).resolve().parents[1]
HALF = ("bfloat16", "float16")
# Measured on this data: ppl 36.03 in float32, bf16 -0.1%, fp16 +0.01%; bounds with ample margin.
PPL_TOLERANCE = {"bfloat16": 0.03, "float16": 0.005}

def spec(dtype: str, prefix: bool = True):
    return validate({
        "name": "half", "model": {"name": "sensray-tiny", "dtype": dtype, "device": "cpu"},
        "data": {"corpus": "bundled", "seq_len": 64, "num_sequences": 4, "batch_size": 2},
        "perturbation": "noise", "space": {"target": "blocks.0", "sigma": 0.0}, "reuse": {"prefix": prefix},
    })


def trial(kind: str, params: dict) -> Trial:
    return Trial(trial_id(kind, params), kind, params, 0)


@pytest.fixture(scope="module")
def replicas():
    """Per dtype: (a replica with prefix reuse, one without it on the same loaded model)."""
    out = {}
    for dtype in ("float32", *HALF):
        reuse = Replica(spec(dtype))
        out[dtype] = reuse, Replica(spec(dtype, prefix=False), "full-0", model=reuse.model)
    return out


# -- metrics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_the_model_is_loaded_in_the_dtype_and_its_baseline_is_close_to_float32(replicas, dtype):
    half, _ = replicas[dtype]
    full, _ = replicas["float32"]
    assert {p.dtype for p in half.model.parameters()} == {getattr(torch, dtype)}
    assert half.baseline.dtype == dtype and half.baseline.tokens == full.baseline.tokens == 4 * 63
    assert math.isfinite(half.baseline.ppl) and half.baseline.ppl != full.baseline.ppl  # really another dtype
    assert half.baseline.ppl == pytest.approx(full.baseline.ppl, rel=PPL_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_an_unperturbed_trial_reproduces_the_baseline_exactly(replicas, dtype):
    """sigma 0 leaves every bit in place: the trial's forward (resumed at block 3) must agree with the
    reference to the last bit, or every small effect in a bf16 study would be noise."""
    half, _ = replicas[dtype]
    row = half.run_trial(trial("noise", {"target": "blocks.3.mlp.down", "sigma": 0.0, "seed": 0}))
    assert (row["delta_ppl"], row["kl"], row["top1_agreement"], row["nonfinite"]) == (1.0, 0.0, 1.0, False)


MODERATE = [  # effects large enough to measure, small enough to stay finite in every dtype
    ("noise", {"target": "blocks.2.mlp.*", "sigma": 1.0, "seed": 1}),
    ("ablation", {"target": "blocks.5.attn.o", "mode": "zero"}),
    ("ablation", {"target": "blocks.6", "mode": "skip"}),
    ("prune", {"target": "blocks.4", "method": "magnitude", "sparsity": 0.5}),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind, params", MODERATE, ids=lambda v: v if isinstance(v, str) else v["target"])
def test_trial_metrics_are_finite_and_close_to_float32(replicas, dtype, kind, params):
    half, _ = replicas[dtype]
    full, _ = replicas["float32"]
    got, want = half.run_trial(trial(kind, params)), full.run_trial(trial(kind, params))
    assert got["error"] is None and not got["nonfinite"]
    assert all(math.isfinite(got[m]) for m in ("ppl", "nll", "delta_ppl", "kl", "top1_agreement"))
    # Measured: each effect within 10% of float32's (ppl change and KL), top-1 within 0.016.
    assert want["delta_ppl"] > 1.003 and want["kl"] > 0.005  # the trial does something measurable...
    assert got["delta_ppl"] - 1 == pytest.approx(want["delta_ppl"] - 1, rel=0.25)  # ...and half precision sees it
    assert got["kl"] == pytest.approx(want["kl"], rel=0.1)
    assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=0.03)


# -- prefix reuse and restore, for every kind --------------------------------------------------------

# (kind, params, the block the trial resumes at: 8 = only the final norm and the head rerun; the
# shipped model ties lm_head to the embedding, used before block 0, so an embedding trial runs in full)
EVERY_KIND = [
    ("bitflip", {"target": "blocks.5", "field": "exponent", "count": 3, "seed": 1}, 5),
    ("bitflip", {"target": "blocks.2.attn.q", "bit": 14, "count": 2, "seed": 0}, 2),  # the exponent's MSB
    ("bitflip", {"target": "blocks.6.mlp.*", "field": "mantissa", "count": 20, "seed": 2}, 6),
    ("noise", {"target": "blocks.6.mlp.*", "sigma": 0.3, "seed": 0}, 6),
    ("noise", {"target": "final_norm", "sigma": 0.5, "seed": 0}, 8),
    ("noise", {"target": "lm_head", "sigma": 0.1, "seed": 0}, 0),
    ("ablation", {"target": "blocks.4.mlp.up", "mode": "zero"}, 4),
    ("ablation", {"target": "blocks.3.attn", "mode": "mean"}, 3),
    ("ablation", {"target": "blocks.7", "mode": "skip"}, 7),
    ("prune", {"target": "blocks.1", "method": "magnitude", "sparsity": 0.5}, 1),
    ("prune", {"target": "blocks.4", "method": "wanda", "pattern": "2:4", "calib_sequences": 4,
               "calib_seq_len": 64}, 4),
    ("zero", {"target": "blocks.6.mlp.down.weight", "pick": "top", "count": 4}, 6),
    ("zero", {"target": "blocks.2.attn.v.weight", "pick": "random", "count": 50, "seed": 1}, 2),
]


def metrics(row: dict) -> dict:
    return {m: row[m] for m in METRICS}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind, params, start", EVERY_KIND,
                         ids=[f"{k}-{p['target']}-{p.get('mode', p.get('method', ''))}" for k, p, _ in EVERY_KIND])
def test_prefix_reuse_is_bit_identical_and_restore_is_exact(replicas, dtype, kind, params, start, monkeypatch):
    reuse, full = replicas[dtype]
    assert reuse.baseline == full.baseline  # same model, same batches: the comparison is like with like
    starts, start_for = [], reuse.prefix.start_for
    monkeypatch.setattr(reuse.prefix, "start_for", lambda undo: starts.append(start_for(undo)) or starts[-1])
    reused = reuse.run_trial(trial(kind, params))
    assert starts == [start]  # the trial did resume where its first touched block says
    assert weights_checksum(reuse.model) == reuse.baseline.checksum_at_load  # restored, every bit
    whole = full.run_trial(trial(kind, params))
    assert weights_checksum(full.model) == full.baseline.checksum_at_load
    assert reused["error"] is None and whole["error"] is None
    assert metrics(reused) == metrics(whole), (kind, params)  # bit-identical to the full forward
    assert reused["nonfinite"] or reused["kl"] > 0  # and the perturbation did change the output


# -- a whole sweep ---------------------------------------------------------------------------------


def test_a_bitflip_sweep_in_bfloat16_end_to_end(tmp_path, capsys):
    from sensray.sweep import main

    assert main([str(REPO / "experiments" / "bitflip.yaml"), "--executor", "local",
                 "--set", "model.dtype=bfloat16", "--set", f"output_dir={tmp_path}",
                 "--set", "data={corpus: bundled, seq_len: 64, num_sequences: 4, batch_size: 4}",
                 "--set", "space.target={each: 'blocks.0,3,7'}", "--set", "space.seed={grid_search: [0, 1]}"]) == 0
    out = capsys.readouterr()
    run = Path(out.out.strip().splitlines()[-1])
    baseline = json.loads((run / "baseline.json").read_text())
    assert baseline["dtype"] == "bfloat16" and math.isfinite(baseline["ppl"])
    assert baseline["checksum_at_load"] == baseline["checksum_after_sweep"]
    table = pl.read_parquet(run / "trials.parquet")
    assert table.height == 3 * 4 * 2 and table["error"].is_null().all()
    assert set(table["target"]) == {"blocks.0", "blocks.3", "blocks.7"}
    mantissa = table.filter(pl.col("field") == "mantissa")
    assert (mantissa["delta_ppl"] - 1).abs().max() < 0.05 and not mantissa["nonfinite"].any()
    msb = table.filter(pl.col("field") == "exponent_msb")
    assert (msb["nonfinite"] | (msb["delta_ppl"] > 1.5)).any()  # bf16 keeps fp32's exponent: a flip there is ruin
    assert "bfloat16" in out.err and "trials/s" in out.err
