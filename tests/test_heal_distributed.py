"""sensray heal on 2 CPU workers under Ray Train (loopback): DDP through accelerate, and DeepSpeed ZeRO-2 with
gradient accumulation, each training the same model as one process does, both workers ending identical, and
the export keeping the pruned zeros exactly. A random tiny Llama without dropout, so one process and two
workers draw nothing differently and their losses must agree."""

from __future__ import annotations

import json

import pytest
import torch
from heal_support import heal, prune, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned_tiny(tiny, tmp_path_factory):
    model_dir, _ = tiny
    return prune(tmp_path_factory.mktemp("pruned-tiny") / "tiny-wanda50", str(model_dir))


def small(tiny, *extra):
    return ["--corpus", str(tiny[1]), "--batch-size", "4", "--set", "checkpoint_every=2", *extra]


def record(directory):
    return json.loads((directory / "sensray-heal.json").read_text())


@pytest.mark.parametrize("method, engine", [("lora", []), ("masked", ["--deepspeed", "2", "--set",
                                                                      "micro_batch_size=1"])],
                         ids=["ddp-lora", "zero2-masked"])
def test_two_workers_train_what_one_process_trains(local_ray, tiny, pruned_tiny, tmp_path, capsys, method, engine):
    args = small(tiny, "--lr", "1e-3", "--set", "lora.dropout=0.0")
    code, _, err = heal(capsys, pruned_tiny, tmp_path / "one", method, 4, *args)
    assert code == 0, err
    code, _, err = heal(capsys, pruned_tiny, tmp_path / "two", method, 4, *args, "--workers", "2", *engine)
    assert code == 0, err
    one, two = record(tmp_path / "one"), record(tmp_path / "two")
    assert two["workers"]["count"] == 2 and two["workers"]["identical"] is True
    assert two["recipe"]["workers"] == 2 and (two["recipe"]["deepspeed"] == 2) == bool(engine)
    # The same global batch split over two workers: the gradient and so every step agree to float rounding.
    assert two["loss_curve"]["loss"] == pytest.approx(one["loss_curve"]["loss"], rel=1e-5)
    assert two["eval"]["ppl_after"] == pytest.approx(one["eval"]["ppl_after"], rel=1e-5)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    pruned = weights(pruned_tiny)
    for entry in json.loads((pruned_tiny / "sensray-prune.json").read_text())["achieved"]["tensors"].values():
        assert torch.equal(b[entry["param"]] == 0, pruned[entry["param"]] == 0)
    assert two["mask"]["moved_then_rezeroed"] == (0 if method == "masked" else two["mask"]["held_at_zero"])
