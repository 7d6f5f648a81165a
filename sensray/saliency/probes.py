"""Predictions for the exact perturbations a finished sweep's trials made, from the same gradient passes.

    probes = Probes(model, rows)                 # one probe per trial row that can be predicted
    scores = Scores(model, probes=probes)        # the saliency passes feed the probes too
    probes.predictions()                         # per row: first, second, predicted (nats of NLL)

A trial changes weights by some Delta. The loss change it predicts to second order is

    first  = sum g * Delta                       (the gradient of the mean NLL, main pass)
    second = 1/2 sum F * Delta^2                 (F: the empirical Fisher diagonal, window passes)

Delta is known without storing it: element edits (bit flips, `zero`) list every changed element in the
row's `changes` (old and new values; on a quantized model the dequantized weight's, or a statistic's own
value with its gradient by the chain rule, sensray.quantized.gradients), and whole-tensor kinds are
recomputed from their parameters while each tensor's gradient passes through the hook: ablation `zero` (-w) and `mean` (the tensor's
mean, rounded to its dtype, minus w), and `noise` (the draw regenerated from the trial's seed and the
tensor's name exactly as sensray.perturbations.noise draws it). A non-finite Delta predicts +inf. Rows
of other kinds (skip ablation, prune) get no prediction and are counted as such.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from sensray.architectures import TensorRef
from sensray.perturbations.base import keyed_torch_generator
from sensray.perturbations.noise import _draw  # the noise kind's own draw: the same numbers, by construction
from sensray.targets import select

Direction = Callable[[torch.Tensor], torch.Tensor]  # live tensor (view) -> Delta, float32


@dataclass
class _Elements:
    probe: np.ndarray  # probe (row) of each change
    index: np.ndarray  # flat index into the tensor (view)
    delta: np.ndarray  # new - old, float64


class Probes:
    def __init__(self, model: nn.Module, rows: list[dict[str, Any]]):
        self.model = model
        self.first = np.zeros(len(rows))
        self.second = np.zeros(len(rows))
        self.size = np.zeros(len(rows))  # sum Delta^2: the control (how big the change was)
        self.predictable = np.zeros(len(rows), dtype=bool)
        self.refs: dict[str, TensorRef] = {}
        self._elements: dict[str, list[tuple[int, int, float]]] = defaultdict(list)  # tensor name -> changes
        self.directions: dict[str, list[tuple[int, TensorRef, Direction]]] = defaultdict(list)  # param -> ...
        for i, row in enumerate(rows):
            self.predictable[i] = self._add(i, row)
        self.elements = self._grouped()

    # -- building ---------------------------------------------------------------------------------

    def _add(self, i: int, row: dict[str, Any]) -> bool:
        if row.get("error") is not None:
            return False
        if row.get("changes"):
            for change in row["changes"]:
                self._elements[change["tensor"]].append((i, change["index"], _delta(change)))
            return True
        direction = _direction(row)
        if direction is None or not row.get("tensors"):
            return False
        for touched in row["tensors"]:
            ref = self._ref(touched["tensor"])
            self.directions[ref.param].append((i, ref, direction(touched["tensor"])))
        return True

    def _ref(self, name: str) -> TensorRef:
        if name not in self.refs:
            self.refs[name] = next(r for r in select(self.model, name).tensors if r.name == name)
        return self.refs[name]

    def _grouped(self) -> dict[str, list[tuple[TensorRef, _Elements]]]:
        """param name -> [(the tensor (view) the changes index, its changes as arrays)]."""
        out: dict[str, list[tuple[TensorRef, _Elements]]] = defaultdict(list)
        for name, changes in self._elements.items():
            ref = self._ref(name)
            probe, index, delta = (np.array(x) for x in zip(*changes))
            out[ref.param].append((ref, _Elements(probe.astype(np.int64), index.astype(np.int64), delta.astype(float))))
        return out

    # -- consumers (called by sensray.saliency.scores.Scores) -------------------------------------------

    def gradient(self, param_name: str, weight: torch.Tensor, grad: torch.Tensor,
                 spaces: Callable[[], dict] = dict) -> None:
        """`spaces()`: the flip spaces of this parameter's tensors (sensray.saliency.scores), asked only for the
        gradient of a quantized weight's statistics (a changed scale is an element of its own tensor)."""
        for changes, g in self._element_gradients(param_name, grad, spaces):
            np.add.at(self.first, changes.probe, _product(g, changes.delta))
            np.add.at(self.size, changes.probe, changes.delta ** 2)
        for i, ref, direction in self.directions.get(param_name, ()):
            delta = direction(_view(ref, weight)).double()
            self.first[i] += float((_view(ref, grad).double() * delta).sum())
            self.size[i] += float(delta.square().sum())

    def fisher(self, param_name: str, weight: torch.Tensor, grad: torch.Tensor, scale: float,
               spaces: Callable[[], dict] = dict) -> None:
        for changes, g in self._element_gradients(param_name, grad, spaces):
            np.add.at(self.second, changes.probe, 0.5 * scale * _product(g * g, changes.delta ** 2))
        for i, ref, direction in self.directions.get(param_name, ()):
            delta = direction(_view(ref, weight)).double()
            self.second[i] += 0.5 * scale * float((_view(ref, grad).double().square() * delta.square()).sum())

    def _element_gradients(self, param_name: str, grad: torch.Tensor, spaces: Callable[[], dict]):
        """(changes, d loss / d value at each changed element) for each changed tensor of this parameter."""
        changed = self.elements.get(param_name, ())
        known = spaces() if any(ref.part is not None for ref, _ in changed) else None
        return [(changes, _gradient_at(ref, grad, changes, known)) for ref, changes in changed]

    def predictions(self, fisher: bool) -> dict[str, np.ndarray]:
        """Per row: first, second (NaN without Fisher passes) and their sum; NaN where nothing predicts."""
        none = ~self.predictable
        first = np.where(none, np.nan, self.first)
        second = np.where(none | (not fisher), np.nan, self.second)
        return {"first": first, "second": second, "predicted": first + np.nan_to_num(second, nan=0.0)}

    @property
    def magnitude(self) -> np.ndarray:
        """Per row: the norm of the weight change, sqrt(sum Delta^2) (NaN where nothing predicts)."""
        return np.where(self.predictable, np.sqrt(self.size), np.nan)


