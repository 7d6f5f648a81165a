"""One step of the progressive bit search before any trial: rank candidate flips by predicted damage.

    request = {"target": "**", "field": "mantissa", "bit": None, "per_tensor": 1, "evaluate": 16,
               "finite_only": False, "exclude": [[tensor, index, bit], ...], "checkpoint": False}
    candidates = rank(model, batches, request)      # best first: tensor, index, coords, bit, old, new, predicted

One backward pass of the attack text's mean NLL (sensray.saliency.gradients: each gradient consumed
by a hook and freed). In every selected tensor, each allowed bit of each element is scored by its
predicted loss increase g * (w_flipped - w) (sensray.saliency.flips: only flips whose direction
agrees with the gradient's sign score above zero, BFA's rule); the `per_tensor` best of each tensor
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
from sensray.saliency.flips import best_flips, bits_of
from sensray.saliency.gradients import backward_pass, parameters
from sensray.targets import select


def rank(model: nn.Module, batches: list[torch.Tensor], request: dict[str, Any]) -> list[dict[str, Any]]:
    refs = _refs_by_parameter(model, request["target"])
    exclude: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for tensor, index, bit in request.get("exclude", ()):
        exclude[tensor].add((int(index), int(bit)))
    found: list[dict[str, Any]] = []

    def consume(name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        for ref in refs.get(name, ()):
            w, g = _view(ref, weight), _view(ref, grad)
            bits = bits_of(w.dtype, request.get("field"), request.get("bit"))
            top = best_flips(w.reshape(-1), g.reshape(-1), bits, request["per_tensor"],
                             request.get("finite_only", False), exclude.get(ref.name, set()))
            for row in top.rows():
                coords = [int(c) for c in np.unravel_index(row["index"], tuple(w.shape))]
                found.append({"tensor": ref.name, **row, "coords": coords})

    backward_pass(model, batches, consume, request.get("checkpoint", False))
    found.sort(key=lambda c: -c["predicted"])  # stable: ties keep the backward's (deterministic) order
    return found[: request["evaluate"]]


def _refs_by_parameter(model: nn.Module, target: str) -> dict[str, list[TensorRef]]:
    """parameter name (as backward_pass names it) -> the selected tensors (or views) stored in it."""
    chosen = select(model, target).tensors
    out: dict[str, list[TensorRef]] = {}
    for name, param in parameters(model):
        mine = [ref for ref in chosen if model.get_parameter(ref.param) is param]
        if mine:
            out[name] = mine
    return out


def _view(ref: TensorRef, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if ref.select is None else ref.select(tensor)
