"""The table of families: canonical component names -> Hugging Face module paths.

One job: say, for every supported ``config.model_type``, where each canonical
component (``embed``, ``blocks.{i}.attn.q``, ``blocks.{i}.mlp.down``,
``lm_head``, ...; the scheme is in :mod:`sensray.architectures`) lives in the
family's module tree, and for fused families how the ``query_key_value`` rows
split into q, k and v.  Resolving a model against its table (components, views,
meta models, errors naming the paths tried) is :mod:`sensray.architectures`.

Adding a family
---------------
Append an :class:`Adapter` to ``_TABLES``: the candidate paths of the
decoder-layer ModuleList (``blocks``), the top-level slots before (``top``) and
after (``tail``) the blocks, and the per-block slots relative to one layer
(``block``), each ``_s(kind, *candidate paths)``; ``_group(kind)`` where HF
has no module for a component (OPT's MLP).  A fused family names
``attn.qkv`` instead of ``attn.q/k/v`` and gives ``qkv_layout`` (config ->
:class:`QKVLayout`).  Set ``model_types`` if ``config.model_type`` differs
from the family name.  Then add the family to ``sensray.testing`` and check it
with ``python -m pytest tests/test_architectures.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "BLOCK_ORDER",
    "SUPPORTED_FAMILIES",
    "TAIL_ORDER",
    "TOP_ORDER",
    "Adapter",
    "QKVLayout",
    "Slot",
    "UnsupportedArchitecture",
    "adapter_for",
]


class UnsupportedArchitecture(ValueError):
    """The model's ``config.model_type`` has no adapter table here."""


# --------------------------------------------------------------------------- #
# Fused q/k/v layout
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class QKVLayout:
    """Output rows of a fused qkv Linear: ``(groups, (q_per_group + 2) * head_dim)``.

    Each group is ``q_per_group`` query heads, then one key head, then one
    value head (see the docstring of sensray.architectures for which family uses which numbers).
    """

    groups: int
    q_per_group: int
    head_dim: int

    @property
    def rows_per_group(self) -> int:
        return (self.q_per_group + 2) * self.head_dim

    @property
    def rows(self) -> int:
        return self.groups * self.rows_per_group

    def span(self, part: str) -> tuple[int, int]:
        """(start, length) of ``part`` ("q", "k" or "v") inside one group."""
        q_rows = self.q_per_group * self.head_dim
        spans = {"q": (0, q_rows), "k": (q_rows, self.head_dim), "v": (q_rows + self.head_dim, self.head_dim)}
        return spans[part]


def _heads(config: Any) -> tuple[int, int]:
    heads = config.num_attention_heads  # BloomConfig maps this onto n_head
    return heads, config.hidden_size // heads


def _interleaved_qkv(config: Any) -> QKVLayout:
    # BLOOM (_reshape: view(..., num_heads, 3, head_dim)), GPT-NeoX (view(..., -1,
    # 3 * head_size).chunk(3)) and classic Falcon: per head [q | k | v].
    heads, head_dim = _heads(config)
    return QKVLayout(groups=heads, q_per_group=1, head_dim=head_dim)


