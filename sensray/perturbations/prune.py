"""Pruning: zero a share of each weight matrix, chosen by magnitude, by Wanda, or by sensitivity.

    space:
      target: "blocks.*"                                  # every linear weight of every block
      method: {grid_search: [magnitude, wanda]}
      sparsity: {grid_search: [0.1, 0.3, 0.5, 0.7]}
      pattern: unstructured                               # or "2:4", "4:8" (then sparsity is 1 - N/M)

Only weight matrices are pruned: biases, norms and other 1-D tensors a target selects are left
alone. Each selected matrix W (out x in; a fused q/k/v view counts its rows) is pruned on its own:

- `magnitude` scores |W[i, j]|; `scope: tensor` (its default) zeroes the lowest-scoring
  round(s * numel) weights of the matrix, `scope: row` round(s * in) of each output row.
- `wanda` scores |W[i, j]| * ||X_j||_2 (Sun et al. 2023), X_j input channel j of the layer over
  the calibration tokens, and compares per output row (its default scope). The norms are
  measured once per loaded model with unperturbed weights (sensray/pruning/calibration.py);
  the paper's code instead feeds each layer the outputs of the layers already pruned before it.
- `sensitivity` gives each matrix its own sparsity from a finished run (`run`: a run directory,
  or an experiment directory for its latest run): less sensitive layers pruned more, the
  parameter-weighted total equal to `sparsity` (sensray/pruning/allocation.py); weights are then
  ranked by `score` (magnitude, the default, or wanda).
- `pattern: "N:M"` keeps the N highest-scoring weights of every M consecutive input weights of a
  row (2:4 zeroes 2 of every 4), the semi-structured sparsity of sparse tensor cores.

The undo record keeps one copy of each matrix it changed and restores it bit-exactly.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from sensray.architectures import TensorRef
from sensray.perturbations.base import Edits, ParamError, Params, Perturbation, register
from sensray.pruning import allocation
from sensray.pruning.calibration import Calibration, input_norms

Method = Literal["magnitude", "wanda", "sensitivity"]
NM = re.compile(r"(\d+):(\d+)")


class PruneParams(Params):
    method: Method = "magnitude"
    sparsity: Optional[float] = Field(None, ge=0, le=1, description="share of each matrix zeroed (N:M implies it)")
    pattern: str = Field("unstructured", description="'unstructured', or 'N:M': keep N of every M input weights")
    scope: Optional[Literal["tensor", "row"]] = Field(
        None, description="where weights compete: the whole matrix or each output row (default: tensor for "
                          "magnitude, row for wanda)")
    score: Optional[Literal["magnitude", "wanda"]] = Field(None, description="sensitivity: rank weights by this")
    run: Optional[str] = Field(None, description="sensitivity: run (or experiment) directory with per-layer trials")
    spread: float = Field(0.1, ge=0, le=1, description="sensitivity: half the gap between layer sparsities")
    calibration: str = Field("bundled-train", description="wanda: calibration corpus (never the eval text)")
    calib_sequences: int = Field(32, ge=1, description="wanda: calibration windows")
    calib_seq_len: int = Field(128, ge=2, description="wanda: tokens per calibration window")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, pattern: str) -> str:
        match = NM.fullmatch(pattern)
        if pattern != "unstructured" and not (match and 0 < int(match[1]) < int(match[2])):
            raise ValueError(f"expected 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
        return pattern

    @property
    def nm(self) -> tuple[int, int] | None:
        match = NM.fullmatch(self.pattern)
        return (int(match[1]), int(match[2])) if match else None

    @property
    def ranking(self) -> str:
        """The score weights are ranked by: magnitude or wanda."""
        return (self.score or "magnitude") if self.method == "sensitivity" else self.method

    @property
    def where(self) -> str:
        """Where weights compete: 'row' or 'tensor' (N:M groups lie within rows)."""
        return self.scope or ("row" if self.ranking == "wanda" or self.nm else "tensor")

    @property
    def target_sparsity(self) -> float:
        return 1 - self.nm[0] / self.nm[1] if self.nm else self.sparsity

    @property
    def calibration_settings(self) -> Calibration:
        return Calibration(self.calibration, self.calib_sequences, self.calib_seq_len)


@register
class Prune(Perturbation):
    name = "prune"
    summary = "zero a share of each weight matrix by magnitude, wanda (|W|·||X||) or per-layer sensitivity; N:M too"
    Params = PruneParams
    quantized = ("pruning a quantized model means pruning the float weights and quantizing the result (sensray prune "
                 "writes the pruned model; load that with quantization); a prune trial here would rank codes "
                 "whose scales it cannot change")

    @classmethod
    def check(cls, model: nn.Module, params: PruneParams):
        selection = cls.select(model, params)
        refs = matrices(model, selection.tensors, params.target)
        _check_sparsity(params)
        for ref in refs:
            cols = ref.resolve(model).shape[-1]
            if params.nm and cols % params.nm[1]:
                raise ParamError("pattern", f"{params.pattern}: M = {params.nm[1]} does not divide the input "
                                            f"dimension {cols} of {ref.name}")
        if params.ranking == "wanda":
            _check_wanda(model, refs, params)
        if params.method == "sensitivity":
            if params.run is None:
                raise ParamError("run", "method sensitivity needs 'run': a finished sensray run directory whose "
                                        "trials perturb each layer on its own (see experiments/prune-layers.yaml)")
            allocation.sensitivities(params.run, [ref.name for ref in refs])
        return selection

    @classmethod
    def perturb(cls, model: nn.Module, params: PruneParams, edits: Edits) -> None:
        refs = matrices(model, cls.check(model, params).tensors, params.target)
        norms = input_norms(model, params.calibration_settings) if params.ranking == "wanda" else None
        for ref, sparsity in zip(refs, sparsities(model, refs, params)):
            live = ref.resolve(model)
            mask = prune_mask(score(live, _norms_of(norms, ref)), sparsity, params.nm, params.where)
            if bool(mask.any()):
                edits.tensor(live, ref.name).masked_fill_(mask.view(live.shape), 0)


def matrices(model: nn.Module, refs: tuple[TensorRef, ...], target: str) -> list[TensorRef]:
    """The weight matrices among a selection's tensors (fused q/k/v views are 3-D: (groups, rows, in))."""
    out = [r for r in refs if r.name.endswith("weight") and r.resolve(model).dim() >= 2]
    if not out:
        names = ", ".join(r.name for r in refs[:6])
        raise ParamError("target", f"{target!r} selects no weight matrix to prune ({names}); e.g. 'blocks.*'")
    return out


