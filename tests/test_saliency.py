"""Saliency from gradients: the gradient against finite differences, the hooked (memory-light) pass against
the ordinary one, flips against what the bitflip kind writes, the Fisher sums, and the per-trial probes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sensray.perturbations import PERTURBATIONS
from sensray.saliency.flips import best_flips, flipped, float_space, predicted
from sensray.saliency.gradients import backward_pass, naive_gradients, parameters, token_loss
from sensray.saliency.measure import measure, windows_of
from sensray.saliency.probes import Probes
from sensray.saliency.scores import Scores
from sensray.saliency.tables import tables
from sensray.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3).eval()


@pytest.fixture(scope="module")
def batches():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 12), generator=generator) for _ in range(2)]


def mean_nll(model, batches) -> float:
    tokens = sum(b[:, 1:].numel() for b in batches)
    with torch.no_grad():
        return float(sum(token_loss(model, b) for b in batches)) / tokens


def gradients(model, batches, checkpoint=False) -> dict[str, torch.Tensor]:
    out = {}
    backward_pass(model, batches, lambda name, w, g: out.__setitem__(name, g.clone()), checkpoint=checkpoint)
    return out


def test_the_gradient_matches_central_finite_differences(batches):
    # OPT in float64 computes everything in float64 (Llama's RMSNorm and rotary tables drop to float32),
    # so central differences are good to ~1e-9 here.
    model = tiny_model("opt", seed=3).eval().double()
    grads = gradients(model, batches)
    rng = np.random.default_rng(0)
    for name, param in parameters(model)[::3]:
        i = int(rng.integers(param.numel()))
        flat, h = param.data.view(-1), 1e-5
        original = flat[i].item()
        flat[i] = original + h
        up = mean_nll(model, batches)
        flat[i] = original - h
        down = mean_nll(model, batches)
        flat[i] = original
        finite = (up - down) / (2 * h)
        assert grads[name].view(-1)[i].item() == pytest.approx(finite, rel=1e-6, abs=1e-9), name


def test_each_gradient_is_handed_over_once_complete_and_then_freed(model, batches):
    seen: list[str] = []

    def consume(name, weight, grad):
        assert grad is not None and grad.shape == weight.shape
        seen.append(name)

    backward_pass(model, batches, consume)
    assert sorted(seen) == sorted(name for name, _ in parameters(model))  # tied weights once, all others once
    assert all(p.grad is None for p in model.parameters())


def test_the_hooked_pass_gives_the_ordinary_gradients(model, batches):
    light, naive = gradients(model, batches), naive_gradients(model, batches)
    assert light.keys() == naive.keys()
    for name in naive:
        torch.testing.assert_close(light[name], naive[name], rtol=1e-5, atol=1e-7)


def test_recomputing_blocks_in_the_backward_changes_no_gradient(model, batches):
    plain, checkpointed = gradients(model, batches), gradients(model, batches, checkpoint=True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
    assert "forward" not in model.model.layers[0].__dict__  # the blocks' own forward is back


def test_scores_from_the_hooked_pass_equal_scores_from_the_ordinary_one(model, batches):
    light = Scores(model, top_k=5)
    backward_pass(model, batches, light.gradient)
    naive = Scores(model, top_k=5)
    for name, grad in naive_gradients(model, batches).items():
        naive.gradient(name, model.get_parameter(name).detach(), grad)
    a, b = tables(light, fisher=False), tables(naive, fisher=False)
    for name in ("tensors", "rows"):
        for column in ("taylor", "zero_first"):
            np.testing.assert_allclose(a[name][column].to_numpy(), b[name][column].to_numpy(), rtol=1e-5, atol=1e-9)
    assert a["elements"]["index"].to_list() == b["elements"]["index"].to_list()


def test_the_fisher_sums_are_the_window_gradients_squared_times_their_tokens(model, batches):
    measured = measure(model, batches, top_k=3)
    windows = windows_of(batches, None)
    assert measured.windows == len(windows) == 4
    name = "model.layers.1.mlp.down_proj.weight"
    expected = sum(naive_gradients(model, [w])[name].double().square() * w[:, 1:].numel() / len(windows)
                   for w in windows)
    entry = measured.scores.tensors[name]
    np.testing.assert_allclose(entry.sums["fisher"], expected.sum(dim=1).numpy(), rtol=1e-4)
    np.testing.assert_allclose(entry.sums["fisher_w2"],
                               (expected * model.get_parameter(name).detach().double() ** 2).sum(dim=1).numpy(),
                               rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_flipped_value_is_exactly_what_the_bitflip_kind_writes(dtype):
    model = tiny_model("llama", seed=3).eval().to(dtype)
    kind = PERTURBATIONS.get("bitflip")
    weight = model.model.layers[0].mlp.up_proj.weight.data
    for bit in float_space("w", weight, weight).bits("any"):
        expected = flipped(weight, bit)[5, 7]
        edits = kind.apply(model, kind.parse({"target": "blocks.0.mlp.up.weight", "bit": bit, "coords": [[5, 7]]}))
        written = weight[5, 7].clone()
        edits.restore()
        assert torch.equal(written.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           expected.view(torch.int16 if dtype != torch.float32 else torch.int32)), bit


def test_predicted_flip_damage_is_g_times_the_step_and_inf_when_the_weight_breaks():
    w = torch.tensor([1.5, -0.25, 0.0], dtype=torch.float32)
    g = torch.tensor([2.0, 0.5, 1.0])
    [chunk] = float_space("w", w, g).chunks()
    change, new = predicted(chunk, 30)  # exponent MSB: 1.5 -> inf-or-NaN, -0.25 -> -0.25 * 2^128
    assert math.isinf(change[0]) and change[0] > 0
    assert change[1].item() == pytest.approx(0.5 * (-0.25 * 2.0**128 + 0.25), rel=1e-12)
    change, _ = predicted(chunk, 30, finite_only=True)
    assert change[0] == -math.inf  # never chosen
    # Mantissa MSB: 1.5 -> 1.0 and -0.25 -> -0.375 move against their gradient's sign (they would lower the
    # loss): not offered. Only 0.0 -> 5.9e-39 raises it.
    top = best_flips(float_space("w", w, g), (22,), k=3)
    assert [row["index"] for row in top.rows()] == [2] and top.rows()[0]["predicted"] > 0


def test_excluded_flips_are_never_offered(model):
    w, g = model.model.norm.weight.detach(), torch.linspace(-1, 1, 64)
    space = float_space("blocks.norm.weight", w, g)
    first = best_flips(space, (22,), k=1).rows()[0]
    again = best_flips(space, (22,), k=1, exclude={(first["index"], first["bit"])}).rows()[0]
    assert (again["index"], again["bit"]) != (first["index"], first["bit"])


def test_probes_predict_element_changes_and_whole_tensor_directions(model, batches):
    w = model.get_parameter("model.layers.0.mlp.down_proj.weight").detach()
    rows = [
        {"kind": "bitflip", "error": None, "changes": [{"tensor": "blocks.0.mlp.down.weight", "index": 3,
                                                        "old": float(w.view(-1)[3]), "new": 0.5}]},
        {"kind": "ablation", "mode": "zero", "error": None, "tensors": [{"tensor": "blocks.0.mlp.down.weight"}]},
        {"kind": "ablation", "mode": "skip", "error": None, "tensors": [{"tensor": "blocks.0"}]},
        {"kind": "noise", "dist": "gaussian", "sigma": 0.1, "relative": True, "seed": 4, "error": None,
         "tensors": [{"tensor": "blocks.0.mlp.down.weight"}]},
    ]
    probes = Probes(model, rows)
    grads = gradients(model, batches)
    g = grads["model.layers.0.mlp.down_proj.weight"].double()
    measure(model, batches, top_k=1, fisher_windows=0, probes=probes)
    first = probes.predictions(fisher=False)["first"]
    assert first[0] == pytest.approx(float(g.view(-1)[3]) * (0.5 - float(w.view(-1)[3])), rel=1e-5)
    assert first[1] == pytest.approx(-float((g * w.double()).sum()), rel=1e-5)
    assert math.isnan(first[2])  # skipping a block has no weight change to predict
    kind = PERTURBATIONS.get("noise")
    edits = kind.apply(model, kind.parse({"target": "blocks.0.mlp.down.weight", "sigma": 0.1, "seed": 4}))
    delta = (w.double() - edits.parts[0].saved.double())
    edits.restore()
    assert first[3] == pytest.approx(float((g * delta).sum()), rel=1e-5)
    assert probes.magnitude[3] == pytest.approx(float(delta.norm()), rel=1e-6)
