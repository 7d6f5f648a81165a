"""Quantized storage of the shipped model (bitsandbytes int8, nf4 with double quantization, fp4).

Flips land where the forward reads them, change each weight exactly as the format's arithmetic says
(dequantized here independently: the format's tables written out, nibbles unpacked by hand; bnb is
only asked to confirm that its kernels read the same values), are described in the row as codes and
dequantized weights, and restore every raw byte of codes and statistics, whatever sequence of flips
hypothesis draws.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensray.architectures import components
from sensray.checksum import weights_checksum
from sensray.models import load_model, meta_model
from sensray.perturbations import PERTURBATIONS, ParamError
from sensray.perturbations.bitflip import FIELDS
from sensray.quantized.elements import elements_of
from sensray.quantized.storage import buffers, part_tensor, quantized_modules
from sensray.spec import ModelSpec
from sensray.testing import apply_kind

pytest.importorskip("bitsandbytes")

FORMATS = {
    "int8": {"quantization": "int8"},
    "nf4": {"quantization": "nf4", "double_quant": True},
    "fp4": {"quantization": "fp4"},
}
# The 4-bit tables, written out (NF4: the QLoRA paper's normal-float quantiles; FP4: bitsandbytes' 1 sign,
# 2 exponent, 1 mantissa bit layout), not read from bitsandbytes.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)
_FP4_MAGNITUDES = [0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
                   0.25]
FP4 = np.array(_FP4_MAGNITUDES + [-m for m in _FP4_MAGNITUDES], dtype=np.float32)
TOKENS = torch.arange(2 * 24).remainder(1999).view(2, 24) + 7


@pytest.fixture(scope="module")
def models():
    """The shipped model in each quantized format, loaded once for the module."""
    return {name: load_model(ModelSpec.model_validate(keys), torch.device("cpu")) for name, keys in FORMATS.items()}


apply = apply_kind  # parse, check, apply: as a trial does


def logits(model):
    with torch.inference_mode():
        return model(input_ids=TOKENS, use_cache=False).logits.clone()


def raw_state(model) -> dict[str, bytes]:
    """Every parameter's and quantization buffer's raw bytes."""
    tensors = dict(model.named_parameters()) | buffers(model)
    return {name: t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() for name, t in tensors.items()}


def module(model, path="model.layers.2.mlp.down_proj"):
    return model.get_submodule(path)


# ----------------------------------------------------------------------- independent dequantization


def signed(code: int) -> int:
    return code - 256 if code >= 128 else code


def block_scales(mod) -> np.ndarray:
    """Per-64-weight scales in float32; double-quantized: scale_code[s] * scale2[j // 256] + offset."""
    state = mod.weight.quant_state
    if not state.nested:
        return state.absmax.numpy()
    index = state.absmax.numpy().astype(np.int64)
    scaled = state.state2.code.numpy()[index] * state.state2.absmax.numpy()[np.arange(len(index)) // 256]
    return scaled + state.offset.numpy()


def dequantized(model, path="model.layers.2.mlp.down_proj") -> np.ndarray:
    """A layer's weights as its format defines them (int8: code * row scale / 127, in float64)."""
    mod = model.get_submodule(path)
    if mod.weight.dtype == torch.int8:
        return mod.state.CB.double().numpy() * mod.state.SCB.double().numpy()[:, None] / 127
    return dequantize_4bit(mod)


def dequantize_4bit(mod) -> np.ndarray:
    """(out, in) float32: element 2k is the high nibble of byte k, 2k + 1 the low one."""
    packed = mod.weight.data.reshape(-1).numpy().astype(np.int64)
    codes = np.stack([packed >> 4, packed & 0xF], axis=1).reshape(-1)
    table = NF4 if mod.weight.quant_type == "nf4" else FP4
    return (table[codes] * np.repeat(block_scales(mod), 64)).reshape(mod.out_features, mod.in_features)


# ------------------------------------------------------------------------------- where the bits are


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_forward_reads_the_storage_sensray_flips_and_never_moves_it(models, fmt):
    model = models[fmt]
    base = logits(model)
    before = {path: [part_tensor(m, p).data_ptr() for p in ("", "scale")] for path, m in quantized_modules(model).items()}
    logits(model)  # bitsandbytes moves int8 state on a first forward: prepare() already did
    after = {path: [part_tensor(m, p).data_ptr() for p in ("", "scale")] for path, m in quantized_modules(model).items()}
    assert before == after
    scale_field = "magnitude_msb" if fmt == "nf4" else "exponent_msb"  # nf4's scales are 8-bit codes here
    for target, field in (("blocks.0.attn.q.weight", "sign"), ("blocks.0.attn.q.weight.scale", scale_field)):
        edits = apply(model, "bitflip", target=target, field=field, count=20, seed=1)
        assert not torch.equal(logits(model), base), target  # the forward saw the flips
        edits.restore()
        assert edits.verify() and torch.equal(logits(model), base)  # and sees the restore, bit for bit


def test_int8_codes_share_the_weights_storage_and_4bit_stays_in_the_canonical_layout(models):
    for mod in quantized_modules(models["int8"]).values():
        assert mod.weight.CB is None and mod.state.CB.data_ptr() == mod.weight.data_ptr()
        assert mod.state.SCB.dtype == torch.float32 and mod.state.SCB.shape == (mod.out_features,)
    for name in ("nf4", "fp4"):
        for mod in quantized_modules(models[name]).values():
            assert mod.support_avx512bf16_for_cpu is False  # no CPU-only repacking of codes and scales
            assert not getattr(mod.weight.quant_state, "packing_format_for_cpu", False)


def test_the_4bit_value_table_is_not_read_and_statistics_are_per_layer(models):
    """Why `weight.code` is no target: the kernels hardcode NF4; a flipped table changes nothing."""
    model = models["nf4"]
    base = logits(model)
    table = module(model).weight.quant_state.code
    saved = table.clone()
    table.neg_()
    try:
        assert torch.equal(logits(model), base)
    finally:
        table.copy_(saved)
    scale_codes = {m.weight.quant_state.state2.code.data_ptr() for m in quantized_modules(model).values()}
    assert len(scale_codes) == len(quantized_modules(model))  # each layer its own: a flip changes one layer


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_meta_model_has_the_loaded_models_quantized_tensors(models, fmt):
    meta = meta_model(ModelSpec.model_validate(FORMATS[fmt]))
    live = models[fmt]
    names = lambda m: {r.name: r for c in components(m).values() for r in c.tensors}  # noqa: E731
    assert names(meta).keys() == names(live).keys()
    for name, ref in names(live).items():
        on_meta, loaded = elements_of(meta, names(meta)[name]), elements_of(live, ref)
        assert (on_meta.format, on_meta.shape, on_meta.statistic) == (loaded.format, loaded.shape, loaded.statistic)
        assert (on_meta.storage.shape, on_meta.storage.dtype) == (loaded.storage.shape, loaded.storage.dtype), name
    assert "lm_head.weight.scale" not in names(live) and "blocks.3.mlp.down.weight.scale" in names(live)


def test_patterns_select_codes_statistics_or_both(models):
    from sensray.targets import select

    model = models["nf4"]
    pick = lambda pattern: [r.name for r in select(model, pattern).tensors]  # noqa: E731
    assert pick("blocks.3.mlp.down.weight") == ["blocks.3.mlp.down.weight"]
    assert pick("blocks.3.mlp.down") == ["blocks.3.mlp.down.weight", *(f"blocks.3.mlp.down.weight.{p}" for p in
                                                                      ("scale", "scale2", "scale_offset", "scale_code"))]
    assert len(pick("blocks.*.mlp.*.weight.scale")) == 8 * 3
    assert all(n.endswith(".weight") for n in pick("blocks.**.weight"))


# -------------------------------------------------------------- a flip, by the format's arithmetic


def test_an_int8_flip_changes_the_code_and_the_weight_as_llm_int8_says(models):
    model = models["int8"]
    mod = module(model)
    r, c, bit = 5, 17, 6
    code, scale = int(mod.state.CB[r, c]), float(mod.state.SCB[r])
    edits = apply(model, "bitflip", target="blocks.2.mlp.down.weight", bit=bit, coords=[[r, c]])
    try:
        new = int(mod.state.CB[r, c])
        assert new == signed((code & 0xFF) ^ (1 << bit))
        (change,) = edits.provenance()["changes"]
        assert (change["tensor"], change["coords"], change["index"], change["bit"]) == (
            "blocks.2.mlp.down.weight", [r, c], r * 384 + c, bit)
        assert (change["old_bits"], change["new_bits"]) == (code & 0xFF, new & 0xFF)
        assert (change["old"], change["new"]) == (code * scale / 127, new * scale / 127)
    finally:
        edits.restore()


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("r, c, bit", [(3, 10, 0), (3, 11, 3), (100, 383, 2), (127, 0, 1)])
def test_a_4bit_flip_changes_one_nibble_and_one_weight_as_the_table_says(models, fmt, r, c, bit):
    model = models[fmt]
    mod = module(model)
    weights = dequantize_4bit(mod)
    # bitsandbytes' kernels read exactly what the independent dequantization reads:
    import bitsandbytes.functional as F

    assert np.array_equal(F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).numpy(), weights)
    element = r * mod.in_features + c
    packed = mod.weight.data.reshape(-1).clone()
    code = int(packed[element // 2]) >> 4 if element % 2 == 0 else int(packed[element // 2]) & 0xF
    table, scale = (NF4 if fmt == "nf4" else FP4), block_scales(mod)[element // 64]
    edits = apply(model, "bitflip", target="blocks.2.mlp.down.weight", bit=bit, coords=[[r, c]])
    try:
        diff = (mod.weight.data.reshape(-1) ^ packed).nonzero().flatten().tolist()
        assert diff == [element // 2]  # one byte, and in it the element's nibble's bit:
        assert int(mod.weight.data.reshape(-1)[element // 2] ^ packed[element // 2]) == 1 << (bit + 4 * (element % 2 == 0))
        after = dequantize_4bit(mod)
        expected = table[code ^ (1 << bit)] * scale
        assert after[r, c] == expected and np.array_equal(np.delete(after, element), np.delete(weights, element))
        (change,) = edits.provenance()["changes"]
        assert (change["coords"], change["bit"], change["old_bits"], change["new_bits"]) == ([r, c], bit, code,
                                                                                              code ^ (1 << bit))
        assert (change["old"], change["new"]) == (float(weights[r, c]), float(expected))
    finally:
        edits.restore()
    assert torch.equal(mod.weight.data.reshape(-1), packed)


def test_a_flipped_8bit_scale_code_rescales_its_64_weights(models):
    mod = module(models["nf4"])
    weights, scales = dequantize_4bit(mod), block_scales(mod)
    block, bit = 77, 6
    edits = apply(models["nf4"], "bitflip", target="blocks.2.mlp.down.weight.scale", bit=bit, coords=[[block]])
    try:
        state = mod.weight.quant_state
        index = int(state.absmax[block])
        expected = state.state2.code.numpy()[index] * state.state2.absmax.numpy()[block // 256] + state.offset.numpy()
        assert block_scales(mod)[block] == expected
        after, rows = dequantize_4bit(mod).reshape(-1), np.arange(64 * block, 64 * block + 64)
        packed = mod.weight.data.reshape(-1).numpy().astype(np.int64)[rows[::2] // 2]
        codes = np.stack([packed >> 4, packed & 0xF], axis=1).reshape(-1)
        assert np.array_equal(after[rows], NF4[codes] * expected)  # the block's 64 weights, rescaled
        assert np.array_equal(np.delete(after, rows), np.delete(weights.reshape(-1), rows))  # nothing else
        (change,) = edits.provenance()["changes"]
        assert (change["tensor"], change["old"], change["new"]) == (
            "blocks.2.mlp.down.weight.scale", float(scales[block]), float(expected))
    finally:
        edits.restore()


# --------------------------------------------------------------------- exact restore, any sequence

TARGETS = {  # (target, a storage format whose fields to draw from)
    "int8": [("blocks.1.mlp.down.weight", "int8"), ("blocks.1.mlp.down.weight.scale", "float32"),
             ("blocks.5.attn.q", "int8"), ("blocks.6", "float32")],
    "nf4": [("blocks.1.mlp.down.weight", "nf4"), ("blocks.1.mlp.down.weight.scale", "index8"),
            ("blocks.4.attn.q.weight.scale2", "float32"), ("blocks.4.attn.q.weight.scale_offset", "float32"),
            ("blocks.6.mlp.up.weight.scale_code", "float32"), ("blocks.7", "nf4")],
    "fp4": [("blocks.2.attn.v.weight", "fp4"), ("blocks.2.attn.v.weight.scale", "float32"), ("blocks.0", "fp4")],
}


@st.composite
def flip_steps(draw, fmt):
    target, storage = draw(st.sampled_from(TARGETS[fmt]))
    field = draw(st.sampled_from(sorted(FIELDS[storage])))
    return {"target": target, "field": field, "count": draw(st.integers(1, 40)), "seed": draw(st.integers(0, 2**20))}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_raw_byte_of_codes_and_statistics_restores_after_any_sequence_of_flips(models, data):
    fmt = data.draw(st.sampled_from(sorted(FORMATS)))
    model = models[fmt]
    before, checksum = raw_state(model), weights_checksum(model)
    steps = data.draw(st.lists(flip_steps(fmt), min_size=1, max_size=5))
    undo = [apply(model, "bitflip", **step) for step in steps]  # nested: each on top of the last
    assert sum(len(u.provenance()["changes"] or []) for u in undo) > 0
    for edits in reversed(undo):
        edits.restore()
        assert edits.verify()
    assert raw_state(model) == before and weights_checksum(model) == checksum


def test_the_checksum_covers_the_scales(models):
    model = models["int8"]
    checksum = weights_checksum(model)
    scale = module(model).state.SCB
    scale.view(torch.int32)[3] ^= 1  # one bit of one scale, behind sensray's back
    try:
        assert weights_checksum(model) != checksum
    finally:
        scale.view(torch.int32)[3] ^= 1
    assert weights_checksum(model) == checksum


# ------------------------------------------------------------------------- the other kinds

@pytest.mark.parametrize("fmt", FORMATS)
def test_zeroing_writes_the_code_of_zero_and_leaves_the_scale(models, fmt):
    model = models[fmt]
    before, weights = raw_state(model), dequantized(model)
    edits = apply(model, "zero", target="blocks.2.mlp.down.weight", pick="top", count=4)
    try:
        changes = edits.provenance()["changes"]
        assert len(changes) == 4 and all(c["new"] == 0.0 for c in changes)
        assert [c["old"] for c in changes] == [weights[tuple(c["coords"])] for c in changes]
        zeroed = dequantized(model)
        assert all(zeroed[tuple(c["coords"])] == 0.0 for c in changes)
        assert np.count_nonzero(zeroed != weights) == 4  # those four weights, nothing else
        scale = "model.layers.2.mlp.down_proj.weight." + ("SCB" if fmt == "int8" else "absmax")
        assert raw_state(model)[scale] == before[scale]
        # they were the four largest dequantized weights:
        assert min(abs(c["old"]) for c in changes) == np.sort(np.abs(weights.reshape(-1)))[-4]
    finally:
        edits.restore()
    assert edits.verify() and raw_state(model) == before


def test_ablation_zeroes_every_code_and_leaves_the_statistics(models):
    model = models["nf4"]
    before = raw_state(model)
    base = logits(model)
    edits = apply(model, "ablation", target="blocks.3.mlp", mode="zero")
    try:
        assert np.all(dequantize_4bit(module(model, "model.layers.3.mlp.up_proj")) == 0)
        stats = [n for n in before if n.startswith("model.layers.3.mlp") and not n.endswith(".weight")]
        assert stats and all(raw_state(model)[n] == before[n] for n in stats)
        summary = {t["tensor"]: t for t in edits.provenance()["tensors"]}
        assert set(summary) == {f"blocks.3.mlp.{p}.weight" for p in ("gate", "up", "down")}
        assert all(t["sparsity"] == 1.0 and t["rel_norm"] == 1.0 for t in summary.values())
        assert not torch.equal(logits(model), base)
    finally:
        edits.restore()
    assert raw_state(model) == before


@pytest.mark.parametrize("kind, params, words", [
    ("noise", {"target": "blocks.2", "sigma": 0.1}, ("noise cannot act on", "requantized")),
    ("prune", {"target": "blocks.2", "sparsity": 0.5}, ("prune cannot act on", "quantizing the result")),
    ("ablation", {"target": "blocks.2.attn", "mode": "mean"}, ("mode 'mean'", "requantizing")),
    ("zero", {"target": "blocks.2.mlp.down.weight.scale", "pick": "top"}, ("quantization statistic",)),
    ("ablation", {"target": "blocks.2.mlp.down.weight.scale"}, ("only quantization statistics",)),
    ("bitflip", {"target": "blocks.2", "bit": 3}, ("a different bit in each storage format",)),
    ("bitflip", {"target": "lm_head", "field": "magnitude_msb"}, ("lm_head.weight", "float32")),
    ("bitflip", {"target": "lm_head", "role": "scale"}, ("has no scale",)),
])
def test_what_a_kind_cannot_do_on_quantized_storage_is_an_error_that_says_why(models, kind, params, words):
    k = PERTURBATIONS.get(kind)
    with pytest.raises(ParamError) as err:
        k.check(models["int8"], k.parse(params))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_float_tensors_of_a_quantized_model_take_noise(models):
    model = models["int8"]
    before = raw_state(model)
    edits = apply(model, "noise", target="blocks.2.norm1", sigma=0.5, seed=1)
    edits.restore()
    assert edits.verify() and raw_state(model) == before


def test_a_slice_of_a_fused_quantized_weight_is_refused():
    from transformers import AutoModelForCausalLM

    from sensray.quantized.loading import quantize_meta
    from sensray.testing import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("bloom"))
    quantize_meta(model, ModelSpec.model_validate(FORMATS["int8"]))
    bitflip = PERTURBATIONS.get("bitflip")
    bitflip.check(model, bitflip.parse({"target": "blocks.0.attn.qkv", "field": "sign"}))
    with pytest.raises(ParamError, match="target the fused weight"):
        bitflip.check(model, bitflip.parse({"target": "blocks.0.attn.q", "field": "sign"}))


# --------------------------------------------------------------------------- bitsandbytes' noise


def test_the_int8_cast_notice_is_dropped_only_while_the_loaded_model_runs(models, caplog):
    import bitsandbytes as bnb

    mod = module(models["int8"])
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.autograd._functions"):
        logits(models["int8"])
        assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
        with torch.inference_mode():  # the same layer called outside the model: bitsandbytes speaks as before
            bnb.matmul(torch.ones(2, mod.in_features), mod.weight, state=mod.state)
    assert [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
