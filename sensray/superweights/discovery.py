"""Find super-weight candidates: coordinated activation spikes at each block's MLP down projection.

    from sensray.superweights.discovery import Thresholds, discover
    found = discover(model, windows)                       # windows: (n, seq_len) token ids
    found.candidates                                       # [Pair(layer=1, row=2533, col=7890, ...)]

Method (Yu et al. 2024, "The Super Weight in Large Language Models"): a super weight W[i, j] of
`blocks.L.mlp.down` (row i = output channel, column j = input channel) multiplies a massive
input activation x_j into a massive output activation y_i. Forward hooks on every block's down
projection (resolved through sensray.architectures, so any family works) record, over the
calibration tokens, each channel's largest |x_j| and |y_i|. For the output channels with the
largest peaks, the hook also keeps the input vector x at the token of the peak; there the
contribution W[i, j'] x_j' of every input channel is known exactly, and the largest one names j.

A pair (i, j) is a candidate when all three hold:
  - output spike: |y_i| at its peak >= min_magnitude and >= min_ratio x the layer's median
    channel maximum of |y|;
  - input spike at the same token: |x_j| >= min_magnitude and >= min_ratio x the median of |x|;
  - the one weight carries the spike: W[i, j] x_j >= min_share x y_i (same sign).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from sensray.architectures import components

TRACKED = 8  # output channels per layer whose peak token's input is kept (the largest peaks)


@dataclass(frozen=True)
class Thresholds:
    min_magnitude: float = 10.0  # T: a spike is at least this large in absolute value
    min_ratio: float = 20.0  # k: ... and at least k x the layer's median channel maximum
    min_share: float = 0.5  # the single weight supplies at least this share of the output spike


@dataclass(frozen=True)
class Pair:
    """An output channel's peak and the input channel that contributes most to it."""

    layer: int
    target: str  # canonical tensor, "blocks.1.mlp.down.weight"
    row: int  # coordinates in that tensor: [row, column] (output, input channel for nn.Linear)
    col: int
    output: float  # |y_i| at its peak token
    output_ratio: float  # ... / the layer's median channel max of |y|
    input: float  # |x_j| at that same token
    input_ratio: float  # ... / the layer's median channel max of |x|
    input_max: float  # |x_j| at its own peak over all tokens
    share: float  # W[i, j] x_j / y_i (the bias left out) at the peak token
    weight: float  # W[i, j]
    magnitude_rank: int  # how many elements of the tensor are larger in |value| (0 = the largest)
    window: int  # where the peak is: calibration window and position in it
    position: int
    token: int  # token id at that position
    candidate: bool

    @property
    def name(self) -> str:
        return f"{self.target.removesuffix('.weight')}[{self.row}, {self.col}]"

    @property
    def score(self) -> float:
        """How coordinated the spike is: the smaller of the two ratios."""
        return min(self.output_ratio, self.input_ratio)


@dataclass
class LayerActivations:
    layer: int
    target: str
    inputs: np.ndarray  # (in_features,) max |x_j| over the calibration tokens
    outputs: np.ndarray  # (out_features,) max |y_i|
    pairs: list[Pair] = field(default_factory=list)  # the tracked output channels, largest peak first

    @property
    def input_median(self) -> float:
        return float(np.median(self.inputs))

    @property
    def output_median(self) -> float:
        return float(np.median(self.outputs))


@dataclass
class Discovery:
    thresholds: Thresholds
    layers: list[LayerActivations]
    tokens: int

    @property
    def pairs(self) -> list[Pair]:
        return [p for layer in self.layers for p in layer.pairs]

    @property
    def candidates(self) -> list[Pair]:
        return [p for p in self.pairs if p.candidate]

    def strongest(self, n: int) -> list[Pair]:
        """The n most coordinated pairs that are not candidates (a look below the thresholds)."""
        rest = sorted((p for p in self.pairs if not p.candidate and p.share > 0), key=lambda p: -p.score)
        return rest[:n]

    def summary(self) -> dict:
        return {
            "thresholds": asdict(self.thresholds),
            "tokens": self.tokens,
            "candidates": [asdict(p) | {"name": p.name} for p in self.candidates],
            "layers": [_layer_summary(layer) for layer in self.layers],
        }


