"""Which weights a heal must keep at zero, keeping them there, and counting what came out.

    pruning = read_pruning("data/tiny-wanda50")      # its sensray-prune.json, or None
    masks = pruned_masks(model, pruning, "auto")       # HF parameter name -> bool (True: held at zero)
    handles = hold_at_zero(model, masks)              # `masked`: those weights get no gradient
    moved = reapply(model, masks)                     # after a LoRA merge: zero them again
    achieved(model, names)                            # zeros per tensor, as sensray-prune.json counts them

The mask is the model's zero pattern in the tensors its pruning record lists. A healed export
carries the record forward (in sensray-heal.json), so healing a healed model keeps the same mask.
Gradients are zeroed, not weights after each step (Wanda's dense fine-tuning does the same): with a
zero gradient AdamW leaves a zero weight at zero, so a weight that moved would be a bug, and the
export counts how many did instead of hiding them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensray.errors import SensrayError

PRUNE_RECORD = "sensray-prune.json"
HEAL_RECORD = "sensray-heal.json"


def read_pruning(model_name: str) -> tuple[str, dict[str, Any]] | None:
    """(file it came from, the pruning record) of a local model directory; None when it has none."""
    from sensray.models import resolve_name

    root = Path(resolve_name(model_name))
    for name, field in ((PRUNE_RECORD, None), (HEAL_RECORD, "pruning")):
        path = root / name
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise SensrayError(f"{path}: not a readable JSON record ({err})") from None
        record = record.get(field) if field else record
        if record is None:
            return None  # a healed model that was never pruned
        if not isinstance(record.get("achieved", {}).get("tensors"), dict):
            raise SensrayError(f"{path}: no achieved.tensors in its pruning record; is it a sensray export?")
        return str(path), record
    return None


def pruned_params(record: dict[str, Any]) -> list[str]:
    """HF parameter names the record pruned (a fused q/k/v view counts its whole parameter)."""
    return sorted({entry["param"] for entry in record["achieved"]["tensors"].values()})


def pruned_masks(model: nn.Module, pruning: tuple[str, dict] | None, mode: str) -> dict[str, torch.Tensor]:
    """HF parameter name -> bool tensor, True where the weight is held at zero."""
    if mode == "none" or (mode == "auto" and pruning is None):
        return {}
    names = pruned_params(pruning[1]) if mode == "auto" else [param for _, param in block_matrices(model)]
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise SensrayError(f"{pruning[0]}: lists {missing[0]}, which this model does not have")
    return {name: params[name].detach() == 0 for name in names}


def block_matrices(model: nn.Module) -> list[tuple[str, str]]:
    """(canonical name, HF parameter) of every weight matrix in the decoder blocks, each parameter once."""
    from sensray.perturbations.prune import matrices
    from sensray.targets import select

    refs = matrices(model, select(model, "blocks.*").tensors, "blocks.*")
    first: dict[str, str] = {}
    for ref in refs:
        first.setdefault(ref.param, ref.name)
    return [(name, param) for param, name in first.items()]


def hold_at_zero(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Zero the gradient of every masked weight as autograd produces it; returns the hook handles."""
    params = dict(model.named_parameters())
    handles = []
    for name, mask in masks.items():
        keep = (~mask).to(params[name].dtype)
        handles.append(params[name].register_hook(lambda grad, keep=keep: grad * keep.to(grad.device)))
    return handles


@torch.no_grad()
def reapply(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Zero every masked weight again; returns how many of them had moved away from zero."""
    params = dict(model.named_parameters())
    moved = 0
    for name, mask in masks.items():
        live = params[name]
        mask = mask.to(live.device)
        moved += int((live[mask] != 0).sum())
        live.masked_fill_(mask, 0)
    return moved


def achieved(model: nn.Module, params: list[str]) -> dict[str, Any]:
    """Zeros per canonical tensor and overall, in sensray-prune.json's `achieved` layout."""
    canonical = {param: name for name, param in block_matrices(model)}
    live = dict(model.named_parameters())
    tensors, zeros, total = {}, 0, 0
    for param in params:
        tensor = live[param].detach()
        count = int((tensor == 0).sum())
        zeros, total = zeros + count, total + tensor.numel()
        tensors[canonical.get(param, param)] = {"param": param, "shape": list(tensor.shape), "zeros": count,
                                                "sparsity": count / tensor.numel()}
    return {"overall": zeros / total if total else 0.0, "zeros": zeros, "weights": total, "tensors": tensors}
