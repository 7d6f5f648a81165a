"""A trial whose write fails half-way leaves the model exactly as it found it, for every kind.

The failure is injected where it happens in real life: the first in-place write into the storage
of the second tensor a kind touches is refused (as a CUDA OOM would refuse it), whatever op the
kind uses to write (copy_, fill_, index_put_, masked_fill_). Kinds that touch a single tensor
have the first write into that tensor refused instead.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sensray.checksum import weights_checksum
from sensray.perturbations import PERTURBATIONS
from sensray.plan import make_plan
from sensray.replica import Replica
from sensray.spec import validate
from sensray.testing import tiny_model

CASES = {  # kind -> parameters whose trial writes at least two tensors (zero: exactly one)
    "bitflip": {"target": "blocks.1", "field": "any", "count": 64, "seed": 3},
    "noise": {"target": "blocks.1.mlp", "sigma": 0.5, "seed": 1},
    "ablation-zero": {"target": "blocks.1.attn", "mode": "zero"},
    "ablation-mean": {"target": "blocks.1.attn", "mode": "mean"},
    "prune": {"target": "blocks.1", "method": "magnitude", "sparsity": 0.5},
    "zero": {"target": "blocks.1.mlp.down.weight", "pick": "top", "count": 5},
}


class RefuseWrite(TorchDispatchMode):
    """Raise at the first in-place write into the storage at `address`, then let everything through."""

    def __init__(self, address: int):
        super().__init__()
        self.address, self.fired = address, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        writes = schema.arguments and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write
        if not self.fired and writes and isinstance(args[0], torch.Tensor):
            if args[0].untyped_storage().data_ptr() == self.address:
                self.fired = True
                raise RuntimeError(f"CUDA out of memory (simulated, refusing {func})")
        return func(*args, **kwargs)


def kind_and_params(case: str):
    params = dict(CASES[case])
    kind = PERTURBATIONS.get(case.split("-")[0])
    return kind, kind.parse(params)


def written_storage(model, kind, params) -> int:
    """The storage of the second tensor the kind writes (the first, when it writes only one)."""
    edits = kind.apply(model, params)
    touched = [t.untyped_storage().data_ptr() for t in edits.touches() if isinstance(t, torch.Tensor)]
    edits.restore()
    assert edits.verify()
    distinct = list(dict.fromkeys(touched))
    return distinct[1] if len(distinct) > 1 else distinct[0]


@pytest.mark.parametrize("case", list(CASES))
def test_a_write_refused_half_way_leaves_the_weights_untouched(case, one_torch_thread):
    model = tiny_model("llama")
    kind, params = kind_and_params(case)
    before = weights_checksum(model)
    address = written_storage(model, kind, params)
    with pytest.raises(RuntimeError, match="simulated"):
        with RefuseWrite(address) as mode:
            kind.apply(model, params)
    assert mode.fired
    assert weights_checksum(model) == before


def test_the_replica_records_the_failure_and_the_next_trial_measures_the_same_model(one_torch_thread):
    spec = validate({"name": "f", "perturbation": "noise", "space": {"target": "blocks.1.mlp", "sigma": 0.5},
                     "data": {"seq_len": 32, "num_sequences": 2, "batch_size": 2}, "reuse": {"prefix": False}})
    replica = Replica(spec)
    trial = make_plan(spec, replica.model).trials[0]
    clean = replica.run_trial(trial)
    address = written_storage(replica.model, *kind_and_params("noise"))
    with RefuseWrite(address):
        failed = replica.run_trial(trial)
    assert failed["error"].startswith("RuntimeError: CUDA out of memory") and failed["ppl"] is None
    assert replica.checksum() == replica.baseline.checksum_at_load
    again = replica.run_trial(trial)
    assert again["ppl"] == clean["ppl"] and again["kl"] == clean["kl"]


def test_a_weight_changed_behind_the_undo_record_fails_the_sweep_at_the_checksum(tmp_path, monkeypatch, capsys):
    """The last line of defence: a trial that changes a weight its undo record does not know of (here a
    restore that silently does nothing, and a verify that believes it) is caught by the end-of-sweep checksum."""
    from sensray.perturbations.edits import ElementEdit
    from sensray.sweep import main

    monkeypatch.setattr(ElementEdit, "restore", lambda self: None)
    monkeypatch.setattr(ElementEdit, "verify", lambda self: True)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\nperturbation: bitflip\noutput_dir: {tmp_path / 'out'}\n"
                    "data: {seq_len: 32, num_sequences: 2}\nspace: {target: blocks.0, bit: 2, seed: 1}\n")
    assert main([str(spec), "--executor", "local"]) == 1
    err = capsys.readouterr().err
    assert "error: weights checksum changed over the sweep" in err
