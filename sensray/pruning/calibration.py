"""Input activation norms of every linear layer, measured once per model on calibration text.

Wanda scores weight W[i, j] by |W[i, j]| * ||X_j||_2, where X_j is input channel j of that layer
over every calibration token. The norms depend only on the unperturbed model and the text, so
they are measured on the first trial that needs them and kept beside the model object (a
WeakKeyDictionary keyed by the model, then by the calibration settings) for every later trial.

    norms = input_norms(model, Calibration("bundled-train", sequences=32, seq_len=128))
    norms["model.layers.0.mlp.down_proj"]          # (in_features,) float32, on the layer's device

The calibration text is the model's training text (`bundled-train` for the shipped model), never
the eval text: choosing weights by the text that then measures them would flatter every method.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from sensray.errors import SensrayError


@dataclass(frozen=True)
class Calibration:
    corpus: str = "bundled-train"  # a data.corpus value: bundled-train, a .txt/.jsonl path, hf:<dataset>
    sequences: int = 32
    seq_len: int = 128


Norms = dict[str, torch.Tensor]  # linear module path -> (in_features,) float32 L2 norms

_NORMS: "weakref.WeakKeyDictionary[nn.Module, dict[Calibration, Norms]]" = weakref.WeakKeyDictionary()


def input_norms(model: nn.Module, calibration: Calibration) -> Norms:
    """The cached norms for this model and calibration, measured (one pass over the text) if new.

    Call it while the weights are unperturbed: a replica restores them after every trial, so
    the first trial that asks, before it prunes anything, sees the loaded model."""
    per_model = _NORMS.setdefault(model, {})
    if calibration not in per_model:
        per_model[calibration] = measure(model, calibration_batches(model, calibration))
    return per_model[calibration]


def calibrate(model: nn.Module, batches: list[torch.Tensor], calibration: Calibration = Calibration()) -> Norms:
    """Measure on token batches you already have (tests, notebooks) and cache under `calibration`."""
    norms = measure(model, batches)
    _NORMS.setdefault(model, {})[calibration] = norms
    return norms


def measure(model: nn.Module, batches: list[torch.Tensor]) -> Norms:
    """Per linear layer, sqrt(sum over calibration tokens of x_j^2) for each input channel j."""
    sums: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def record(module, args):
            x = args[0].detach()  # (batch, seq, in_features)
            squares = x.float().pow(2).sum(dim=tuple(range(x.dim() - 1)))  # (in_features,)
            sums[name] = sums[name] + squares if name in sums else squares

        return record

    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in linears]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt() for name, total in sums.items()}


def calibration_batches(model: nn.Module, calibration: Calibration) -> list[torch.Tensor]:
    """Token windows of the calibration text, tokenized by the model's own tokenizer."""
    from sensray.data import eval_batches
    from sensray.models import load_tokenizer
    from sensray.spec import DataSpec, ModelSpec

    source = getattr(model, "name_or_path", "") or ""
    if not source:
        raise ValueError("wanda needs calibration text and this model has no name_or_path to load its tokenizer "
                         "from; measure the norms first with sensray.pruning.calibration.calibrate(model, batches)")
    spec = DataSpec(corpus=calibration.corpus, split="train", seq_len=calibration.seq_len,
                    num_sequences=calibration.sequences)
    try:
        return eval_batches(spec, load_tokenizer(ModelSpec(name=source)))
    except SensrayError as err:  # a trial error (recorded in its row): the spec itself was valid
        raise ValueError(f"calibration text: {err}") from None
