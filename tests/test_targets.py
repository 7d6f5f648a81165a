"""Target patterns as documented (sensray/targets.py, docs/ARCHITECTURE.md "Target patterns"): `*` is one
segment, `**` any number, tied embeddings are one tensor however many names select them."""

from __future__ import annotations

import pytest

from sensray.checksum import weights_checksum
from sensray.perturbations import PERTURBATIONS
from sensray.targets import TargetError, each, select
from sensray.testing import tiny_model

OPT_LEAVES = ["norm1", "attn.q", "attn.k", "attn.v", "attn.o", "norm2", "mlp.up", "mlp.down"]  # every one has a bias


@pytest.fixture(scope="module")
def opt():
    return tiny_model("opt")  # 2 blocks, biases everywhere: weights and biases to tell apart


def tensor_names(model, pattern: str) -> list[str]:
    return [ref.name for ref in select(model, pattern).tensors]


def test_double_star_spans_any_number_of_segments(opt):
    every_block_weight = [f"blocks.{i}.{leaf}.weight" for i in range(2) for leaf in OPT_LEAVES]
    assert sorted(tensor_names(opt, "blocks.**.weight")) == sorted(every_block_weight)
    assert sorted(tensor_names(opt, "blocks.**.bias")) == sorted(n.replace(".weight", ".bias") for n in every_block_weight)
    assert each(opt, "**.mlp.down") == ["blocks.0.mlp.down", "blocks.1.mlp.down"]  # a leading ** too
    # Everything below block 1 (its composites and leaves), each tensor once.
    inside = tensor_names(opt, "blocks.1.**")
    assert sorted(inside) == sorted(f"blocks.1.{leaf}.{p}" for leaf in OPT_LEAVES for p in ("weight", "bias"))
    params = {n for n, _ in opt.named_parameters()}
    assert len(tensor_names(opt, "**")) == len(params)  # the whole model, every parameter once


def test_single_star_is_exactly_one_segment(opt):
    assert each(opt, "blocks.*") == ["blocks.0", "blocks.1"]
    assert each(opt, "blocks.1.attn.*") == ["blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v", "blocks.1.attn.o"]
    with pytest.raises(TargetError, match=r"target 'blocks\.\*\.weight' matches no tensor"):
        select(opt, "blocks.*.weight")  # one segment between blocks and weight: there is none


@pytest.fixture(scope="module")
def shipped():
    from sensray.models import load_model
    from sensray.spec import ModelSpec

    return load_model(ModelSpec(device="cpu"))  # sensray-tiny: its lm_head is its embedding


def test_tied_embeddings_are_one_tensor_to_every_pattern(shipped):
    embedding = shipped.get_input_embeddings().weight
    assert shipped.get_output_embeddings().weight is embedding
    for pattern in ("embed", "lm_head", "*", "**"):
        tied = [r for r in select(shipped, pattern).tensors if r.resolve(shipped).data_ptr() == embedding.data_ptr()]
        assert len(tied) == 1, (pattern, [r.name for r in tied])
    assert tensor_names(shipped, "*") == ["embed.weight", "final_norm.weight"]  # lm_head's is embed's


def noise_ratio(model, target: str) -> float:
    """Apply relative noise (sigma 0.5) to `target`; the std of the change to the embedding over its std."""
    kind = PERTURBATIONS.get("noise")
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    undo = kind.apply(model, kind.parse({"target": target, "sigma": 0.5, "seed": 3}))
    try:
        return float((embedding.detach() - before).std() / before.std())
    finally:
        undo.restore()
        assert undo.verify()


@pytest.mark.parametrize("target", ["embed", "lm_head", "*"])
def test_a_target_that_selects_both_tied_names_perturbs_the_storage_once(shipped, target):
    """Noise of 0.5 std applied once changes the weights by 0.5 std; applied to the same storage twice
    (once per name) it would be 0.75 (the second draw scaled by the already noisy std)."""
    checksum = weights_checksum(shipped)
    assert noise_ratio(shipped, target) == pytest.approx(0.5, rel=0.02)
    assert weights_checksum(shipped) == checksum