def module_of(ref: TensorRef) -> str:
    return ref.param.rsplit(".", 1)[0]


def _norms_of(norms: dict[str, torch.Tensor] | None, ref: TensorRef) -> torch.Tensor | None:
    if norms is None:
        return None
    if module_of(ref) not in norms:
        raise ValueError(f"wanda: {module_of(ref)} saw no calibration input (is it used in the forward pass?)")
    return norms[module_of(ref)]


def _check_sparsity(params: PruneParams) -> None:
    if params.nm is None and params.sparsity is None:
        raise ParamError("sparsity", "prune needs 'sparsity' (0..1), or an N:M 'pattern' that implies it")
    if params.nm and params.sparsity is not None and not math.isclose(params.sparsity, params.target_sparsity):
        raise ParamError("sparsity", f"pattern {params.pattern} zeroes {params.target_sparsity:g} of each row, "
                                     f"not {params.sparsity:g}; leave sparsity out or make it match")
    if params.nm and params.scope == "tensor":
        raise ParamError("scope", f"N:M groups lie within rows: pattern {params.pattern} needs scope row")


def _check_wanda(model: nn.Module, refs: list[TensorRef], params: PruneParams) -> None:
    for ref in refs:
        module = model.get_submodule(module_of(ref))
        if not isinstance(module, nn.Linear):
            raise ParamError("target", f"wanda scores the inputs of linear layers; {ref.name} belongs to a "
                                       f"{type(module).__name__}")
    corpus = params.calibration
    if corpus not in ("bundled", "bundled-train") and not corpus.startswith("hf:") and not Path(corpus).is_file():
        raise ParamError("calibration", f"no such corpus {corpus!r} (bundled-train, a .txt/.jsonl path, or hf:...)")


def sparsities(model: nn.Module, refs: list[TensorRef], params: PruneParams) -> list[float]:
    """Each matrix's sparsity: the requested one, or its share of it allotted by sensitivity."""
    if params.method != "sensitivity":
        return [params.target_sparsity] * len(refs)
    sizes = np.array([ref.resolve(model).numel() for ref in refs], dtype=np.float64)
    sens = allocation.sensitivities(params.run, [ref.name for ref in refs])
    return allocation.allot(sizes, sens, params.target_sparsity, params.spread).tolist()


def score(weight: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """(rows, in) float32 importance: |W|, or |W| * ||X_j|| (Wanda) when input norms are given."""
    w = weight.reshape(-1, weight.shape[-1]).float().abs()  # a copy for the strided fused views
    return w * norms.to(w.device) if norms is not None else w


def prune_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, scope: str) -> torch.Tensor:
    """(rows, in) bool, True where a weight is zeroed: the lowest scores per N:M group, row or tensor."""
    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = score.view(rows, cols // m, m)  # (rows, groups, M)
        drop = groups.topk(m - n, dim=-1, largest=False).indices
        return mask.view(rows, cols // m, m).scatter_(-1, drop, True).view(rows, cols)
    if scope == "row":
        drop = score.topk(_count(sparsity, cols), dim=1, largest=False).indices  # (rows, k)
        return mask.scatter_(1, drop, True)
    drop = score.flatten().topk(_count(sparsity, score.numel()), largest=False).indices
    return mask.view(-1).index_fill_(0, drop, True).view(rows, cols)


def _count(sparsity: float, n: int) -> int:
    """round(sparsity * n), halves up, never past n."""
    return min(n, math.floor(sparsity * n + 0.5))
