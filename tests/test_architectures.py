"""Canonical component names: tables per family, fused q/k/v views, meta models.

Everything runs on tiny in-process models (sensray.testing); no network.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from sensray.architectures import (
    SUPPORTED_FAMILIES,
    ArchitectureMismatch,
    FusedSlice,
    UnsupportedArchitecture,
    adapter_for,
    components,
    decoder_blocks,
    num_blocks,
)
from sensray.testing import FAMILIES, tiny_config, tiny_model

LAYERS = 2

# What each family must expose, written out by hand (not derived from the tables).
TOP = {
    "llama": ["embed"],
    "mistral": ["embed"],
    "gpt_neo": ["embed", "pos_embed"],
    "gptj": ["embed"],
    "opt": ["embed", "pos_embed"],
    "bloom": ["embed", "embed_norm"],
    "gpt_neox": ["embed"],
    "falcon": ["embed"],
}
TAIL = ["final_norm", "lm_head"]
SEPARATE = ["norm1", "attn", "attn.q", "attn.k", "attn.v", "attn.o", "norm2", "mlp", "mlp.up", "mlp.down"]
FUSED = ["norm1", "attn", "attn.qkv", "attn.q", "attn.k", "attn.v", "attn.o", "norm2", "mlp", "mlp.up", "mlp.down"]
BLOCK = {
    "llama": SEPARATE[:8] + ["mlp.gate"] + SEPARATE[8:],
    "mistral": SEPARATE[:8] + ["mlp.gate"] + SEPARATE[8:],
    "gpt_neo": SEPARATE,
    "gptj": [k for k in SEPARATE if k != "norm2"],  # parallel attn/MLP share ln_1
    "opt": SEPARATE,
    "bloom": FUSED,
    "gpt_neox": FUSED,
    "falcon": FUSED,  # falcon-rw-1b flavour: sequential, two norms
}

# HF parameter behind a few canonical tensors of block 1 (pins the tables to the modeling code).
PARAMS = {
    "llama": {"attn.q.weight": "model.layers.1.self_attn.q_proj.weight",
              "mlp.gate.weight": "model.layers.1.mlp.gate_proj.weight",
              "norm2.weight": "model.layers.1.post_attention_layernorm.weight"},
    "mistral": {"attn.o.weight": "model.layers.1.self_attn.o_proj.weight",
                "mlp.down.weight": "model.layers.1.mlp.down_proj.weight"},
    "gpt_neo": {"attn.q.weight": "transformer.h.1.attn.attention.q_proj.weight",
                "attn.o.bias": "transformer.h.1.attn.attention.out_proj.bias",
                "mlp.up.weight": "transformer.h.1.mlp.c_fc.weight"},
    "gptj": {"attn.k.weight": "transformer.h.1.attn.k_proj.weight",
             "mlp.down.bias": "transformer.h.1.mlp.fc_out.bias",
             "norm1.weight": "transformer.h.1.ln_1.weight"},
    "opt": {"attn.v.bias": "model.decoder.layers.1.self_attn.v_proj.bias",
            "norm2.weight": "model.decoder.layers.1.final_layer_norm.weight",
            "mlp.up.weight": "model.decoder.layers.1.fc1.weight"},
    "bloom": {"attn.qkv.weight": "transformer.h.1.self_attention.query_key_value.weight",
              "attn.q.bias": "transformer.h.1.self_attention.query_key_value.bias",
              "attn.o.weight": "transformer.h.1.self_attention.dense.weight"},
    "gpt_neox": {"attn.v.weight": "gpt_neox.layers.1.attention.query_key_value.weight",
                 "mlp.down.weight": "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"},
    "falcon": {"attn.k.weight": "transformer.h.1.self_attention.query_key_value.weight",
               "norm2.weight": "transformer.h.1.post_attention_layernorm.weight"},
}  # fmt: skip


def expected_names(family: str) -> list[str]:
    blocks = [n for i in range(LAYERS) for n in [f"blocks.{i}"] + [f"blocks.{i}.{k}" for k in BLOCK[family]]]
    return TOP[family] + blocks + TAIL


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {f: tiny_model(f) for f in FAMILIES}


def meta_model(family: str, **overrides) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(family, **overrides))


def test_families_agree():
    assert set(FAMILIES) == set(SUPPORTED_FAMILIES) == set(TOP)


@pytest.mark.parametrize("family", FAMILIES)
def test_expected_names_in_order(models, family):
    model = models[family]
    comps = components(model)
    assert list(comps) == expected_names(family)
    assert num_blocks(model) == LAYERS
    blocks = decoder_blocks(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == LAYERS
    for i in range(LAYERS):
        assert model.get_submodule(comps[f"blocks.{i}"].module) is blocks[i]
    for name, comp in comps.items():
        assert comp.name == name
        assert comp.layer == (int(name.split(".")[1]) if name.startswith("blocks.") else None)
        model.get_submodule(comp.module)  # every module path resolves
    for local, param in PARAMS[family].items():
        refs = {r.name: r for r in comps["blocks.1." + local.rsplit(".", 1)[0]].tensors}
        assert refs[f"blocks.1.{local}"].param == param


@pytest.mark.parametrize("family", FAMILIES)
def test_refs_share_storage_with_their_parameter(models, family):
    model = models[family]
    for comp in components(model).values():
        assert comp.tensors, comp.name
        for ref in comp.tensors:
            param = model.get_parameter(ref.param)
            t = ref.resolve(model)
            assert t.untyped_storage().data_ptr() == param.untyped_storage().data_ptr(), ref.name
            if ref.whole:
                assert t.data_ptr() == param.data_ptr() and t.shape == param.shape
            else:
                assert t.numel() < param.numel()
            assert not t.requires_grad  # .data: edits are not recorded by autograd


@pytest.mark.parametrize("family", FAMILIES)
def test_in_place_edit_of_resolved_tensor_edits_the_model(family):
    model = tiny_model(family)
    comps = components(model)
    name = "blocks.1.attn.q"
    for ref in comps[name].tensors:
        param = model.get_parameter(ref.param)
        before = param.detach().clone()
        ref.resolve(model).add_(1.0)
        changed = (param.detach() != before).sum().item()
        assert changed == ref.resolve(model).numel()  # exactly the q elements, nothing else


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_model_gives_identical_components(models, family):
    real = components(models[family])
    meta = components(meta_model(family))
    assert list(real) == list(meta)
    for name in real:
        assert real[name] == meta[name]  # names, modules, params and selects (FusedSlice compares by value)


@pytest.mark.parametrize("family", FAMILIES)
def test_canonical_names_unique_and_consistent(models, family):
    comps = components(models[family])
    tensor_map: dict[str, tuple] = {}
    for comp in comps.values():
        names = [r.name for r in comp.tensors]
        assert len(names) == len(set(names)), comp.name
        for ref in comp.tensors:
            # The same canonical tensor name means the same tensor wherever it appears.
            assert tensor_map.setdefault(ref.name, (ref.param, ref.select)) == (ref.param, ref.select)
            assert ref.name.startswith(comp.name + ".") or comp.kind in {"block", "attn", "mlp"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_is_covered_exactly_once(models, family):
    """Top-level components + blocks.{i} hold every parameter once, as whole tensors."""
    model = models[family]
    comps = components(model)
    covered = [r.param for c in comps.values() if c.layer is None or c.kind == "block" for r in c.tensors]
    assert sorted(covered) == sorted(n for n, _ in model.named_parameters(remove_duplicate=False))
    for c in comps.values():
        if c.kind == "block":
            assert all(r.whole for r in c.tensors)


@pytest.mark.parametrize("family", FAMILIES)
def test_composites_list_leaf_tensors(models, family):
    comps = components(models[family])
    for i in range(LAYERS):
        for composite in ("attn", "mlp", None):
            name = f"blocks.{i}" + (f".{composite}" if composite else "")
            prefix = f"blocks.{i}." + (f"{composite}." if composite else "")
            leaves = [c for n, c in comps.items() if n.startswith(prefix) and c.kind not in {"attn", "mlp"}]
            expected = [r for c in leaves for r in c.tensors if r.whole]
            assert list(comps[name].tensors) == expected
    if adapter_for(models[family].config).fused:
        names = [r.name for r in comps["blocks.0"].tensors]
        assert "blocks.0.attn.qkv.weight" in names
        assert not any(n.startswith(("blocks.0.attn.q.", "blocks.0.attn.k.", "blocks.0.attn.v.")) for n in names)


# --------------------------------------------------------------------------- #
# Fused q/k/v: the views hold exactly the rows the modeling code uses.
# --------------------------------------------------------------------------- #

# bias=True everywhere so bias views are checked too (real 7b/40b have no bias).
FUSED_CASES = {
    "bloom": ("bloom", {}),
    "gpt_neox": ("gpt_neox", {}),
    "falcon-classic": ("falcon", {}),  # falcon-rw-1b: per head [q|k|v]
    "falcon-multi_query": ("falcon", dict(multi_query=True, parallel_attn=True, alibi=False)),  # falcon-7b
    "falcon-new_arch": (  # falcon-40b/180b: grouped, 2 kv heads x 2 q heads
        "falcon",
        dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, alibi=False),
    ),
}


def capture_qkv(model: nn.Module, family: str, layer: int, monkeypatch) -> dict[str, torch.Tensor]:
    """Run the real forward; record the qkv Linear's input and the q, k, v the modeling code
    derives from its output, each as (batch, seq, heads, head_dim) before any rotary."""
    rec: dict[str, torch.Tensor] = {}
    block = decoder_blocks(model)[layer]
    if family == "gpt_neox":
        import transformers.models.gpt_neox.modeling_gpt_neox as neox

        attn = block.attention
        model.set_attn_implementation("eager")
        rope, eager = neox.apply_rotary_pos_emb, neox.eager_attention_forward

        def rope_spy(q, k, cos, sin, *a, **kw):
            rec.setdefault("q", q.transpose(1, 2).detach().clone())
            rec.setdefault("k", k.transpose(1, 2).detach().clone())
            return rope(q, k, cos, sin, *a, **kw)

        def eager_spy(module, query, key, value, *a, **kw):
            if module is attn:
                rec["v"] = value.transpose(1, 2).detach().clone()
            return eager(module, query, key, value, *a, **kw)

        monkeypatch.setattr(neox, "apply_rotary_pos_emb", rope_spy)
        monkeypatch.setattr(neox, "eager_attention_forward", eager_spy)
        # rope_spy sees every layer: keep only this layer's call.
        handle0 = attn.register_forward_pre_hook(lambda m, a, kw: rec.clear(), with_kwargs=True)
    else:
        attn = block.self_attention
        split_name = "_reshape" if family == "bloom" else "_split_heads"
        split = getattr(attn, split_name)

        def split_spy(fused):
            out = split(fused)
            # bloom's _reshape gives (batch, heads, seq, head_dim); falcon's (batch, seq, heads, head_dim)
            q, k, v = (t.transpose(1, 2) for t in out) if family == "bloom" else out
            rec.update(q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone())
            return out

        monkeypatch.setattr(attn, split_name, split_spy)
        handle0 = None
    handle = attn.query_key_value.register_forward_hook(lambda m, args, out: rec.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad():
            model(torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1)))
    finally:
        handle.remove()
        if handle0 is not None:
            handle0.remove()
    return rec


def predicted(model: nn.Module, comps, layer: int, part: str, x: torch.Tensor) -> torch.Tensor:
    """x @ view.T (+ bias view), as (batch, seq, heads_of_part, head_dim)."""
    refs = {r.name.rsplit(".", 1)[1]: r for r in comps[f"blocks.{layer}.attn.{part}"].tensors}
    w = refs["weight"].resolve(model)
    y = x @ w.reshape(-1, w.shape[-1]).T
    if "bias" in refs:
        y = y + refs["bias"].resolve(model).reshape(-1)
    head_dim = refs["weight"].select.layout.head_dim
    return y.reshape(*x.shape[:-1], -1, head_dim)


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_views_are_the_rows_the_model_uses(case, monkeypatch):
    family, overrides = FUSED_CASES[case]
    model = tiny_model(family, bias=True, **overrides) if family == "falcon" else tiny_model(family)
    comps = components(model)
    layer = 1
    layout = comps[f"blocks.{layer}.attn.q"].tensors[0].select.layout
    rec = capture_qkv(model, family, layer, monkeypatch)
    x = rec["x"]
    b, s = x.shape[:2]
    heads = model.config.num_attention_heads
    q = predicted(model, comps, layer, "q", x)
    assert q.shape == (b, s, heads, layout.head_dim)
    torch.testing.assert_close(rec["q"], q, rtol=1e-5, atol=1e-6)
    for part in ("k", "v"):
        pred = predicted(model, comps, layer, part, x)  # one k/v head per group
        assert pred.shape == (b, s, layout.groups, layout.head_dim)
        # Falcon new-arch broadcasts each group's k/v to its query heads.
        got = rec[part].reshape(b, s, layout.groups, -1, layout.head_dim)
        torch.testing.assert_close(got, pred.unsqueeze(3).expand_as(got), rtol=1e-5, atol=1e-6)
    if bias_ref := [r for r in comps[f"blocks.{layer}.attn.q"].tensors if r.name.endswith(".bias")]:
        assert bias_ref[0].resolve(model).shape == (layout.groups, layout.q_per_group * layout.head_dim)


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_views_partition_the_fused_weight(case):
    family, overrides = FUSED_CASES[case]
    model = tiny_model(family, bias=True, **overrides) if family == "falcon" else tiny_model(family)
    comps = components(model)
    qkv = comps["blocks.0.attn.qkv"]
    for whole in qkv.tensors:
        param = model.get_parameter(whole.param)
        with torch.no_grad():
            param.copy_(torch.arange(param.numel(), dtype=param.dtype).view_as(param))
        seen = []
        for part in "qkv":
            (ref,) = [r for r in comps[f"blocks.0.attn.{part}"].tensors if r.param == whole.param]
            assert isinstance(ref.select, FusedSlice) and ref.select.part == part
            seen.append(ref.resolve(model).reshape(-1))
        assert torch.equal(torch.cat(seen).sort().values, torch.arange(param.numel(), dtype=param.dtype))


@pytest.mark.parametrize(
    ("overrides", "norm1", "norm2"),
    [
        ({}, "input_layernorm", "post_attention_layernorm"),  # falcon-rw-1b
        (dict(multi_query=True, parallel_attn=True), "input_layernorm", None),  # falcon-7b
        (dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True), "ln_attn", "ln_mlp"),  # 40b
    ],
)
def test_falcon_norms_follow_config(overrides, norm1, norm2):
    comps = components(meta_model("falcon", **overrides))
    assert comps["blocks.1.norm1"].module == f"transformer.h.1.{norm1}"
    if norm2 is None:
        assert "blocks.1.norm2" not in comps
    else:
        assert comps["blocks.1.norm2"].module == f"transformer.h.1.{norm2}"


def test_opt_350m_flavour_has_projections_and_no_final_norm():
    model = tiny_model("opt", word_embed_proj_dim=32, do_layer_norm_before=False)
    names = list(components(model))
    assert names[:3] == ["embed", "pos_embed", "proj_in"]
    assert names[-2:] == ["proj_out", "lm_head"]
    assert "final_norm" not in names
    assert components(model)["proj_in"].module == "model.decoder.project_in"


def test_opt_mlp_is_a_group_of_fc1_fc2():
    comps = components(meta_model("opt"))
    mlp = comps["blocks.0.mlp"]
    assert mlp.module == "model.decoder.layers.0" and not mlp.exact_module
    assert [r.param for r in mlp.tensors] == [
        f"model.decoder.layers.0.{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    ]


@pytest.mark.parametrize(("family", "overrides"), [("llama", dict(tie_word_embeddings=True)), ("opt", {})])
def test_tied_embeddings_are_two_components_one_parameter(family, overrides):
    model = tiny_model(family, **overrides)
    comps = components(model)
    (embed,), (head,) = comps["embed"].tensors, comps["lm_head"].tensors
    assert embed.param != head.param
    assert model.get_parameter(embed.param) is model.get_parameter(head.param)


def test_untied_embeddings_are_distinct():
    model = tiny_model("llama")
    comps = components(model)
    assert model.get_parameter(comps["embed"].tensors[0].param) is not model.get_parameter(
        comps["lm_head"].tensors[0].param
    )


def test_unknown_model_type():
    with pytest.raises(UnsupportedArchitecture) as err:
        adapter_for(GPT2Config())
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "'gpt2'" in message
    assert all(f in message for f in SUPPORTED_FAMILIES)


def test_missing_table_entry_is_a_clear_error():
    model = meta_model("llama")
    del model.model.norm
    expected = r"llama adapter: no module for 'final_norm' at any of \['model.norm'\]"
    with pytest.raises(ArchitectureMismatch, match=expected):
        components(model)
    model = meta_model("gptj")
    del model.transformer.h[1].mlp.fc_in
    with pytest.raises(ArchitectureMismatch, match=r"'blocks.1.mlp.up'.*under 'transformer.h.1'"):
        components(model)


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = (m.get_parameter("model.layers.0.self_attn.q_proj.weight") for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not a.training
    assert tiny_model("gpt_neo", dtype=torch.bfloat16).get_parameter("lm_head.weight").dtype == torch.bfloat16
