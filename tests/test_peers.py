"""benchmarks/peers.py: every way writes the same bits into the same element and scores the same.

The timed comparison is in docs/BENCHMARKS.md; these run each way in-process on a few trials with a
small eval set. PyTorchFI and nnsight are the `peers` extra, not in the dev environment: their tests
run where they are installed (`pip install -e '.[peers,dev]'`) and are skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
SMALL = ["data.seq_len=32", "data.num_sequences=2", "data.batch_size=2"]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("peers", None)


@pytest.fixture
def small(peers, monkeypatch):
    """peers.study_spec with a 2 x 32-token eval set; the shipped model's directory."""
    from sensray.models import BUNDLED_MODEL
    from sensray.spec import load_spec

    def study_spec(model_dir, reuse=True):
        return load_spec(peers.REPO / "experiments" / "bitflip.yaml",
                         [f"model.name={model_dir}", f"reuse.prefix={str(reuse).lower()}", *SMALL])

    monkeypatch.setattr(peers, "study_spec", study_spec)
    return str(BUNDLED_MODEL)


def sensray_rows(peers, model_dir, count=4):
    trials = peers.study_trials(model_dir, count)
    rows, _ = peers.fi_sensray(model_dir, trials)
    return trials, rows, {r["trial_id"]: r["changes"][0] for r in rows}


def test_reload_per_trial_matches_sensray_row_for_row(peers, small):
    trials, rows, positions = sensray_rows(peers, small)
    assert len({(p["tensor"], tuple(p["coords"])) for p in positions.values()}) == len(trials)  # distinct elements
    reloaded, _ = peers.fi_reload(small, trials, positions)
    assert peers.compare(rows, reloaded) == (len(trials), len(trials), [])


def test_compare_names_a_row_that_differs_and_counts_wrong_bits(peers):
    ref = [{"trial_id": "a", "nll": 1.0, "ppl": math.nan, "kl": 0.0, "top1_agreement": 1.0, "nonfinite": False},
           {"trial_id": "b", "nll": 2.0, "ppl": 7.0, "kl": 0.1, "top1_agreement": 0.5, "nonfinite": False}]
    other = [ref[0] | {"bits_ok": True}, ref[1] | {"kl": 0.10000001, "bits_ok": False}]
    assert peers.compare(ref, other) == (1, 1, ["b"])  # NaN equals NaN; a last-digit difference does not pass


def test_value_of_and_bits_at_round_trip_a_float32_pattern(peers):
    import torch

    t = torch.zeros(2, 3)
    for bits in (0x3F800000, 0xC0490FDB, 0x7F800000, 0x00000001):  # 1.0, -pi, inf, the smallest subnormal
        t[1, 2] = peers.value_of(bits, torch.float32)
        assert peers.bits_at(t, (1, 2)) == bits
    with pytest.raises(ValueError, match="float32"):
        peers.value_of(0, torch.bfloat16)


def test_pytorchfi_injects_the_same_element_with_identical_metrics(peers, small):
    pytest.importorskip("pytorchfi")
    trials, rows, positions = sensray_rows(peers, small)
    injected, _ = peers.fi_pytorchfi(small, trials, positions)
    assert peers.compare(rows, injected) == (len(trials), len(trials), [])


def test_nnsight_skip_of_each_block_matches_sensray_skip(peers, small):
    pytest.importorskip("nnsight")
    trials = peers.skip_trials(blocks=8, repeats=1)
    ours, _ = peers.skip_sensray(small, trials, reuse=False)
    theirs, _ = peers.skip_nnsight(small, trials)
    assert peers.compare(ours, theirs)[0] == len(trials)
    assert len({r["nll"] for r in ours}) == len(trials)  # eight different blocks skipped, eight scores
