"""Canonical component names for every supported causal-LM family.

Why this module exists
----------------------
Hugging Face models name the same thing differently in every family: the
query projection of layer 3 is ``model.layers.3.self_attn.q_proj`` in Llama,
``transformer.h.3.attn.attention.q_proj`` in GPT-Neo, and in BLOOM, GPT-NeoX
and Falcon it is not a module at all but a slice of the fused
``query_key_value`` Linear.  Sweep targets are written against *canonical*
names so that an experiment reads the same for every model, and this module
(with its table of families, :mod:`sensray.adapters`) is the only place that
knows how those names map onto a concrete model (the same idea as
TransformerLens' per-architecture adapters).

The scheme
----------
Components (a component is a module; its tensors are its parameters)::

    embed  [pos_embed]  [embed_norm]  [proj_in]           top level, before the blocks
    blocks.{i}                                            the whole decoder layer
    blocks.{i}.norm1                                      norm of the attention sub-layer
    blocks.{i}.attn                                       the attention module
    blocks.{i}.attn.qkv                                   fused families only: the fused Linear
    blocks.{i}.attn.q | .k | .v | .o                      projections (q/k/v: views when fused)
    blocks.{i}.norm2                                      norm of the MLP sub-layer, where one exists
    blocks.{i}.mlp                                        the MLP
    blocks.{i}.mlp.gate                                   gated (SwiGLU) families only
    blocks.{i}.mlp.up | .down
    [final_norm]  [proj_out]  lm_head                     top level, after the blocks

(``[...]``: only where the model has it.)  ``norm1``/``norm2`` are named by
the sub-layer they belong to, not by where they sit, so post-LN OPT-350m and
pre-LN OPT-1.3b read the same.

Canonical tensor names are ``<component>.<parameter local name>``, e.g.
``blocks.3.mlp.down.weight`` or ``blocks.3.attn.q.bias``.  The composite
components ``blocks.{i}``, ``blocks.{i}.attn`` and ``blocks.{i}.mlp`` list the
canonical tensors of the leaves they contain (``blocks.3`` lists
``blocks.3.attn.q.weight`` ...; in fused families it lists
``blocks.3.attn.qkv.weight`` whole, never the q/k/v views, so every element is
listed exactly once), and raw ``<component>.<local name>`` for any parameter
no canonical leaf covers.

Fused q/k/v
-----------
In fused families ``attn.q``, ``attn.k`` and ``attn.v`` are *honest strided
views* of the fused ``query_key_value`` weight (and bias): exactly the output
rows whose products the modeling code uses as query, key and value, sharing
storage with the parameter, so an in-place edit of the view edits the model.
Every fused layout in these families is the same shape of thing: the output
rows form ``groups`` equal blocks, each holding ``q_per_group`` query heads
followed by one key head and one value head::

    rows = (groups, (q_per_group + 2) * head_dim)
    BLOOM, GPT-NeoX, Falcon (classic):  groups = num_heads,    q_per_group = 1
                                        -> per head [q | k | v], interleaved
    Falcon multi_query:                 groups = 1,            q_per_group = num_heads
                                        -> [all q heads | k | v]
    Falcon new_decoder_architecture:    groups = num_kv_heads, q_per_group = heads / kv_heads
                                        -> per kv group [q heads of the group | k | v]

A view has shape ``(groups, rows_per_group, *param.shape[1:])``: weight
``(groups, q_per_group * head_dim, in_features)`` for q and
``(groups, head_dim, in_features)`` for k/v; bias without the last dim.
``view.reshape(-1, in_features)`` (a copy, in general) is the conventional 2-D
projection matrix with rows in the model's own head order.  A 2-D strided view
is impossible whenever ``groups > 1`` because the rows of different groups are
not evenly spaced in one dimension.  ``tests/test_architectures.py`` checks
every layout against the modeling code.

Tied weights
------------
When input and output embeddings are tied, both ``embed`` and ``lm_head``
exist; their TensorRefs carry different parameter names but
``model.get_parameter`` returns the *same* Parameter object for both.  That is
deliberate: names stay canonical per component, and downstream code that must
not perturb or restore a tensor twice dedupes by Parameter identity.

Meta models
-----------
``components`` only inspects module structure and tensor shapes, never data,
so it works on a model built under ``torch.device("meta")``; sensray resolves
targets that way before loading weights.  ``TensorRef.resolve`` is what
touches the live tensor.

Versions
--------
Module paths move between transformers releases (GPT-NeoX's head was
``embed_out`` before it became ``lm_head``), so each table entry (in
:mod:`sensray.adapters`) lists
candidate paths that are resolved against the actual model with
``get_submodule``; a required entry that matches nothing raises
:class:`ArchitectureMismatch` naming the family, the canonical name and the
paths tried.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# The table of families lives in sensray.adapters (this module resolves a model against it); its public
# names are re-exported here, so `from sensray.architectures import adapter_for` keeps working.
from sensray.adapters import (  # noqa: F401 re-exported
    BLOCK_ORDER,
    SUPPORTED_FAMILIES,
    TAIL_ORDER,
    TOP_ORDER,
    Adapter,
    QKVLayout,
    Slot,
    UnsupportedArchitecture,
    adapter_for,
)

__all__ = [
    "SUPPORTED_FAMILIES",
    "Adapter",
    "ArchitectureMismatch",
    "Component",
    "QKVLayout",
    "FusedSlice",
    "Slot",
    "TensorRef",
    "UnsupportedArchitecture",
    "adapter_for",
    "components",
    "decoder_blocks",
    "num_blocks",
]


class ArchitectureMismatch(UnsupportedArchitecture):
    """The family is supported but the model's module tree does not match its table.

    Usually a transformers release moved a module; add the new path as another
    candidate in the family's table (sensray/adapters.py).
    """


# --------------------------------------------------------------------------- #
# Public records
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TensorRef:
    """One canonical tensor: a parameter, or a view of one (fused q/k/v)."""

    name: str  # canonical tensor name, e.g. "blocks.3.attn.q.weight"
    param: str  # HF parameter name, e.g. "model.layers.3.self_attn.q_proj.weight"
    # For fused q/k/v: maps the parameter's tensor to the view holding this
    # component's rows.  None = the whole parameter.
    select: Callable[[torch.Tensor], torch.Tensor] | None = None
    # A quantized weight's statistic ("scale", "scale2", ...: sensray/quantized/storage.py), stored
    # beside the parameter `param` (whose own data are the codes).  None = the parameter itself.
    part: str | None = None

    def resolve(self, model: nn.Module) -> torch.Tensor:
        """The live tensor (``param.data``, a view of it, or a quantization buffer); never a copy.

        In-place edits of the result edit the model.
        """
        if self.part is not None:
            from sensray.quantized.storage import part_tensor

            return part_tensor(model.get_submodule(self.param.rsplit(".", 1)[0]), self.part)
        data = parameter(model, self.param).data
        return data if self.select is None else self.select(data)

    @property
    def whole(self) -> bool:
        return self.select is None


_OWNERS: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[nn.Module, str]]]" = weakref.WeakKeyDictionary()


def parameter(model: nn.Module, name: str) -> nn.Parameter:
    """``model.get_parameter(name)``, with the owning module remembered per model: plans resolve the same
    names thousands of times and ``get_submodule`` walks the tree each time. The parameter itself is read
    from its module on every call, so a module's parameters can still be swapped."""
    owners = _OWNERS.setdefault(model, {})
    if name not in owners:
        path, _, local = name.rpartition(".")
        owners[name] = (model.get_submodule(path) if path else model, local)
    module, local = owners[name]
    found = module._parameters.get(local)
    return found if found is not None else model.get_parameter(name)  # not a plain parameter: HF's own error