def _view(ref: TensorRef, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if ref.select is None else ref.select(tensor)


def _gradient_at(ref: TensorRef, grad: torch.Tensor, changes: _Elements, spaces: dict | None) -> np.ndarray:
    """d loss / d value at the changed elements: of the weight (view), or of a quantized statistic."""
    flat = _view(ref, grad).reshape(-1) if ref.part is None else spaces[ref.name].grad
    return flat[torch.as_tensor(changes.index, device=flat.device)].double().cpu().numpy()


def _delta(change: dict[str, Any]) -> float:
    old, new = change["old"], change["new"]
    return new - old if math.isfinite(old) and math.isfinite(new) else math.inf


def _product(g: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """g * delta, with a non-finite delta (a weight turned inf or NaN) predicting +inf whatever g is."""
    out = g * np.where(np.isfinite(delta), delta, 0.0)
    return np.where(np.isfinite(delta), out, np.inf)


def _direction(row: dict[str, Any]) -> Callable[[str], Direction] | None:
    """name -> the Delta this row's trial wrote into that tensor, for the kinds that can be recomputed."""
    kind = row.get("kind")
    if kind == "ablation" and row.get("mode") in ("zero", "mean"):
        return lambda name: _ablated if row["mode"] == "zero" else _mean_ablated
    if kind == "noise":
        return lambda name: _noised(name, row)
    return None


def _ablated(w: torch.Tensor) -> torch.Tensor:
    return -w.float()


def _mean_ablated(w: torch.Tensor) -> torch.Tensor:
    return torch.full_like(w, w.float().mean().item()).float() - w.float()


def _noised(name: str, row: dict[str, Any]) -> Direction:
    """The noise kind's arithmetic on one tensor: draw keyed by (seed, name, dist), added in float32,
    rounded once to the weight's dtype."""

    def delta(w: torch.Tensor) -> torch.Tensor:
        draw = _draw(w.shape, row["dist"], keyed_torch_generator(row["seed"], "noise", name, row["dist"]))
        scale = row["sigma"] * (w.float().std().item() if row["relative"] else 1.0)
        return (w.float() + draw.to(w.device) * scale).to(w.dtype).float() - w.float()

    return delta
