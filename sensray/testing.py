"""Tiny random models of every supported family, built in-process (no Hub, no network).

For tests and examples: each is 2 layers, hidden 64, 4 heads, vocab 128, and
builds in well under a second on CPU.  Configs keep each family's real
structural quirks (GQA in Llama/Mistral, local+global attention in GPT-Neo,
ALiBi in BLOOM and falcon-rw-1b, partial rotary and parallel residual in
Pythia) so that code tested on them meets the same module layout as the real
checkpoints.

    model = tiny_model("falcon", new_decoder_architecture=True, num_kv_heads=2)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    GPTJConfig,
    GPTNeoConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
)

__all__ = ["FAMILIES", "tiny_config", "tiny_model"]

FAMILIES: tuple[str, ...] = ("llama", "mistral", "gpt_neo", "gptj", "opt", "bloom", "gpt_neox", "falcon")

_VOCAB, _HIDDEN, _LAYERS, _HEADS, _FFN, _POSITIONS = 128, 64, 2, 4, 128, 128

_LLAMA_LIKE = dict(
    vocab_size=_VOCAB,
    hidden_size=_HIDDEN,
    intermediate_size=_FFN,
    num_hidden_layers=_LAYERS,
    num_attention_heads=_HEADS,
    num_key_value_heads=2,  # GQA, as in the real 7B+/Mistral models: k/v narrower than q
    max_position_embeddings=_POSITIONS,
)

# family -> (config class, tiny settings).  Anything not set keeps the class default.
_TINY: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, _LLAMA_LIKE),
    "mistral": (MistralConfig, dict(_LLAMA_LIKE, sliding_window=64)),
    "gpt_neo": (
        GPTNeoConfig,
        dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            num_layers=_LAYERS,
            num_heads=_HEADS,
            intermediate_size=_FFN,
            max_position_embeddings=_POSITIONS,
            attention_types=[[["global", "local"], _LAYERS // 2]],  # one of each
            window_size=16,
            bos_token_id=_VOCAB - 1,  # GPT-2 tokenizer style: <|endoftext|> is the last id
            eos_token_id=_VOCAB - 1,
        ),
    ),
    "gptj": (
        GPTJConfig,
        dict(
            vocab_size=_VOCAB,
            n_embd=_HIDDEN,
            n_layer=_LAYERS,
            n_head=_HEADS,
            n_inner=_FFN,
            n_positions=_POSITIONS,
            rotary_dim=8,  # partial rotary, like GPT-J-6B (64 of 256 head dims)
            bos_token_id=_VOCAB - 1,  # GPT-2 tokenizer style: <|endoftext|> is the last id
            eos_token_id=_VOCAB - 1,
        ),
    ),
    "opt": (
        OPTConfig,
        dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            word_embed_proj_dim=_HIDDEN,  # != hidden_size gives OPT-350m's project_in/out
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            ffn_dim=_FFN,
            max_position_embeddings=_POSITIONS,
        ),
    ),
    "bloom": (BloomConfig, dict(vocab_size=_VOCAB, hidden_size=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS)),
    "gpt_neox": (
        GPTNeoXConfig,
        dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            intermediate_size=_FFN,
            max_position_embeddings=_POSITIONS,
        ),
    ),
    # falcon-rw-1b flavour: ALiBi, classic (interleaved, non-MQA) fused qkv,
    # sequential attention/MLP with two norms, biases.  Override
    # multi_query / new_decoder_architecture (+ num_kv_heads) / parallel_attn
    # for the 7B/40B layouts.
    "falcon": (
        FalconConfig,
        dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            ffn_hidden_size=_FFN,
            max_position_embeddings=_POSITIONS,
            alibi=True,
            new_decoder_architecture=False,
            multi_query=False,
            parallel_attn=False,
            bias=True,
        ),
    ),
}


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A tiny random config of ``family``; ``overrides`` are config fields."""
    try:
        cls, base = _TINY[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}") from None
    return cls(**{**base, **overrides})


def tiny_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config`` of :func:`tiny_config`, seeded, in eval mode.

    The seed is applied inside a forked RNG so the caller's global RNG state is
    left untouched.  Attention implementation stays the transformers default
    (all eight families run on CPU with it).
    """
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def apply_kind(model: torch.nn.Module, kind: str, **params: Any):
    """Perturb `model` in place as a trial would (parse, check, apply); returns the undo record (Edits)."""
    from sensray.perturbations import PERTURBATIONS

    perturbation = PERTURBATIONS.get(kind)
    parsed = perturbation.parse(params)
    perturbation.check(model, parsed)
    return perturbation.apply(model, parsed)