class _Recorder:
    """Forward hook on one down projection: running channel maxima, and the input at the peak
    token of the output channels with the largest peaks."""

    def __init__(self):
        self.inputs = self.outputs = None
        self.tracked: dict[int, tuple[float, torch.Tensor, int]] = {}  # channel -> (peak, x row, token)
        self.offset = 0  # index of the batch's first token among all calibration tokens

    def __call__(self, module, args, output):
        x = args[0].detach().flatten(0, -2)  # (tokens, in)
        y = output.detach().flatten(0, -2)  # (tokens, out)
        x_max = x.abs().amax(0).float()
        peak, token = y.abs().max(0)  # (out,), (out,)
        peak = peak.float()
        self.inputs = x_max if self.inputs is None else torch.maximum(self.inputs, x_max)
        self.outputs = peak if self.outputs is None else torch.maximum(self.outputs, peak)
        # A channel among the TRACKED largest overall is among them in the batch of its peak.
        for channel in peak.topk(min(TRACKED, peak.numel())).indices.tolist():
            value = peak[channel].item()
            if channel not in self.tracked or value > self.tracked[channel][0]:
                t = int(token[channel])
                self.tracked[channel] = (value, x[t].float().clone(), self.offset + t)
        keep = sorted(self.tracked, key=lambda c: -self.tracked[c][0])[:TRACKED]
        self.tracked = {c: self.tracked[c] for c in keep}


def down_projections(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer, canonical weight name, module) of every block's MLP down projection."""
    out = []
    for comp in components(model).values():
        if comp.kind == "mlp.down":
            out.append((comp.layer, f"{comp.name}.weight", model.get_submodule(comp.module)))
    return out


@torch.inference_mode()
def discover(model: nn.Module, windows: torch.Tensor, thresholds: Thresholds = Thresholds(),
             batch_size: int = 8) -> Discovery:
    """Run the calibration windows (n, seq_len) through the model and name the candidates."""
    device = next(model.parameters()).device
    downs = down_projections(model)
    recorders = [_Recorder() for _ in downs]
    handles = [module.register_forward_hook(rec) for (_, _, module), rec in zip(downs, recorders)]
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            for rec in recorders:
                rec.offset = start * windows.shape[1]
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    layers = [
        _attribute(model, layer, target, rec, windows, thresholds)
        for (layer, target, _), rec in zip(downs, recorders)
    ]
    return Discovery(thresholds, layers, tokens=windows.numel())


def _attribute(model, layer: int, target: str, rec: _Recorder, windows: torch.Tensor,
               th: Thresholds) -> LayerActivations:
    weight = _weight(model, target)
    magnitude = weight.abs()
    inputs, outputs = rec.inputs.cpu().numpy(), rec.outputs.cpu().numpy()
    acts = LayerActivations(layer, target, inputs, outputs)
    in_median, out_median = max(acts.input_median, 1e-30), max(acts.output_median, 1e-30)
    # nn.Linear stores (out, in); a transposed (in, out) layout would swap row and column.
    transposed = weight.shape[0] != len(outputs)
    for channel, (peak, x, token) in sorted(rec.tracked.items(), key=lambda kv: -kv[1][0]):
        row = (weight[:, channel] if transposed else weight[channel]).float()  # (in,)
        contrib = row * x.to(row.device)  # (in,): W[i, j'] x_j' at the peak token
        j = int(contrib.abs().argmax())
        total = float(contrib.sum())
        share = float(contrib[j]) / total if total else 0.0
        x_j = abs(float(x[j]))
        coords = (j, channel) if transposed else (channel, j)
        value = weight[coords]
        spike_out = peak >= th.min_magnitude and peak >= th.min_ratio * out_median
        spike_in = x_j >= th.min_magnitude and x_j >= th.min_ratio * in_median
        acts.pairs.append(Pair(
            layer=layer, target=target, row=coords[0], col=coords[1],
            output=peak, output_ratio=peak / out_median, input=x_j, input_ratio=x_j / in_median,
            input_max=float(inputs[j]), share=share, weight=float(value),
            magnitude_rank=int((magnitude > value.abs()).sum()),
            window=token // windows.shape[1], position=token % windows.shape[1],
            token=int(windows.view(-1)[token]),
            candidate=bool(spike_out and spike_in and share >= th.min_share),
        ))
    return acts


def _weight(model: nn.Module, target: str) -> torch.Tensor:
    from sensray.targets import select

    (ref,) = select(model, target).tensors
    return ref.resolve(model).detach()


def _layer_summary(layer: LayerActivations) -> dict:
    j, i = int(layer.inputs.argmax()), int(layer.outputs.argmax())
    return {
        "layer": layer.layer,
        "target": layer.target,
        "input_max": float(layer.inputs[j]), "input_channel": j, "input_median": layer.input_median,
        "output_max": float(layer.outputs[i]), "output_channel": i, "output_median": layer.output_median,
        "pairs": [asdict(p) | {"name": p.name} for p in layer.pairs],
    }
