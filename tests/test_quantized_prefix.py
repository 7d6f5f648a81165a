"""Prefix reuse on quantized replicas (int8, nf4 with double quantization): a trial resumed at its first
touched block gives exactly the full forward's metrics, and every trial restores the checksum of every
stored bit (codes, scales, tables)."""

from __future__ import annotations

import pytest

from sensray.checksum import weights_checksum
from sensray.replica import METRICS, Replica
from sensray.space import Trial, trial_id
from sensray.spec import validate

pytest.importorskip("bitsandbytes")

FORMATS = {"int8": {"quantization": "int8"}, "nf4": {"quantization": "nf4", "double_quant": True}}


def spec(model: dict, prefix: bool = True):
    return validate({
        "name": "quantized", "model": {"name": "sensray-tiny", "device": "cpu", **model},
        "data": {"corpus": "bundled", "seq_len": 64, "num_sequences": 4, "batch_size": 2},
        "perturbation": "bitflip", "space": {"target": "blocks.0", "field": "sign"}, "reuse": {"prefix": prefix},
    })


@pytest.fixture(scope="module")
def replicas():
    """Per format: (a replica with prefix reuse, one without it on the same loaded model)."""
    out = {}
    for name, model in FORMATS.items():
        reuse = Replica(spec(model))
        out[name] = reuse, Replica(spec(model, prefix=False), "full-0", model=reuse.model)
    return out


# (kind, params, the block the trial resumes at: the tied head/embedding is used before block 0)
TRIALS = [
    ("bitflip", {"target": "blocks.5", "field": "sign", "count": 3, "seed": 1}, 5),
    ("bitflip", {"target": "blocks.2.attn.q.weight", "field": "magnitude_msb", "count": 2, "seed": 0}, 2),
    ("bitflip", {"target": "blocks.6.mlp.down.weight.scale", "field": "any", "count": 2, "seed": 2}, 6),
    ("bitflip", {"target": "blocks.3", "role": "scale", "seed": 4}, 3),
    ("bitflip", {"target": "blocks.*", "role": "high", "count": 4, "seed": 5}, None),  # wherever they land
    ("zero", {"target": "blocks.4.mlp.up.weight", "pick": "top", "count": 8}, 4),
    ("ablation", {"target": "blocks.1.attn", "mode": "zero"}, 1),
    ("ablation", {"target": "blocks.7", "mode": "skip"}, 7),
    ("noise", {"target": "final_norm", "sigma": 0.5, "seed": 0}, 8),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind, params, start", TRIALS, ids=[f"{k}-{p['target']}" for k, p, _ in TRIALS])
def test_prefix_reuse_is_bit_identical_and_restore_is_exact(replicas, fmt, kind, params, start, monkeypatch):
    reuse, full = replicas[fmt]
    assert reuse.baseline == full.baseline and reuse.baseline.quantization.startswith(fmt)
    starts, start_for = [], reuse.prefix.start_for
    monkeypatch.setattr(reuse.prefix, "start_for", lambda undo: starts.append(start_for(undo)) or starts[-1])
    trial = Trial(trial_id(kind, params), kind, params, 0)
    reused = reuse.run_trial(trial)
    assert starts == [start] if start is not None else len(starts) == 1
    assert weights_checksum(reuse.model) == reuse.baseline.checksum_at_load  # every stored bit restored
    whole = full.run_trial(trial)
    assert reused["error"] is None and whole["error"] is None
    assert {m: reused[m] for m in METRICS} == {m: whole[m] for m in METRICS}  # bit-identical to the full forward
    assert reused["nonfinite"] or reused["kl"] > 0  # and the trial did change the output
