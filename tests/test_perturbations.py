"""Every perturbation kind: exact semantics, seeded determinism, and bit-exact restore on every family."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensray.checksum import weights_checksum
from sensray.perturbations import PERTURBATIONS, ParamError
from sensray.perturbations.base import as_bits
from sensray.perturbations.bitflip import LAYOUTS, choose
from sensray.testing import FAMILIES, apply_kind, tiny_model

TOKENS = torch.arange(2 * 16).remainder(97).view(2, 16)


apply = apply_kind  # parse, check, apply: as a trial does


def logits(model):
    with torch.inference_mode():
        return model(input_ids=TOKENS, use_cache=False).logits.clone()


@pytest.fixture
def llama():
    return tiny_model("llama")


# ---------------------------------------------------------------- bit flips: exact bit semantics

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("field, expected", [("sign", -1.0), ("exponent_msb", math.inf)])
def test_flipping_a_field_of_one_gives_the_ieee_answer(dtype, field, expected):
    model = tiny_model("llama", dtype=dtype)
    weight = model.get_parameter("model.layers.0.mlp.down_proj.weight")
    weight.data[1, 2] = 1.0
    bit = LAYOUTS[dtype][field][0]
    undo = apply(model, "bitflip", target="blocks.0.mlp.down.weight", bit=bit, coords=[[1, 2]])
    assert weight[1, 2].item() == expected
    undo.restore()
    assert undo.verify() and weight[1, 2].item() == 1.0


def test_exponent_msb_flip_of_a_small_weight_explodes(llama):
    weight = llama.get_parameter("model.layers.1.self_attn.o_proj.weight")
    before = weight.detach().clone()
    undo = apply(llama, "bitflip", target="blocks.1.attn.o", field="exponent_msb", count=3, seed=4)
    changed = (as_bits(weight) != as_bits(before)).nonzero()
    assert len(changed) == 3
    assert all(abs(weight[tuple(i)].item()) > 1e30 for i in changed)
    undo.restore()
    assert torch.equal(as_bits(weight), as_bits(before))


def test_bit_flip_is_an_xor_of_exactly_one_bit(llama):
    weight = llama.get_parameter("model.layers.0.self_attn.q_proj.weight")
    before = as_bits(weight).clone()
    undo = apply(llama, "bitflip", target="blocks.0.attn.q", bit=7, count=5, seed=1)
    diff = as_bits(weight) ^ before
    assert int((diff != 0).sum()) == 5 and set(diff[diff != 0].tolist()) == {1 << 7}
    undo.restore()


def test_same_seed_same_elements_other_seed_other_elements():
    tensors = [torch.zeros(64, 32), torch.zeros(128)]
    parse = PERTURBATIONS.get("bitflip").parse
    first = choose(tensors, parse({"target": "x", "field": "exponent", "count": 10, "seed": 3}))
    again = choose(tensors, parse({"target": "x", "field": "exponent", "count": 10, "seed": 3}))
    other = choose(tensors, parse({"target": "x", "field": "exponent", "count": 10, "seed": 4}))
    flat = lambda plan: {(i, int(e), int(b)) for i, (es, bs) in plan.items() for e, b in zip(es, bs)}
    assert flat(first) == flat(again) != flat(other)
    assert len(flat(first)) == 10 and all(b in LAYOUTS[torch.float32]["exponent"] for _, _, b in flat(first))
    # The exact draws on every machine and version are pinned in tests/test_draws.py.


def test_rate_flips_about_rate_times_bits():
    tensors = [torch.zeros(1000, 100)]
    parse = PERTURBATIONS.get("bitflip").parse
    counts = [sum(len(e) for e, _ in choose(tensors, parse({"target": "x", "field": "any", "rate": 1e-4, "seed": s})).values())
              for s in range(20)]
    expected = 1e-4 * 1000 * 100 * 32
    assert abs(np.mean(counts) - expected) < 0.15 * expected


def test_flips_into_nan_restore_exactly(llama):
    weight = llama.get_parameter("model.layers.0.mlp.up_proj.weight")
    weight.data[0, :4] = torch.tensor([float("nan"), 1.0, -0.0, float("inf")])
    before = weight.detach().clone()
    undo = apply(llama, "bitflip", target="blocks.0.mlp.up.weight", bit=22, coords=[[0, 0], [0, 1], [0, 2], [0, 3]])
    assert torch.isnan(weight[0, 3])  # inf with a mantissa bit set is a NaN
    undo.restore()
    assert torch.equal(as_bits(weight), as_bits(before))


@pytest.mark.parametrize(
    "params, param",
    [
        ({"target": "blocks.0", "bit": 32}, "bit"),
        ({"target": "blocks.9", "bit": 1}, "target"),
        ({"target": "blocks.0.nothing", "bit": 1}, "target"),
        ({"target": "blocks.0.mlp.down.weight", "bit": 1, "coords": [[999, 0]]}, "coords"),
        ({"target": "blocks.0", "bit": 1, "coords": [[0, 0]]}, "target"),
    ],
)
def test_bitflip_check_rejects_bad_params(llama, params, param):
    kind = PERTURBATIONS.get("bitflip")
    with pytest.raises(ParamError) as err:
        kind.check(llama, kind.parse(params))
    assert err.value.param == param


def test_bitflip_width_depends_on_dtype():
    model = tiny_model("llama", dtype=torch.bfloat16)
    kind = PERTURBATIONS.get("bitflip")
    with pytest.raises(ParamError, match="bits 0-15"):
        kind.check(model, kind.parse({"target": "blocks.0", "bit": 16}))


@pytest.mark.parametrize(
    "params, words",
    [
        ({"target": "x"}, "exactly one of 'bit'"),
        ({"target": "x", "bit": 1, "field": "sign"}, "exactly one of 'bit'"),
        ({"target": "x", "bit": 1, "count": 2, "rate": 0.1}, "at most one"),
        ({"target": "x", "bit": -1}, "greater than or equal to 0"),
        ({"target": "x", "field": "exponent", "coords": [[0]]}, "set 'bit'"),
    ],
)
def test_bitflip_params_are_consistent(params, words):
    with pytest.raises(ParamError, match=words):
        PERTURBATIONS.get("bitflip").parse(params)


# ---------------------------------------------------------------- noise and ablation semantics

def test_noise_is_seeded_and_relative(llama):
    weight = llama.get_parameter("model.layers.0.mlp.down_proj.weight")
    before = weight.detach().clone()
    undo = apply(llama, "noise", target="blocks.0.mlp.down.weight", sigma=0.5, seed=2)
    first = weight.detach().clone()
    undo.restore()
    undo = apply(llama, "noise", target="blocks.0.mlp.down.weight", sigma=0.5, seed=2)
    assert torch.equal(weight, first)
    ratio = (first - before).std() / before.std()
    assert 0.45 < ratio < 0.55
    undo.restore()
    assert torch.equal(as_bits(weight), as_bits(before))


def test_noise_rejects_negative_sigma():
    with pytest.raises(ParamError) as err:
        PERTURBATIONS.get("noise").parse({"target": "x", "sigma": -0.1})
    assert err.value.param == "sigma"


def test_ablation_zero_and_mean(llama):
    weight = llama.get_parameter("model.layers.1.mlp.gate_proj.weight")
    mean = weight.float().mean().item()
    undo = apply(llama, "ablation", target="blocks.1.mlp.gate", mode="zero")
    assert not weight.any()
    undo.restore()
    undo = apply(llama, "ablation", target="blocks.1.mlp.gate", mode="mean")
    assert torch.allclose(weight, torch.full_like(weight, mean))
    undo.restore()


def test_skip_makes_the_block_an_identity(llama):
    seen = {}
    block = llama.model.layers[0]
    undo = apply(llama, "ablation", target="blocks.0", mode="skip")
    # Registered after the skip hook, so it sees what the block hands on.
    handle = block.register_forward_hook(lambda m, a, k, out: seen.update(io=(k.get("hidden_states", a[0] if a else None), out)),
                                         with_kwargs=True)
    logits(llama)
    handle.remove()
    undo.restore()
    hidden_in, hidden_out = seen["io"]
    out = hidden_out[0] if isinstance(hidden_out, tuple) else hidden_out
    assert torch.equal(hidden_in, out)
    assert not block._forward_hooks


def test_skip_needs_blocks(llama):
    kind = PERTURBATIONS.get("ablation")
    with pytest.raises(ParamError, match="whole decoder blocks"):
        kind.check(llama, kind.parse({"target": "blocks.0.mlp", "mode": "skip"}))


# ---------------------------------------------------------------- every kind on every family

KIND_CASES = [
    ("bitflip", {"target": "blocks.1", "field": "exponent_msb", "count": 4, "seed": 0}),
    ("bitflip", {"target": "blocks.0.attn.q", "bit": 30, "count": 8, "seed": 1}),
    ("bitflip", {"target": "blocks.*.mlp.down", "field": "any", "rate": 0.01, "seed": 2}),
    ("noise", {"target": "blocks.0.attn.v", "sigma": 1.0, "seed": 0}),
    ("noise", {"target": "blocks.*.mlp.up", "dist": "uniform", "sigma": 0.5, "relative": False, "seed": 1}),
    ("ablation", {"target": "blocks.1.mlp", "mode": "zero"}),
    ("ablation", {"target": "blocks.0.attn.k", "mode": "mean"}),
    ("ablation", {"target": "blocks.1", "mode": "skip"}),
    ("ablation", {"target": "embed", "mode": "zero"}),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kind_changes_output_and_round_trips(family):
    model = tiny_model(family)
    checksum, base = weights_checksum(model), logits(model)
    for kind, params in KIND_CASES:
        undo = apply(model, kind, **params)
        changed = logits(model)
        undo.restore()
        assert undo.verify(), (family, kind, params)
        assert not torch.equal(changed, base), f"{family}: {kind} {params} did not change the output"
        assert weights_checksum(model) == checksum, (family, kind, params)
        assert torch.equal(logits(model), base)


@pytest.mark.parametrize("family", ["bloom", "gpt_neox", "falcon"])
def test_fused_q_flip_touches_only_q_rows(family):
    model = tiny_model(family)
    undo_probe = apply(model, "ablation", target="blocks.0.attn.q", mode="zero")
    fused = [p for n, p in model.named_parameters() if n.endswith("query_key_value.weight")][0]
    q_rows = (fused == 0).all(dim=1)
    undo_probe.restore()
    before = as_bits(fused).clone()
    undo = apply(model, "bitflip", target="blocks.0.attn.q.weight", bit=30, count=20, seed=0)
    touched_rows = (as_bits(fused) != before).any(dim=1)
    assert touched_rows.any() and not (touched_rows & ~q_rows).any()
    undo.restore()
    assert torch.equal(as_bits(fused), before)


# ---------------------------------------------------------------- property: any sequence restores exactly

trial = st.one_of(
    st.builds(lambda blk, f, k, s: ("bitflip", {"target": f"blocks.{blk}", "field": f, "count": k, "seed": s}),
              st.integers(0, 1), st.sampled_from(["sign", "exponent", "exponent_msb", "mantissa", "any"]),
              st.integers(1, 50), st.integers(0, 2**31)),
    st.builds(lambda b, i, j: ("bitflip", {"target": "blocks.0.mlp.down.weight", "bit": b, "coords": [[i, j], [i, j]]}),
              st.integers(0, 15), st.integers(0, 7), st.integers(0, 7)),
    st.builds(lambda t, s, d: ("noise", {"target": t, "sigma": s, "dist": d, "seed": 1}),
              st.sampled_from(["blocks.0.attn.q", "embed", "blocks.1.mlp.*", "final_norm"]),
              st.floats(0, 1e6), st.sampled_from(["gaussian", "uniform"])),
    st.builds(lambda t, m: ("ablation", {"target": t, "mode": m}),
              st.sampled_from(["blocks.0", "blocks.1.attn", "lm_head", "blocks.*.norm1"]), st.sampled_from(["zero", "mean"])),
)


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("gpt_neox", torch.bfloat16), ("opt", torch.float16)])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(trial, min_size=1, max_size=6))
def test_any_trial_sequence_restores_every_bit(family, dtype, sequence):
    model = _models(family, dtype)
    checksum = weights_checksum(model)
    for kind, params in sequence:
        undo = apply(model, kind, **params)
        logits(model)  # evaluating NaN/inf weights must not disturb the restore
        undo.restore()
        assert undo.verify()
    assert weights_checksum(model) == checksum


_MODELS = {}


def _models(family, dtype):
    if (family, dtype) not in _MODELS:
        _MODELS[family, dtype] = tiny_model(family, dtype=dtype)
    return _MODELS[family, dtype]


@pytest.mark.parametrize("params, param", [({"count": 10**12}, "count"), ({"rate": 1.0}, "rate")])
def test_a_trial_of_more_flips_than_can_be_recorded_is_refused(params, param, monkeypatch):
    """The limit (10^7 flips) scaled down to this tiny model's 3.2 million bits."""
    import sensray.perturbations.bitflip as bitflip

    monkeypatch.setattr(bitflip, "MAX_FLIPS", 1000)
    MAX_FLIPS = 1000
    model = tiny_model("llama")
    kind = PERTURBATIONS.get("bitflip")
    big = kind.parse({"target": "**", "field": "any", **params})
    with pytest.raises(ParamError, match=f"flips per trial; at most {MAX_FLIPS:,}") as err:
        kind.check(model, big)
    assert err.value.param == param
