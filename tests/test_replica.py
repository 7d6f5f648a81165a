"""The replica on its own: rows, non-finite results, failing trials, restore checks, no Ray imported."""

import math
import subprocess
import sys

import pytest

from sensray.errors import RestoreError
from sensray.plan import make_plan
from sensray.replica import Replica
from sensray.spec import validate


def spec(space, kind="bitflip", **data):
    return validate({"name": "r", "perturbation": kind, "space": space,
                     "data": {"seq_len": 32, "num_sequences": 4, "batch_size": 2, **data}})


@pytest.fixture(scope="module")
def replica():
    return Replica(spec({"target": "blocks.0", "bit": 30}))


def trials(replica, space, kind="bitflip"):
    s = spec(space, kind)
    return make_plan(s, replica.model).trials


def test_baseline_is_measured_once(replica):
    assert replica.baseline.tokens == 4 * 31 and 1 < replica.baseline.ppl < 200
    assert len(replica.batches) == 2


def test_rows_carry_config_and_metrics(replica):
    trial = trials(replica, {"target": "blocks.3.mlp.down", "field": "sign", "count": 3, "seed": 1})[0]
    row = replica.run_trial(trial)
    assert row["trial_id"] == trial.trial_id and row["target"] == "blocks.3.mlp.down" and row["field"] == "sign"
    assert row["error"] is None and row["replica"] == "local-0" and row["seconds"] > 0
    assert row["delta_ppl"] == pytest.approx(row["ppl"] / replica.baseline.ppl)
    assert 0 <= row["top1_agreement"] <= 1 and row["kl"] >= 0


def test_unperturbed_trial_matches_the_baseline(replica):
    row = replica.run_trial(trials(replica, {"target": "blocks.0.mlp.down", "sigma": 0.0}, "noise")[0])
    assert row["delta_ppl"] == 1.0 and row["kl"] == 0.0 and row["top1_agreement"] == 1.0


def test_nonfinite_results_are_rows(replica):
    trial = trials(replica, {"target": "embed", "field": "exponent_msb", "count": 2000, "seed": 0})[0]
    row = replica.run_trial(trial)
    assert row["nonfinite"] is True and row["ppl"] == math.inf and row["error"] is None
    assert replica.checksum() == replica.baseline.checksum_at_load


def test_failing_trial_is_recorded_and_weights_restored(replica, monkeypatch):
    import sensray.replica as module

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(module, "evaluate", out_of_memory)
    row = replica.run_trial(trials(replica, {"target": "blocks.1", "mode": "zero"}, "ablation")[0])
    assert row["error"].startswith("RuntimeError: CUDA out of memory") and row["ppl"] is None
    assert replica.checksum() == replica.baseline.checksum_at_load


def test_a_restore_that_does_not_verify_stops_the_sweep(replica, monkeypatch):
    from sensray.perturbations.edits import TensorEdit

    monkeypatch.setattr(TensorEdit, "restore", lambda self: None)
    with pytest.raises(RestoreError, match=r"^trial [0-9a-f]{16}: weights differ from their originals after restore$"):
        replica.run_trial(trials(replica, {"target": "blocks.1.attn.o", "mode": "zero"}, "ablation")[0])
    monkeypatch.undo()
    # put the model back for the other tests of this module
    weight = replica.model.get_parameter("model.layers.1.self_attn.o_proj.weight")
    from safetensors.torch import load_file
    from sensray.models import BUNDLED_MODEL

    weight.data.copy_(load_file(BUNDLED_MODEL / "model.safetensors")["model.layers.1.self_attn.o_proj.weight"])
    assert replica.checksum() == replica.baseline.checksum_at_load


def test_the_local_path_never_imports_ray():
    code = ("import sys, sensray.sweep, sensray.replica, sensray.executors.local, sensray.plan;"
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
