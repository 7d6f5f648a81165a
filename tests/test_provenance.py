"""Every row says exactly what its trial changed, checked against a diff of the weights themselves."""

from __future__ import annotations

import math
import struct

import polars as pl
import pytest
import torch

from sensray.perturbations.edits import as_bits
from sensray.results import to_frame
from sensray.testing import apply_kind, tiny_model


apply = apply_kind  # parse, check, apply: as a trial does


def diff(model, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw HF parameter name -> flat indices of the elements whose bits changed."""
    out = {}
    for name, param in model.named_parameters():
        changed = (as_bits(param.detach()) != as_bits(before[name])).flatten().nonzero().flatten()
        if len(changed):
            out[name] = changed
    return out


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def float_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


@pytest.fixture
def llama():
    return tiny_model("llama")


def test_a_single_flip_names_tensor_element_bit_and_values(llama):
    before = snapshot(llama)
    edits = apply(llama, "bitflip", target="blocks.1.mlp.down", field="exponent", seed=5)
    prov = edits.provenance()
    ((raw_name, flat),) = diff(llama, before).items()
    assert raw_name == "model.layers.1.mlp.down_proj.weight" and prov["tensor"] == "blocks.1.mlp.down.weight"
    (change,) = prov["changes"]
    assert change["index"] == prov["index"] == int(flat[0])
    weight = llama.get_parameter(raw_name)
    row, col = change["coords"]
    assert row * weight.shape[1] + col == change["index"]
    assert change["old"] == prov["old"] == before[raw_name][row, col].item()
    assert change["new"] == prov["new"] == weight[row, col].item()
    assert change["old_bits"] == float_bits(change["old"]) and change["new_bits"] == float_bits(change["new"])
    assert change["old_bits"] ^ change["new_bits"] == 1 << change["bit"] and 23 <= change["bit"] <= 30
    assert prov["flipped_bit"] == change["bit"] and prov["elements_changed"] == 1
    assert prov["bit_counts"] == [{"bit": change["bit"], "count": 1}]


def test_a_rate_flip_lists_every_changed_element_with_counts_per_tensor_and_bit(llama):
    before = snapshot(llama)
    edits = apply(llama, "bitflip", target="blocks.*", field="any", rate=2e-4, seed=2)
    prov = edits.provenance()
    changed = diff(llama, before)
    assert len(prov["changes"]) == sum(len(v) for v in changed.values()) == prov["elements_changed"] > 10
    per_tensor = {t["tensor"]: t["changed"] for t in prov["tensors"]}
    assert sum(per_tensor.values()) == len(prov["changes"])
    assert sum(b["count"] for b in prov["bit_counts"]) == sum(c["bit"] is not None for c in prov["changes"])
    assert prov["index"] is None and prov["old"] is None  # the flat columns are for single-element trials


def test_zeroing_records_old_values_and_new_zeros(llama):
    weight = llama.get_parameter("model.layers.0.mlp.up_proj.weight")
    old = weight.detach().clone()
    prov = apply(llama, "zero", target="blocks.0.mlp.up.weight", pick="top", count=3).provenance()
    assert [c["new"] for c in prov["changes"]] == [0.0, 0.0, 0.0]
    for c in prov["changes"]:
        assert c["old"] == old[tuple(c["coords"])].item() and c["new_bits"] == 0
    assert prov["flipped_bit"] is None  # zeroing clears several bits per element


@pytest.mark.parametrize("sigma", [0.01, 0.3])
def test_noise_records_the_relative_norm_and_share_changed(llama, sigma):
    prov = apply(llama, "noise", target="blocks.0.mlp.up", sigma=sigma, seed=0).provenance()
    (entry,) = prov["tensors"]
    assert entry["tensor"] == prov["tensor"] == "blocks.0.mlp.up.weight" and entry["how"] == "tensor"
    assert entry["fraction_changed"] > 0.99 and prov["changes"] is None
    # relative gaussian noise: |sigma * std * N| / |W| ~ sigma * std / rms(W) ~ sigma for a zero-mean W
    assert entry["rel_norm"] == pytest.approx(sigma, rel=0.05)


def test_prune_records_the_achieved_sparsity(llama):
    prov = apply(llama, "prune", target="blocks.1.mlp", method="magnitude", sparsity=0.5).provenance()
    for entry in prov["tensors"]:
        module = entry["tensor"].removesuffix(".weight").replace("blocks.1.mlp.", "")
        weight = llama.get_parameter(f"model.layers.1.mlp.{module}_proj.weight")
        assert entry["sparsity"] == pytest.approx(float((weight == 0).float().mean()))
        assert entry["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_skipping_a_block_is_recorded_as_a_hook(llama):
    prov = apply(llama, "ablation", target="blocks.1", mode="skip").provenance()
    assert prov["tensors"] == [{"tensor": "blocks.1", "how": "hook", "numel": None, "changed": None,
                                "fraction_changed": None, "rel_norm": None, "sparsity": None}]
    assert prov["tensor"] == "blocks.1" and prov["changes"] is None


def test_provenance_survives_the_table(llama, tmp_path):
    """Rows of every kind in one Parquet table: nested lists keep their types; polars groups on them."""
    rows = []
    for i, (kind, params) in enumerate([("bitflip", dict(target="blocks.0", field="exponent_msb", seed=1)),
                                        ("bitflip", dict(target="blocks.0", field="any", rate=1e-3, seed=1)),
                                        ("noise", dict(target="blocks.1.attn", sigma=0.1)),
                                        ("ablation", dict(target="blocks.0", mode="skip"))]):
        edits = apply(llama, kind, **params)
        rows.append({"trial_id": str(i), "kind": kind, "sample": 0, **params, **edits.provenance(), "ppl": 1.0})
        edits.restore()
    rows.append({"trial_id": "x", "kind": "noise", "sample": 0, "target": "blocks.0", "error": "RuntimeError: oom"})
    to_frame(rows).write_parquet(tmp_path / "t.parquet")
    table = pl.read_parquet(tmp_path / "t.parquet")
    assert table.schema["changes"] == pl.List(pl.Struct({
        "tensor": pl.String, "index": pl.Int64, "coords": pl.List(pl.Int64), "bit": pl.Int64,
        "old": pl.Float64, "new": pl.Float64, "old_bits": pl.Int64, "new_bits": pl.Int64}))
    flips = table.select("trial_id", "changes").explode("changes").unnest("changes").drop_nulls("bit")
    single = [c for row in rows[:2] for c in row["changes"] if c["bit"] is not None]  # two bits of one element: null
    assert flips.group_by("bit").len()["len"].sum() == len(single) > 1000
    assert table["flipped_bit"][0] == 30 and math.isinf(table["new"][0]) is False
    assert table["tensors"][3][0]["how"] == "hook"
