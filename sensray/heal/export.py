"""The end of a heal: merge, put the pruning mask back, measure, and write a standard HF directory.

    <output dir>/
        config.json, model.safetensors, tokenizer files    (loads with AutoModelForCausalLM)
        sensray-heal.json      recipe, steps, loss curve, eval ppl before and after, sparsity, provenance
        loss-curve.png         the training loss per step

A LoRA merge adds B·A to every weight of an adapted matrix, the pruned ones too (measured: all of
them become nonzero), so the mask is applied again after the merge and the record says how many
weights it zeroed; `masked` fine-tuning never moves them (that count is 0, and a test holds it).
The sparsity written out is counted from the exported tensors, per tensor, like sensray-prune.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensray.errors import SensrayError
from sensray.heal.masks import HEAL_RECORD, achieved, block_matrices, reapply

FIGURE = "loss-curve.png"


def eval_batches_for(recipe, tokenizer, device: torch.device) -> list[torch.Tensor]:
    from sensray.data import eval_batches

    return [batch.to(device) for batch in eval_batches(recipe.eval, tokenizer)]


def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """sensray's own perplexity (metrics.evaluate) with the model in eval mode (no dropout)."""
    from sensray.metrics import evaluate

    training = model.training
    model.eval()
    try:
        scores = evaluate(model, batches)
    finally:
        model.train(training)
    return {"ppl": scores.ppl, "nll": scores.nll, "tokens": scores.tokens}


def finish(ctx, model: nn.Module, tokenizer, curve, batches: list[torch.Tensor]) -> Path:
    """Merge (LoRA), re-mask, evaluate and write the export; returns its directory. `ctx`: heal.loop.Context."""
    from sensray.checksum import weights_checksum
    from sensray.heal.figure import loss_curves, png_bytes
    from sensray.heal.lora import merged
    from sensray.prune import write_model_dir

    recipe, masks = ctx.recipe, ctx.masks
    unmasked = None
    if recipe.method == "lora":
        model = merged(model)
        if masks:  # what re-applying the mask costs: the merged model's ppl before it (PERP's MaskLoRA avoids it)
            unmasked = perplexity(model, batches)["ppl"]
    model.eval()
    moved = reapply(model, masks)
    params = sorted(masks) if masks else [param for _, param in block_matrices(model)]
    sparsity = achieved(model, params)
    _check_mask(masks, model)
    after = perplexity(model, batches)
    if not math.isfinite(after["ppl"]):
        raise SensrayError(f"the healed model's eval perplexity is {after['ppl']} (training diverged after its last "
                           f"loss was measured): nothing exported; lower the learning rate ({recipe.peak_lr:g}), "
                           f"delete {ctx.work} and heal again")
    record = heal_record(ctx, curve, sparsity, moved, after | {"ppl_merged_unmasked": unmasked},
                         weights_checksum(model))
    note = f"eval ppl {ctx.before['ppl']:.4g} -> {after['ppl']:.4g} ({recipe.eval.corpus})"
    figure = loss_curves({recipe.method: curve}, f"healing {recipe.model.name} ({recipe.method})", note)
    out = Path(recipe.output_dir)
    write_model_dir(out, model, tokenizer, {HEAL_RECORD: json.dumps(record, indent=2) + "\n",
                                            FIGURE: png_bytes(figure)})
    return out


def _check_mask(masks: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Every masked weight is zero in what is about to be written (a bug, never a result, otherwise)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if bool((params[name].detach()[mask.to(params[name].device)] != 0).any()):
            raise SensrayError(f"{name}: pruned weights are nonzero after the mask was applied; nothing exported")


def heal_record(ctx, curve, sparsity: dict, moved: int, after: dict, checksum: str) -> dict[str, Any]:
    """What sensray-heal.json records."""
    import sensray
    from sensray.models import resolve_name

    recipe, pruning, held = ctx.recipe, ctx.pruning, ctx.held_at_zero
    return {
        "format": "sensray-heal/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sensray": sensray.__version__,
        "source": {"model": recipe.model.name, "resolved": resolve_name(recipe.model.name),
                   "weights_checksum": ctx.source_checksum, "pruning_record": pruning[0] if pruning else None},
        "plain_fine_tuning": not held,
        "recipe": recipe.resolved() | {"resumed": ctx.resumed},
        "trainable": ctx.trainable,
        "workers": ctx.workers,
        "steps": curve.done,
        "tokens_trained": curve.done * recipe.train.batch_size * recipe.train.seq_len,
        "loss_curve": curve.as_dict(),
        "eval": {"corpus": recipe.eval.corpus, "seq_len": recipe.eval.seq_len, "tokens": after["tokens"],
                 "ppl_before": ctx.before["ppl"], "ppl_after": after["ppl"],
                 "ppl_merged_unmasked": after["ppl_merged_unmasked"],
                 "nll_before": ctx.before["nll"], "nll_after": after["nll"]},
        "mask": {"source": _mask_source(recipe.mask, pruning, held), "tensors": len(sparsity["tensors"]),
                 "held_at_zero": held, "moved_then_rezeroed": moved},
        "achieved": sparsity,
        "pruning": pruning[1] if pruning else None,  # carried forward: healing this export again keeps the mask
        "seconds": curve.seconds,
        "weights_checksum": checksum,
    }


def _mask_source(mode: str, pruning, held: int) -> str:
    if not held:
        return "none: plain fine-tuning (no weight held at zero)"
    return "zeros: every zero of every block weight matrix" if mode == "zeros" else Path(pruning[0]).name
