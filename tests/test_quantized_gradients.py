"""Gradients through quantized storage (bitsandbytes int8, nf4 with double quantization, fp4).

The weight gradient is checked against a float model of the same dequantized weights (4-bit forwards
are exact; int8's matmul rounds activations, so its gradients agree in direction); the statistics'
gradients against autograd through the dequantization written out here in float64; every flip space's
new values against what a bitflip trial writes; committed flips on packed codes against their bytes;
and the attack and the saliency map end to end on the shipped model in nf4.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from sensray.checksum import weights_checksum
from sensray.committed import apply_changes, revert_changes
from sensray.errors import RestoreError
from sensray.models import load_model
from sensray.quantized.gradients import code_spaces, dequantized
from sensray.quantized.storage import part_tensor, quantized_weights
from sensray.saliency.gradients import backward_pass
from sensray.spec import ModelSpec
from sensray.testing import apply_kind

pytest.importorskip("bitsandbytes")

FORMATS = {"int8": {"quantization": "int8"}, "nf4": {"quantization": "nf4", "double_quant": True},
           "fp4": {"quantization": "fp4"}}
BATCHES = [torch.arange(2 * 24).remainder(1999).view(2, 24) + 7]
WEIGHT = "model.layers.1.mlp.down_proj.weight"  # the tensor most checks look at
CANONICAL = "blocks.1.mlp.down.weight"


@pytest.fixture(scope="module")
def models():
    return {name: load_model(ModelSpec.model_validate(keys), torch.device("cpu")) for name, keys in FORMATS.items()}


def gradients(model) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    got = {}
    loss = backward_pass(model, BATCHES, lambda name, w, g: got.__setitem__(name, (w.clone(), g.clone())))
    return loss, got


def float_twin(model):
    """The shipped model in float32 with every quantized weight replaced by its dequantized value."""
    twin = load_model(ModelSpec(name="sensray-tiny"), torch.device("cpu"))
    with torch.no_grad():
        for name, module in quantized_weights(model).items():
            twin.get_parameter(name).copy_(dequantized(module))
    return twin


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_4bit_gradients_are_those_of_a_float_model_of_the_dequantized_weights(models, fmt):
    model = models[fmt]
    was = [p.requires_grad for p in model.parameters()]
    loss, got = gradients(model)
    twin_loss, twin = gradients(float_twin(model))
    assert loss == pytest.approx(twin_loss, rel=1e-6)
    assert set(got) == set(twin) and WEIGHT in got  # every weight, quantized ones under their own name
    for name, (weight, grad) in got.items():
        torch.testing.assert_close(weight, twin[name][0])
        torch.testing.assert_close(grad, twin[name][1], rtol=1e-4, atol=1e-7)
    assert [p.requires_grad for p in model.parameters()] == was and all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in quantized_weights(model).values())  # the taps are gone


def test_int8_gradients_follow_the_float_model_up_to_the_int8_matmuls_rounding(models):
    """LLM.int8 rounds activations to int8 (and outliers to float16) in every matmul, so its loss is not
    smooth at the 1e-3 level (a 2% change of one row scale moves it less than that noise): the gradient
    through the dequantized weight is compared with the float model's, direction per tensor."""
    model = models["int8"]
    loss, got = gradients(model)
    twin_loss, twin = gradients(float_twin(model))
    assert loss == pytest.approx(twin_loss, rel=1e-3)
    cosines = {name: float(torch.nn.functional.cosine_similarity(grad.flatten(), twin[name][1].flatten(), dim=0))
               for name, (_, grad) in got.items()}
    assert min(cosines.values()) > 0.99, sorted(cosines.items(), key=lambda kv: kv[1])[:3]
    torch.testing.assert_close(got[WEIGHT][0], twin[WEIGHT][0])


