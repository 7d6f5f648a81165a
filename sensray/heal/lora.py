"""LoRA adapters through peft, on the linear layers that sensray target patterns select.

    modules = lora_modules(model, ["blocks.*"])       # ['model.layers.0.self_attn.q_proj', ...]
    peft_model = add_adapters(model, LoraSpec(r=8), modules)
    model = merged(peft_model)                        # a plain transformers model again

Targets are the same patterns a sweep takes (`blocks.*.attn.q`, `blocks.0-3.mlp.*`), resolved
through the architecture table, so no layer path is written per family. A fused q/k/v view
(BLOOM, NeoX, Falcon) adapts its whole fused layer: an adapter cannot add to some rows only.
"""

from __future__ import annotations

from torch import nn

from sensray.errors import SpecError


def lora_modules(model: nn.Module, targets: list[str], key: str = "lora.targets") -> list[str]:
    """HF module paths of the linear layers the patterns select, in model order, each once."""
    from sensray.targets import TargetError, select

    found: dict[str, None] = {}
    for i, pattern in enumerate(targets):
        try:
            refs = select(model, pattern).tensors
        except TargetError as err:
            raise SpecError(f"{key}[{i}]", str(err)) from None
        linear = [ref.param.rsplit(".", 1)[0] for ref in refs if ref.name.endswith("weight")]
        linear = [name for name in linear if isinstance(model.get_submodule(name), nn.Linear)]
        if not linear:
            raise SpecError(f"{key}[{i}]", f"{pattern!r} selects no linear layer to adapt; e.g. 'blocks.*' or "
                                           "'blocks.*.attn.q'")
        found.update(dict.fromkeys(linear))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(found, key=order.__getitem__)


def add_adapters(model: nn.Module, spec, modules: list[str]) -> nn.Module:
    """The model wrapped by peft: base weights frozen, one trainable adapter per module."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=modules,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merged(model: nn.Module) -> nn.Module:
    """W + (alpha / r) B A written into each adapted weight; the adapters removed. This makes the
    pruned weights of an adapted matrix nonzero: the caller re-applies the pruning mask."""
    return model.merge_and_unload()
