"""Per-weight scores from gradients, reduced as they arrive to per-row sums and per-tensor top lists.

    scores = Scores(model, top_k=16)
    backward_pass(model, batches, scores.gradient)          # g: the mean NLL's gradient
    for window in windows:                                  # the Fisher diagonal, a window at a time
        backward_pass(model, [window], scores.fisher_consumer(tokens_in_window, len(windows)))
    scores.tensor_rows(), scores.row_rows(), scores.element_rows(), scores.flip_rows()

For a weight w with gradient g (of the mean NLL over all tokens):
    taylor      |g * w|                      the first-order damage of zeroing w (Molchanov et al.)
    zero_first  -g * w                       the signed first-order loss change of zeroing w
    fisher      F = mean over windows of n * g_window^2   (n tokens per window): the empirical Fisher
                diagonal, which approximates the Hessian diagonal of the mean NLL (n * g_w^2 estimates the
                mean per-token squared gradient when token gradients are independent)
    fisher_w2   F * w^2, so zero_second = fisher_w2 / 2 is the second-order term of zeroing w
    a flip      g * (w_flipped - w) for each bit (sensray.saliency.flips), the top ones per bitflip field

A quantized weight (bitsandbytes) is scored as the dequantized weight it encodes: w and g are that
weight and dL/dW (sensray.quantized.gradients). Its flips are flips of the stored codes, per field of
their format (int8: sign, magnitude, magnitude_msb), and of every statistic (scales; with double
quantization their codes, scales, offset and table), kept per statistic tensor.

Nothing per element is kept but the top lists: per output row (dim 0; each element of a 1-D tensor)
the sums, per tensor the `top_k` elements by Taylor score and the `top_k` flips per field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sensray.architectures import components
from sensray.quantized.storage import format_of, quantized_weights
from sensray.saliency.flips import FIELDS, FlipSpace, TopFlips, float_space, offer

SUMS = ("taylor", "zero_first", "grad_sq", "fisher", "fisher_w2")  # per-row sums


@dataclass
class Named:
    """A parameter's canonical name and place: `blocks.3.mlp.down.weight`, layer 3, module `mlp.down`."""

    name: str
    layer: int | None
    module: str


def canonical(model: nn.Module) -> dict[int, Named]:
    """id(parameter) -> its canonical name and place (the first name a tied parameter has)."""
    out: dict[int, Named] = {}
    for comp in components(model).values():
        for ref in comp.tensors:
            if not ref.whole:
                continue
            leaf = ref.name.rsplit(".", 1)[0] == comp.name  # blocks.3.mlp.down owns blocks.3.mlp.down.weight
            key = id(model.get_parameter(ref.param))
            if key not in out or (leaf and out[key].name == ref.name):
                out[key] = Named(ref.name, comp.layer, comp.kind)
    for name, param in model.named_parameters(remove_duplicate=True):
        out.setdefault(id(param), Named(name, None, name))  # a parameter no canonical component names
    return out


@dataclass
class TensorScores:
    """What is kept of one parameter's gradient."""

    named: Named
    param: str
    shape: tuple[int, ...]
    dtype: str  # the storage: a float dtype's name, or a quantized format (int8, nf4, fp4)
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # per output row, float64
    top: dict[str, np.ndarray] = field(default_factory=dict)  # the top elements by Taylor score
    flips: dict[str, TopFlips] = field(default_factory=dict)  # per bitflip field
    statistics: dict[str, dict[str, TopFlips]] = field(default_factory=dict)  # quantized: statistic -> field -> flips

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def add(self, name: str, values: torch.Tensor) -> None:
        """Add one per-element quantity to its per-row sums."""
        per_row = values.reshape(self.rows, -1).sum(dim=1, dtype=torch.float64).cpu().numpy()
        self.sums[name] = self.sums.get(name, 0.0) + per_row