@dataclass(frozen=True)
class Component:
    name: str  # "blocks.3.attn.q"
    # HF module path.  For fused q/k/v views this is the fused query_key_value
    # Linear; for a component HF has no module for (OPT's mlp: fc1/fc2 sit
    # directly on the decoder layer) it is the nearest enclosing module.  In
    # both cases ``exact_module`` is False: hooks on ``module`` see more than
    # this component, its ``tensors`` are authoritative.
    module: str
    tensors: tuple[TensorRef, ...]  # stable order; views carry ``select``
    layer: int | None  # block index, None for top-level components
    kind: str  # "embed", "block", "attn.q", "mlp.up", "norm2", "lm_head", ...
    exact_module: bool = True

    @property
    def is_view(self) -> bool:
        """True for fused q/k/v: its tensors are views, not whole parameters."""
        return any(not t.whole for t in self.tensors)


@dataclass(frozen=True)
class FusedSlice:
    """``TensorRef.select`` for fused q/k/v: a strided view, no copy.

    A frozen dataclass rather than a closure so that TensorRefs built from a
    meta model and from the loaded model compare equal and print readably.
    """

    part: str  # "q", "k" or "v"
    layout: QKVLayout

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        if t.shape[0] != lay.rows:
            raise ValueError(
                f"fused qkv tensor has {t.shape[0]} output rows, layout {lay} expects {lay.rows}"
            )
        start, length = lay.span(self.part)
        # view() splits dim 0 without copying; narrow() keeps it a view.
        return t.view(lay.groups, lay.rows_per_group, *t.shape[1:]).narrow(1, start, length)


