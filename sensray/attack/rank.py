"""One step of the progressive bit search before any trial: rank candidate flips by predicted damage.

    request = {"target": "**", "field": "mantissa", "bit": None, "per_tensor": 1, "evaluate": 16,
               "finite_only": False, "exclude": [[tensor, index, bit], ...], "checkpoint": False}
    candidates = rank(model, batches, request)      # best first: tensor, index, coords, bit, old, new, predicted

One backward pass of the attack text's mean NLL (sensray.saliency.gradients: each gradient consumed
by a hook and freed). In every selected tensor, each allowed bit of each element is scored by its
predicted loss increase g * (w_flipped - w) (sensray.saliency.flips: only flips whose direction
agrees with the gradient's sign score above zero, BFA's rule). A quantized weight's codes and its
statistics (scales, and with double quantization their codes, scales, offset and table) are tensors of
their own, each bit scored through the chain rule (sensray.quantized.gradients). The `per_tensor` best of each tensor
are BFA's in-layer search, the `evaluate` best of those overall go to the exact evaluation (the
cross-layer search), which the driver runs as ordinary bitflip trials on the replica pool.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn

from sensray.architectures import TensorRef
from sensray.quantized.gradients import spaces_of
from sensray.saliency.flips import best_flips
from sensray.saliency.gradients import backward_pass
from sensray.targets import select


def rank(model: nn.Module, batches: list[torch.Tensor], request: dict[str, Any]) -> list[dict[str, Any]]:
    refs = _refs_by_parameter(model, request["target"])
    exclude: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for tensor, index, bit in request.get("exclude", ()):
        exclude[tensor].add((int(index), int(bit)))
    found: list[dict[str, Any]] = []

    def consume(name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        if name not in refs:
            return
        spaces = spaces_of(model, name, weight, grad, refs[name])
        for ref in refs[name]:
            space = spaces[ref.name]
            bits = space.bits(request.get("field"), request.get("bit"))
            if not bits:  # a field this storage lacks (mantissa of int8 codes): other tensors have it
                continue
            top = best_flips(space, bits, request["per_tensor"], request.get("finite_only", False),
                             exclude.get(ref.name, set()))
            for row in top.rows():
                coords = [int(c) for c in np.unravel_index(row["index"], space.shape)]
                found.append({"tensor": ref.name, **row, "coords": coords})

    backward_pass(model, batches, consume, request.get("checkpoint", False))
    found.sort(key=lambda c: -c["predicted"])  # stable: ties keep the backward's (deterministic) order
    return found[: request["evaluate"]]


def _refs_by_parameter(model: nn.Module, target: str) -> dict[str, list[TensorRef]]:
    """parameter name (as backward_pass names it) -> the selected tensors (views, statistics) stored in it."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    out: dict[str, list[TensorRef]] = defaultdict(list)
    for ref in select(model, target).tensors:
        out[names[id(model.get_parameter(ref.param))]].append(ref)
    return dict(out)