class Scores:
    """Consumers for `backward_pass` that turn gradients into the saliency map."""

    def __init__(self, model: nn.Module, top_k: int = 16, fields: tuple[str, ...] = FIELDS, probes=None):
        self.model, self.top_k, self.fields, self.probes = model, top_k, fields, probes
        self.names = canonical(model)
        self.quantized = quantized_weights(model)  # weight name -> its bitsandbytes module
        self.order = {name: i for i, (name, _) in enumerate(model.named_parameters(remove_duplicate=True))}
        self.tensors: dict[str, TensorScores] = {}
        self.windows = 0

    def entries(self) -> list[TensorScores]:
        """Every parameter's scores in the model's order (they arrive in the backward's)."""
        return sorted(self.tensors.values(), key=lambda entry: self.order[entry.param])

    def _entry(self, param_name: str, weight: torch.Tensor) -> TensorScores:
        if param_name not in self.tensors:
            stored = self.model.get_parameter(param_name)
            module = self.quantized.get(param_name)
            dtype = format_of(module) if module is not None else str(stored.dtype).removeprefix("torch.")
            self.tensors[param_name] = TensorScores(self.names[id(stored)], param_name, tuple(weight.shape), dtype)
        return self.tensors[param_name]

    @property
    def seen_fields(self) -> tuple[str, ...]:
        """The bitflip fields some tensor's flips were kept for, in FIELDS' order."""
        seen = {name for entry in self.tensors.values() for name in entry.flips}
        return tuple(name for name in self.fields if name in seen)

    def gradient(self, param_name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        """Consumer of the main pass: Taylor sums, top elements, top flips per field."""
        entry = self._entry(param_name, weight)
        w, g = weight.float(), grad.float()
        gw = g * w
        entry.add("taylor", gw.abs())
        entry.add("zero_first", -gw)
        entry.add("grad_sq", g * g)
        taylor = gw.abs().flatten()
        k = min(self.top_k, taylor.numel())
        score, where = torch.topk(taylor, k)
        entry.top = {"index": where.cpu().numpy(), "taylor": score.double().cpu().numpy(),
                     "weight": w.flatten()[where].double().cpu().numpy(),
                     "grad": g.flatten()[where].double().cpu().numpy()}
        spaces = self._spaces(param_name, weight, grad)
        own = entry.named.name
        entry.flips = self._flips(spaces[own])
        entry.statistics = {name: self._flips(space) for name, space in spaces.items() if name != own}
        if self.probes is not None:
            self.probes.gradient(param_name, weight, grad, lambda: spaces)

    def _spaces(self, param_name: str, weight: torch.Tensor, grad: torch.Tensor) -> dict[str, FlipSpace]:
        """The weight's own flip space (under its canonical name) and, quantized, its statistics'."""
        module = self.quantized.get(param_name)
        name = self._entry(param_name, weight).named.name
        if module is None:
            return {name: float_space(name, weight, grad)}
        from sensray.quantized.gradients import code_spaces

        return code_spaces(module, name, grad)

    def _flips(self, space: FlipSpace) -> dict[str, TopFlips]:
        fields = [name for name in self.fields if space.fields.get(name)]
        tops = {name: TopFlips(self.top_k) for name in fields}
        if not fields:
            return tops
        for chunk in space.chunks():
            for bit in sorted({b for name in fields for b in space.fields[name]}):
                offered = offer(chunk, bit, self.top_k)  # once per bit, for every field that holds it
                for name in fields:
                    if bit in space.fields[name]:
                        tops[name].add(offered)
        return tops

    def fisher_consumer(self, tokens: int, windows: int):
        """Consumer of one window's pass: adds tokens * g^2 / windows to the Fisher sums."""
        self.windows += 1
        scale = tokens / windows

        def consume(param_name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
            entry = self._entry(param_name, weight)
            fisher = grad.float().square() * scale
            entry.add("fisher", fisher)
            entry.add("fisher_w2", fisher * weight.float().square())
            if self.probes is not None:
                self.probes.fisher(param_name, weight, grad, scale, lambda: self._spaces(param_name, weight, grad))

        return consume