def _falcon_qkv(config: Any) -> QKVLayout:
    # Mirrors FalconAttention._split_heads, branch for branch and in its order
    # (new_decoder_architecture wins over multi_query).
    heads, head_dim = _heads(config)
    if config.new_decoder_architecture:
        # view(..., -1, num_heads // num_kv_heads + 2, head_dim): per kv group
        # its query heads, then [-2] = key, [-1] = value.
        kv = config.num_kv_heads
        return QKVLayout(groups=kv, q_per_group=heads // kv, head_dim=head_dim)
    if config.multi_query:
        # view(..., num_heads + 2, head_dim): all query heads, one k, one v.
        return QKVLayout(groups=1, q_per_group=heads, head_dim=head_dim)
    return _interleaved_qkv(config)


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Slot:
    """One table row: a canonical kind and where HF keeps it.

    ``paths`` are candidates relative to the model (top level) or to the
    decoder layer (per block), tried in order; the first that is a module wins.
    ``group``: HF has no module for this component; it is the union of its
    member leaves (kinds ``<kind>.*``) and its module is the decoder layer.
    """

    kind: str
    paths: tuple[str, ...] = ()
    required: bool = True
    group: bool = False


def _s(kind: str, *paths: str, required: bool = True) -> Slot:
    return Slot(kind, paths, required)


def _group(kind: str) -> Slot:
    return Slot(kind, (), True, group=True)


@dataclass(frozen=True)
class Adapter:
    """The table for one family."""

    family: str
    blocks: tuple[str, ...]  # candidate paths of the decoder-layer ModuleList
    top: tuple[Slot, ...]  # top-level components before the blocks
    block: tuple[Slot, ...]  # per-block components, relative to the layer
    tail: tuple[Slot, ...]  # top-level components after the blocks
    # For fused families: config -> row layout of the ``attn.qkv`` Linear, from
    # which the attn.q / attn.k / attn.v views are derived.  None = separate
    # q/k/v modules in the table.
    qkv_layout: Callable[[Any], QKVLayout] | None = None
    model_types: tuple[str, ...] = ()  # config.model_type values; default (family,)

    @property
    def fused(self) -> bool:
        return self.qkv_layout is not None

    @property
    def gated(self) -> bool:
        return any(s.kind == "mlp.gate" for s in self.block)


_LLAMA = Adapter(
    family="llama",
    blocks=("model.layers",),
    top=(_s("embed", "model.embed_tokens"),),
    block=(
        _s("norm1", "input_layernorm"),
        _s("attn", "self_attn"),
        _s("attn.q", "self_attn.q_proj"),
        _s("attn.k", "self_attn.k_proj"),
        _s("attn.v", "self_attn.v_proj"),
        _s("attn.o", "self_attn.o_proj"),
        _s("norm2", "post_attention_layernorm"),
        _s("mlp", "mlp"),
        _s("mlp.gate", "mlp.gate_proj"),
        _s("mlp.up", "mlp.up_proj"),
        _s("mlp.down", "mlp.down_proj"),
    ),
    tail=(_s("final_norm", "model.norm"), _s("lm_head", "lm_head")),
)

_TABLES: tuple[Adapter, ...] = (
    _LLAMA,
    # Mistral's module tree is Llama's (sliding window is attention maths only).
    dataclasses.replace(_LLAMA, family="mistral"),
    Adapter(
        family="gpt_neo",
        blocks=("transformer.h",),
        top=(_s("embed", "transformer.wte"), _s("pos_embed", "transformer.wpe")),
        block=(
            _s("norm1", "ln_1"),
            # GPTNeoAttention is a wrapper; the projections live one level down
            # in GPTNeoSelfAttention (global or local, same parameters).
            _s("attn", "attn"),
            _s("attn.q", "attn.attention.q_proj"),
            _s("attn.k", "attn.attention.k_proj"),
            _s("attn.v", "attn.attention.v_proj"),
            _s("attn.o", "attn.attention.out_proj"),
            _s("norm2", "ln_2"),
            _s("mlp", "mlp"),
            _s("mlp.up", "mlp.c_fc"),
            _s("mlp.down", "mlp.c_proj"),
        ),
        tail=(_s("final_norm", "transformer.ln_f"), _s("lm_head", "lm_head")),
    ),
    Adapter(
        family="gptj",
        blocks=("transformer.h",),
        top=(_s("embed", "transformer.wte"),),
        block=(
            # Parallel attention + MLP both read ln_1: GPT-J has no norm2.
            _s("norm1", "ln_1"),
            _s("attn", "attn"),
            _s("attn.q", "attn.q_proj"),
            _s("attn.k", "attn.k_proj"),
            _s("attn.v", "attn.v_proj"),
            _s("attn.o", "attn.out_proj"),
            _s("mlp", "mlp"),
            _s("mlp.up", "mlp.fc_in"),
            _s("mlp.down", "mlp.fc_out"),
        ),
        tail=(_s("final_norm", "transformer.ln_f"), _s("lm_head", "lm_head")),
    ),
    Adapter(
        family="opt",
        blocks=("model.decoder.layers",),
        top=(
            _s("embed", "model.decoder.embed_tokens"),
            _s("pos_embed", "model.decoder.embed_positions"),
            # project_in/out exist only when word_embed_proj_dim != hidden_size
            # (OPT-350m); otherwise the attributes are None.
            _s("proj_in", "model.decoder.project_in", required=False),
        ),
        block=(
            _s("norm1", "self_attn_layer_norm"),
            _s("attn", "self_attn"),
            _s("attn.q", "self_attn.q_proj"),
            _s("attn.k", "self_attn.k_proj"),
            _s("attn.v", "self_attn.v_proj"),
            _s("attn.o", "self_attn.out_proj"),
            # The layer's "final_layer_norm" is the MLP's norm, not the model's.
            _s("norm2", "final_layer_norm"),
            # No MLP module: fc1/fc2 are direct children of the decoder layer.
            _group("mlp"),
            _s("mlp.up", "fc1"),
            _s("mlp.down", "fc2"),
        ),
        tail=(
            # None in post-LN checkpoints (do_layer_norm_before=False: OPT-350m).
            _s("final_norm", "model.decoder.final_layer_norm", required=False),
            _s("proj_out", "model.decoder.project_out", required=False),
            _s("lm_head", "lm_head"),
        ),
    ),
    Adapter(
        family="bloom",
        blocks=("transformer.h",),
        top=(
            _s("embed", "transformer.word_embeddings"),
            _s("embed_norm", "transformer.word_embeddings_layernorm"),
        ),
        block=(
            _s("norm1", "input_layernorm"),
            _s("attn", "self_attention"),
            _s("attn.qkv", "self_attention.query_key_value"),
            _s("attn.o", "self_attention.dense"),
            _s("norm2", "post_attention_layernorm"),
            _s("mlp", "mlp"),
            _s("mlp.up", "mlp.dense_h_to_4h"),
            _s("mlp.down", "mlp.dense_4h_to_h"),
        ),
        tail=(_s("final_norm", "transformer.ln_f"), _s("lm_head", "lm_head")),
        qkv_layout=_interleaved_qkv,
    ),
    Adapter(
        family="gpt_neox",
        blocks=("gpt_neox.layers",),
        top=(_s("embed", "gpt_neox.embed_in"),),
        block=(
            _s("norm1", "input_layernorm"),
            _s("attn", "attention"),
            _s("attn.qkv", "attention.query_key_value"),
            _s("attn.o", "attention.dense"),
            # Present whether or not use_parallel_residual is set.
            _s("norm2", "post_attention_layernorm"),
            _s("mlp", "mlp"),
            _s("mlp.up", "mlp.dense_h_to_4h"),
            _s("mlp.down", "mlp.dense_4h_to_h"),
        ),
        tail=(
            _s("final_norm", "gpt_neox.final_layer_norm"),
            # transformers 5 renamed the head embed_out -> lm_head (checkpoints
            # are converted on load); older releases still say embed_out.
            _s("lm_head", "lm_head", "embed_out"),
        ),
        qkv_layout=_interleaved_qkv,
    ),
    Adapter(
        family="falcon",
        blocks=("transformer.h",),
        top=(_s("embed", "transformer.word_embeddings"),),
        block=(
            # Which norms exist depends on the config:
            #   parallel_attn=False                 input_layernorm + post_attention_layernorm
            #   parallel_attn, 2 lns (new arch)     ln_attn + ln_mlp
            #   parallel_attn, 1 ln (falcon-7b)     input_layernorm only (no norm2)
            _s("norm1", "input_layernorm", "ln_attn"),
            _s("attn", "self_attention"),
            _s("attn.qkv", "self_attention.query_key_value"),
            _s("attn.o", "self_attention.dense"),
            _s("norm2", "post_attention_layernorm", "ln_mlp", required=False),
            _s("mlp", "mlp"),
            _s("mlp.up", "mlp.dense_h_to_4h"),
            _s("mlp.down", "mlp.dense_4h_to_h"),
        ),
        tail=(_s("final_norm", "transformer.ln_f"), _s("lm_head", "lm_head")),
        qkv_layout=_falcon_qkv,
    ),
)

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(a.family for a in _TABLES)

_BY_MODEL_TYPE: dict[str, Adapter] = {mt: a for a in _TABLES for mt in (a.model_types or (a.family,))}

# Fixed order of per-block kinds, so every family lists components alike
# whatever order its table row happens to be written in.
BLOCK_ORDER = (
    "block", "norm1", "attn", "attn.qkv", "attn.q", "attn.k", "attn.v", "attn.o",
    "norm2", "mlp", "mlp.gate", "mlp.up", "mlp.down",
)  # fmt: skip
TOP_ORDER = ("embed", "pos_embed", "embed_norm", "proj_in")
TAIL_ORDER = ("final_norm", "proj_out", "lm_head")


def adapter_for(config: Any) -> Adapter:
    """The adapter for ``config.model_type`` (a model is accepted too)."""
    model_type = getattr(config, "model_type", None)
    if model_type is None and hasattr(config, "config"):
        model_type = getattr(config.config, "model_type", None)
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture: model_type {model_type!r}; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        ) from None