def dequantize_by_hand(module, fmt: str, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """W from codes and (leaf) statistics in float64, the formats' formulas written out."""
    out, inp = module.out_features, module.in_features
    if fmt == "int8":
        codes = part_tensor(module, "").double()
        return codes * stats["scale"][:, None] / 127
    byte = part_tensor(module, "").reshape(-1).long()
    codes = torch.stack([byte >> 4, byte & 0xF], 1).reshape(-1)[: out * inp]
    from bitsandbytes.functional import get_4bit_type

    table = get_4bit_type(fmt, device="cpu").double()
    if "scale2" in stats:
        index = part_tensor(module, "scale").long()
        absmax = stats["scale_code"][index] * stats["scale2"][torch.arange(len(index)) // 256] + stats["scale_offset"]
    else:
        absmax = stats["scale"]
    return (table[codes] * absmax[torch.arange(out * inp) // 64]).reshape(out, inp)


@pytest.mark.parametrize("fmt", ["int8", "nf4", "fp4"])
def test_statistics_get_the_chain_rule_gradient(models, fmt):
    module = quantized_weights(models[fmt])[WEIGHT]
    upstream = torch.randn(module.out_features, module.in_features, generator=torch.Generator().manual_seed(1))
    spaces = code_spaces(module, CANONICAL, upstream)
    nested = f"{CANONICAL}.scale2" in spaces
    parts = ("scale2", "scale_offset", "scale_code") if nested else ("scale",)
    stats = {p: part_tensor(module, p).double().reshape(-1).clone().requires_grad_(True) for p in parts}
    (upstream.double() * dequantize_by_hand(module, fmt, stats)).sum().backward()
    for part in parts:
        np.testing.assert_allclose(spaces[f"{CANONICAL}.{part}"].grad.numpy(), stats[part].grad.numpy(),
                                   rtol=1e-9, atol=1e-12)
    if nested:  # the 8-bit block-scale codes: d loss / d (the block scale they decode to) = sum g W / absmax
        weight = dequantize_by_hand(module, fmt, {k: v.detach() for k, v in stats.items()})
        per_block = (upstream.double() * weight).reshape(-1, 64).sum(1) / _absmax(module).double()
        np.testing.assert_allclose(spaces[f"{CANONICAL}.scale"].grad.numpy(), per_block.numpy(), rtol=1e-6)


def _absmax(module) -> torch.Tensor:
    from sensray.quantized.elements import block_scales

    return block_scales(module, lambda t: t)


@pytest.mark.parametrize("fmt, part, bit", [
    ("int8", "", 6), ("int8", "", 7), ("int8", "scale", 30), ("nf4", "", 2), ("nf4", "", 3), ("nf4", "scale", 6),
    ("nf4", "scale2", 23), ("nf4", "scale_offset", 31), ("nf4", "scale_code", 20), ("fp4", "", 1),
    ("fp4", "scale", 29)])
def test_a_flip_space_gives_exactly_the_value_a_bitflip_trial_writes(models, fmt, part, bit):
    model = models[fmt]
    module = quantized_weights(model)[WEIGHT]
    name = f"{CANONICAL}.{part}" if part else CANONICAL
    space = code_spaces(module, CANONICAL, torch.ones(module.out_features, module.in_features))[name]
    index = space.numel - 3 if space.numel > 3 else 0  # an odd packed element: the low nibble
    chunk = next(c for c in space.chunks() if c.where.start <= index < c.where.stop)
    local = index - chunk.where.start
    coords = [int(c) for c in np.unravel_index(index, space.shape)]
    before = weights_checksum(model)
    edits = apply_kind(model, "bitflip", target=name, bit=bit, coords=[coords])
    (change,) = edits.provenance()["changes"]
    edits.restore()
    assert weights_checksum(model) == before
    assert change["index"] == index and change["bit"] == bit
    assert change["old"] == float(chunk.wide[local]) and change["new"] == float(chunk.flipped(bit)[local])


@pytest.mark.parametrize("name, bit", [(CANONICAL, 2), (f"{CANONICAL}.scale", 5), (f"{CANONICAL}.scale2", 3)])
def test_committed_flips_in_packed_codes_and_scale_codes_apply_and_revert(models, name, bit):
    model = models["nf4"]
    clean = weights_checksum(model)
    edits = apply_kind(model, "bitflip", target=name, bit=bit, coords=[[2]] if "scale" in name else [[3, 9]])
    changes = edits.provenance()["changes"]
    edits.restore()
    apply_changes(model, changes)
    flipped = weights_checksum(model)
    assert flipped != clean
    with pytest.raises(RestoreError, match="not the weights the change was recorded on"):
        apply_changes(model, changes)  # twice: the element no longer holds the old bits
    assert weights_checksum(model) == flipped  # all or nothing
    revert_changes(model, changes)
    assert weights_checksum(model) == clean


ATTACK = """\
name: nf4-attack
model: {name: sensray-tiny, quantization: nf4, double_quant: true}
data: {corpus: bundled, seq_len: 32, num_sequences: 4, batch_size: 4}
attack: {target: "blocks.*.*.*", field: magnitude, per_tensor: 1, evaluate: 4}
stop: {max_flips: 2}
random: {seeds: 1, counts: [2]}
"""


def test_the_attack_searches_codes_and_scales_of_a_quantized_model(tmp_path, capsys):
    from sensray.attack.cli import main

    spec = tmp_path / "attack.yaml"
    spec.write_text(ATTACK + f'output_dir: "{tmp_path}"\n', encoding="utf-8")
    assert main([str(spec), "--dry-run", "--executor", "local"]) == 0
    assert "nf4" in capsys.readouterr().out
    assert main([str(spec), "--executor", "local"]) == 0
    run = next((tmp_path / "nf4-attack").iterdir())
    flips = [json.loads(line) for line in (run / "flips.jsonl").read_text().splitlines()]
    candidates = pl.read_parquet(run / "candidates.parquet")
    assert len(flips) == 2 and all(f["delta_ppl"] > 1 for f in flips)
    assert flips[1]["nll"] >= flips[0]["nll"]  # each committed flip raised the loss further
    assert all(f["tensor"].startswith("blocks.") and f["bit"] in (0, 1, 2, 4, 5, 6) for f in flips)
    summary = json.loads((run / "attack.json").read_text())
    assert summary["flips"] == 2 and summary["checksum_committed"] != summary["checksum_at_load"]
    assert len(candidates) == 8 and candidates["predicted"].is_finite().all()
    assert "nf4" in (run / "report.md").read_text()


def test_saliency_of_a_quantized_model_scores_codes_and_statistics(tmp_path, capsys):
    from sensray.saliency.cli import main

    code = main(["--quantization", "nf4", "--double-quant", "--seq-len", "32", "--num-sequences", "4",
                 "--fisher-windows", "1", "--top-k", "2", "--output-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    run = next((tmp_path / "saliency").iterdir())
    tensors, flips = pl.read_parquet(run / "tensors.parquet"), pl.read_parquet(run / "flips.parquet")
    down = tensors.filter(pl.col("tensor") == CANONICAL).row(0, named=True)
    assert down["dtype"] == "nf4" and down["taylor"] > 0 and down["flip_statistics"] is not None
    assert {"embed.weight", "final_norm.weight"} <= set(tensors["tensor"])  # float tensors beside them
    stats = flips.filter(pl.col("tensor").str.starts_with(f"{CANONICAL}."))["tensor"].unique().to_list()
    assert sorted(stats) == [f"{CANONICAL}.{p}" for p in ("scale", "scale2", "scale_code", "scale_offset")]
    assert set(flips.filter(pl.col("tensor") == CANONICAL)["field"]) == {"sign", "magnitude_msb", "magnitude"}
    assert "nf4" in (run / "report.md").read_text()


def test_a_checked_scale_flip_is_predicted_through_the_scales_own_gradient(models):
    from sensray.saliency.probes import Probes
    from sensray.saliency.scores import Scores

    model = models["int8"]
    edits = apply_kind(model, "bitflip", target=f"{CANONICAL}.scale", bit=22, coords=[[7]])
    row = {"kind": "bitflip", "error": None, "changes": edits.provenance()["changes"]}
    edits.restore()
    probes = Probes(model, [row])
    scores = Scores(model, top_k=1, fields=(), probes=probes)
    backward_pass(model, BATCHES, scores.gradient)
    _, got = gradients(model)
    scale_grad = code_spaces(quantized_weights(model)[WEIGHT], CANONICAL, got[WEIGHT][1])[f"{CANONICAL}.scale"].grad
    (change,) = row["changes"]
    expected = float(scale_grad[7]) * (change["new"] - change["old"])
    assert probes.predictions(fisher=False)["first"][0] == pytest.approx(expected, rel=1e-6)