_COMPOSITE = frozenset({"block", "attn", "mlp"})  # kinds whose tensors are other leaves'


# --------------------------------------------------------------------------- #
# Resolution
# --------------------------------------------------------------------------- #


def _find(root: nn.Module, paths: tuple[str, ...]) -> str | None:
    for path in paths:
        try:
            root.get_submodule(path)
        except AttributeError:  # missing, or an attribute that is None
            continue
        return path
    return None


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _mismatch(
    adapter: Adapter, model: nn.Module, what: str, paths: tuple[str, ...], under: str = ""
) -> ArchitectureMismatch:
    import transformers

    where = f" under {under!r}" if under else ""
    return ArchitectureMismatch(
        f"{adapter.family} adapter: no module for {what!r} at any of {list(paths)}{where} in "
        f"{type(model).__name__} (transformers {transformers.__version__}); "
        "update the table in sensray/adapters.py"
    )


def _blocks_path(model: nn.Module, adapter: Adapter) -> str:
    path = _find(model, adapter.blocks)
    if path is None or not isinstance(model.get_submodule(path), nn.ModuleList):
        raise _mismatch(adapter, model, "blocks (ModuleList)", adapter.blocks)
    return path


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer ModuleList of ``model``."""
    adapter = adapter_for(model.config)
    return model.get_submodule(_blocks_path(model, adapter))


def num_blocks(model: nn.Module) -> int:
    return len(decoder_blocks(model))


def _leaf(model: nn.Module, name: str, module: str, layer: int | None, kind: str) -> Component:
    from sensray.quantized.storage import parts

    mod = model.get_submodule(module)
    refs = tuple(TensorRef(f"{name}.{local}", _join(module, local)) for local, _ in mod.named_parameters())
    # A quantized Linear (bitsandbytes) also stores its weight's statistics: weight.scale, ...
    stats = tuple(TensorRef(f"{name}.weight.{part}", _join(module, "weight"), part=part) for part in parts(mod))
    return Component(name, module, refs + stats, layer, kind)


def _fused_views(model: nn.Module, adapter: Adapter, qkv: Component) -> list[Component]:
    layout = adapter.qkv_layout(model.config)
    linear = model.get_submodule(qkv.module)
    if linear.weight.shape[0] != layout.rows:  # shapes exist on meta too
        raise ArchitectureMismatch(
            f"{adapter.family} adapter: {qkv.module}.weight has {linear.weight.shape[0]} output rows but "
            f"the qkv layout from the config ({layout}) needs {layout.rows}"
        )
    prefix = qkv.name.rsplit(".", 1)[0]  # "blocks.{i}.attn"
    out = []
    for part in ("q", "k", "v"):
        name = f"{prefix}.{part}"
        refs = tuple(
            TensorRef(f"{name}.{ref.name.rsplit('.', 1)[1]}", ref.param, FusedSlice(part, layout))
            for ref in qkv.tensors
        )
        out.append(Component(name, qkv.module, refs, qkv.layer, f"attn.{part}", exact_module=False))
    return out


def _ordered(comps: list[Component], order: tuple[str, ...]) -> list[Component]:
    return sorted(comps, key=lambda c: order.index(c.kind))


def _top_level(model: nn.Module, adapter: Adapter, slots: tuple[Slot, ...], order: tuple[str, ...]) -> list[Component]:
    out = []
    for slot in slots:
        path = _find(model, slot.paths)
        if path is None:
            if slot.required:
                raise _mismatch(adapter, model, slot.kind, slot.paths)
            continue
        out.append(_leaf(model, slot.kind, path, None, slot.kind))
    return _ordered(out, order)


def _block(model: nn.Module, adapter: Adapter, i: int, block_path: str) -> list[Component]:
    block_mod = model.get_submodule(block_path)
    prefix = f"blocks.{i}"
    found: dict[str, str] = {}  # kind -> module path, for slots with a module
    groups: list[Slot] = []
    for slot in adapter.block:
        if slot.group:
            groups.append(slot)
            continue
        rel = _find(block_mod, slot.paths)
        if rel is None:
            if slot.required:
                raise _mismatch(adapter, model, f"{prefix}.{slot.kind}", slot.paths, under=block_path)
            continue
        found[slot.kind] = _join(block_path, rel)

    leaves: list[Component] = []
    for kind, path in found.items():
        if kind in _COMPOSITE:
            continue
        comp = _leaf(model, f"{prefix}.{kind}", path, i, kind)
        leaves.append(comp)
        if kind == "attn.qkv":
            leaves.extend(_fused_views(model, adapter, comp))
    leaves = _ordered(leaves, BLOCK_ORDER)

    # Whole canonical tensors by parameter name (with a quantized weight's statistics, which share
    # its name).  Views are excluded, so a fused block lists attn.qkv.weight once instead of three
    # overlapping views.
    covering: dict[str, list[tuple[int, TensorRef]]] = {}
    for rank, comp in enumerate(leaves):
        for ref in comp.tensors:
            if ref.whole:
                covering.setdefault(ref.param, []).append((rank, ref))

    def composite(name: str, kind: str, module: str) -> Component:
        hits, raw = [], []
        for local, _ in model.get_submodule(module).named_parameters():
            param = _join(module, local)
            if param in covering:
                hits.extend(covering[param])
            else:
                raw.append(TensorRef(f"{name}.{local}", param))
        # Leaf order first (so blocks.3 reads norm1, attn.q, ...), then raw.
        hits.sort(key=lambda h: (h[0], leaves[h[0]].tensors.index(h[1])))
        return Component(name, module, tuple(r for _, r in hits) + tuple(raw), i, kind)

    out = [composite(prefix, "block", block_path)]
    for kind in ("attn", "mlp"):
        if kind in found:
            out.append(composite(f"{prefix}.{kind}", kind, found[kind]))
    for slot in groups:
        members = tuple(
            ref for c in leaves if c.kind.startswith(slot.kind + ".") for ref in c.tensors if ref.whole
        )
        out.append(Component(f"{prefix}.{slot.kind}", block_path, members, i, slot.kind, exact_module=False))
    return _ordered(out + leaves, BLOCK_ORDER)


def components(model: nn.Module) -> dict[str, Component]:
    """All canonical components of ``model`` that exist in it, in canonical order.

    Top-level components first (embed, pos_embed, embed_norm, proj_in), then
    each block in order (``blocks.{i}``, norm1, attn, [attn.qkv], attn.q/k/v/o,
    norm2, mlp, [mlp.gate], mlp.up, mlp.down), then final_norm, proj_out,
    lm_head.  Touches no tensor data, so a meta-device model works.
    """
    adapter = adapter_for(model.config)
    blocks_path = _blocks_path(model, adapter)
    out: list[Component] = _top_level(model, adapter, adapter.top, TOP_ORDER)
    for i in range(len(model.get_submodule(blocks_path))):
        out.extend(_block(model, adapter, i, f"{blocks_path}.{i}"))
    out.extend(_top_level(model, adapter, adapter.tail, TAIL_ORDER))

    result: dict[str, Component] = {}
    for comp in out:
        if comp.name in result:  # a table bug, not a model property
            raise ArchitectureMismatch(f"{adapter.family} adapter: duplicate canonical name {comp.name!r}")
        result[comp.name] = comp
    return result
