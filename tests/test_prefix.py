"""Prefix reuse gives exactly the full forward's metrics, for every family and every kind."""

import random

import pytest
import torch

from sensray.architectures import components, num_blocks
from sensray.metrics import evaluate, reference
from sensray.perturbations import PERTURBATIONS
from sensray.prefix import PrefixCache, _spaced_starts
from sensray.testing import FAMILIES, tiny_model

# Layouts beyond each family's default that change what a block receives or how q/k/v are fused.
VARIANTS = [(family, {}) for family in FAMILIES] + [
    ("falcon", {"alibi": False, "parallel_attn": True, "multi_query": True, "bias": False}),
    ("falcon", {"alibi": False, "new_decoder_architecture": True, "num_kv_heads": 2, "parallel_attn": True}),
    ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
]

# Kinds with parameters that give each a real effect; the target is drawn per case.
KINDS = [
    ("bitflip", {"bit": 30, "count": 2}),
    ("bitflip", {"field": "mantissa", "count": 5}),
    ("noise", {"sigma": 0.5}),
    ("ablation", {"mode": "zero"}),
    ("ablation", {"mode": "mean"}),
]


def batches(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return [torch.randint(0, vocab, (2, 12), generator=gen), torch.randint(0, vocab, (1, 12), generator=gen)]


def scored(model, data, ref, cache, kind, params):
    """(full forward scores, reused scores, start) for one applied perturbation."""
    kind = PERTURBATIONS.get(kind)
    undo = kind.apply(model, kind.parse(params))
    try:
        start = cache.start_for(undo)
        full = evaluate(model, data, ref)
        reused = evaluate(model, data, ref, cache, start)
    finally:
        undo.restore()
    assert undo.verify()
    return full, reused, start


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(v) or "default")
def test_reuse_equals_full_forward_for_every_kind(family, overrides):
    model = tiny_model(family, **overrides)
    data = batches(model)
    ref = reference(model, data)
    cache = PrefixCache.record(model, data, budget_bytes=None)
    leaves = [name for name, c in components(model).items() if c.kind not in ("block", "attn", "mlp")]
    rng = random.Random(f"{family}{overrides}")
    starts = set()
    for kind, params in KINDS:
        for target in rng.sample(leaves, 4) + ["blocks.1.attn", f"blocks.{num_blocks(model) - 1}.mlp"]:
            full, reused, start = scored(model, data, ref, cache, kind, {"target": target, **params})
            assert reused == full, (kind, target)  # bit-identical on CPU float32
            starts.add(start)
    full, reused, start = scored(model, data, ref, cache, "ablation", {"target": "blocks.1", "mode": "skip"})
    assert reused == full and start == 1
    assert len(starts) > 1  # the sample did resume somewhere past block 0


def test_start_is_the_first_touched_block():
    model = tiny_model("llama", tie_word_embeddings=False, num_hidden_layers=4)
    n = num_blocks(model)
    data = batches(model)
    cache = PrefixCache.record(model, data, budget_bytes=None)
    kind = PERTURBATIONS.get("ablation")

    def start(target):
        undo = kind.apply(model, kind.parse({"target": target}))
        undo.restore()
        return cache.start_for(undo)

    assert start("embed") == 0
    assert start("blocks.2.attn.q") == 2
    assert start("blocks.3") == 3
    assert start("final_norm") == n and start("lm_head") == n  # only the head reruns
    assert start("blocks.1,3.mlp.up") == 1


def test_tied_head_runs_in_full():
    model = tiny_model("llama", tie_word_embeddings=True)
    cache = PrefixCache.record(model, batches(model), budget_bytes=None)
    kind = PERTURBATIONS.get("ablation")
    undo = kind.apply(model, kind.parse({"target": "lm_head"}))
    undo.restore()
    assert cache.start_for(undo) == 0  # the head's weight is the embedding, used before block 0


def test_budget_records_a_spaced_subset_and_resumes_before_the_touched_block():
    model = tiny_model("gpt_neox", num_hidden_layers=6)
    data = batches(model)
    ref = reference(model, data)
    per_block = sum(b.numel() for b in data) * model.config.hidden_size * 4
    cache = PrefixCache.record(model, data, budget_bytes=2 * per_block)
    assert len(cache.starts) == 2 and cache.bytes == 2 * per_block
    full, reused, start = scored(model, data, ref, cache, "noise", {"target": "blocks.3.mlp.down", "sigma": 1.0})
    assert reused == full and start == max(s for s in cache.starts if s <= 3)
    none = PrefixCache.record(model, data, budget_bytes=per_block // 2)
    assert none.starts == () and none.bytes == 0


@pytest.mark.parametrize("n,affordable", [(12, 12), (12, 20), (12, 3), (32, 5), (4, 1), (4, 0)])
def test_spaced_starts(n, affordable):
    starts = _spaced_starts(n, affordable)
    assert len(starts) == min(n, affordable) and all(1 <= s <= n for s in starts)
    assert list(starts) == sorted(set(starts))


def test_instance_forward_survives_resume():
    """accelerate dispatch puts a forward on the module instance; resuming must put it back."""
    model = tiny_model("llama")
    data = batches(model)
    cache = PrefixCache.record(model, data, budget_bytes=None)
    block = cache.blocks[0]
    wrapped = block.forward
    block.forward = lambda *a, **k: wrapped(*a, **k)
    custom = block.forward
    with cache.resume_at(2, 0):
        assert block.forward is not custom
    assert block.forward is custom
    del block.forward
    with cache.resume_at(2, 0):
        pass
    assert "forward" not in vars(block)


def test_recordings_are_not_changed_by_trials():
    model = tiny_model("bloom")
    data = batches(model)
    ref = reference(model, data)
    cache = PrefixCache.record(model, data, budget_bytes=None)
    before = [{i: o.clone() if isinstance(o, torch.Tensor) else o[0].clone() for i, o in out.items()} for out in cache.outputs]
    for _ in range(2):
        scored(model, data, ref, cache, "noise", {"target": "blocks.1", "sigma": 2.0})
    for saved, out in zip(before, cache.outputs):
        for i, o in out.items():
            assert torch.equal(saved[i], o if isinstance(o, torch.Tensor) else o[0])
