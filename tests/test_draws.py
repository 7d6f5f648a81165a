"""Random draws depend on a trial's seed *and* its target (and field): reproducible, and independent."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sensray.models import meta_model
from sensray.perturbations import PERTURBATIONS
from sensray.perturbations.base import keyed_rng, tensors_of
from sensray.perturbations.bitflip import choose
from sensray.plan import make_plan
from sensray.spec import load_spec
from sensray.testing import tiny_model

REPO = Path(__file__).resolve().parents[1]
BITFLIP = PERTURBATIONS.get("bitflip")


def flips(model, params) -> list[tuple[str, int, int]]:
    """(canonical tensor, flat element, bit) of every flip a bitflip trial draws."""
    parsed = BITFLIP.parse(params)
    named = tensors_of(model, BITFLIP.select(model, parsed))
    plan = choose([t for _, t in named], parsed)
    return [(named[i][0], int(e), int(b)) for i, (es, bs) in plan.items() for e, b in zip(es, bs)]


@pytest.fixture(scope="module")
def default_study():
    spec = load_spec(REPO / "experiments" / "bitflip.yaml")
    model = meta_model(spec.model)  # draws need only shapes and dtypes
    return model, make_plan(spec, model).trials


def test_the_default_study_flips_256_distinct_weights_across_blocks_and_fields(default_study):
    model, trials = default_study
    drawn = [flip for trial in trials for flip in flips(model, trial.params)]
    assert len(trials) == len(drawn) == 256
    assert len({(name, element) for name, element, _ in drawn}) == 256  # seeded by seed alone: 8 positions
    by_block = Counter(name.split(".")[1] for name, _, _ in drawn)
    assert sorted(by_block.values()) == [32] * 8


def test_the_default_study_hits_tensor_kinds_in_proportion_to_their_size(default_study):
    model, trials = default_study
    sizes = Counter()
    for name, tensor in tensors_of(model, BITFLIP.select(model, BITFLIP.parse({"target": "blocks.0", "bit": 0}))):
        sizes[_kind(name)] += tensor.numel()
    hits = Counter(_kind(name) for trial in trials for name, _, _ in flips(model, trial.params))
    assert set(hits) >= {"attn", "mlp"}  # seeded by seed alone, no attention weight was ever hit
    total = sum(sizes.values())
    expected = {kind: 256 * size / total for kind, size in sizes.items()}
    # Pearson chi-square over attn / mlp (the norms' expected count, 0.3, is too small to test alone):
    chi2 = sum((hits[k] - expected[k]) ** 2 / expected[k] for k in ("attn", "mlp"))
    assert chi2 < 10.83, (hits, expected)  # p > 0.001 at one degree of freedom


def _kind(name: str) -> str:
    part = name.split(".")[2]
    return "norm" if part.startswith("norm") else part


def test_fields_and_targets_draw_independently():
    model = tiny_model("llama")
    base = {"count": 20, "seed": 7}
    down0 = flips(model, {"target": "blocks.0.mlp.down", "field": "mantissa", **base})
    down1 = flips(model, {"target": "blocks.1.mlp.down", "field": "mantissa", **base})
    exp0 = flips(model, {"target": "blocks.0.mlp.down", "field": "exponent", **base})
    relative = lambda fs: {e for _, e, _ in fs}
    assert relative(down0) != relative(down1) and relative(down0) != relative(exp0)
    assert flips(model, {"target": "blocks.0.mlp.down", "field": "mantissa", **base}) == down0  # reproducible


def test_pinned_draws():
    """The exact draws of one key, pinned as literals: a change here changes every published table."""
    assert keyed_rng(3, "bitflip", "blocks.2", "exponent").integers(1 << 40, size=3).tolist() == PINNED_RNG
    model = tiny_model("llama")
    assert flips(model, {"target": "blocks.1.attn.q", "field": "exponent", "count": 3, "seed": 3}) == PINNED_FLIPS


PINNED_RNG = [794356156363, 726225630192, 633181148510]
PINNED_FLIPS = [("blocks.1.attn.q.weight", 380, 26), ("blocks.1.attn.q.weight", 2438, 26),
                ("blocks.1.attn.q.weight", 3455, 25)]


def test_noise_is_independent_across_equal_tensors_and_the_same_under_any_target():
    noise = PERTURBATIONS.get("noise")
    model = tiny_model("llama")
    up = {i: model.get_parameter(f"model.layers.{i}.mlp.up_proj.weight") for i in (0, 1)}
    before = {i: w.detach().clone() for i, w in up.items()}

    def delta(target: str) -> dict[int, torch.Tensor]:
        edits = noise.apply(model, noise.parse({"target": target, "sigma": 0.1, "relative": False, "seed": 4}))
        out = {i: (w.detach() - before[i]).clone() for i, w in up.items()}
        edits.restore()
        return out

    block0, block1, up0 = delta("blocks.0"), delta("blocks.1"), delta("blocks.0.mlp.up")
    assert not torch.allclose(block0[0], block1[1])  # same shape, other tensor: other noise
    assert torch.equal(block0[0], up0[0])  # the same tensor gets the same noise whichever target selected it


def test_random_zeroing_draws_depend_on_the_target():
    zero = PERTURBATIONS.get("zero")
    model = tiny_model("llama")
    from sensray.perturbations.zeroing import elements

    picks = []
    for layer in (0, 1):
        params = zero.parse({"target": f"blocks.{layer}.mlp.up.weight", "pick": "random", "count": 8, "seed": 2})
        ((_, tensor),) = tensors_of(model, zero.select(model, params))
        picks.append(elements(tensor, params).tolist())
    assert picks[0] != picks[1] and len(set(picks[0])) == 8
    assert np.all(np.diff(picks[0]) > 0)
