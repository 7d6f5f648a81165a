"""Another checkpoint's weights, swapped into the resident model: a pruned, healed or quantized export
measured against the model it came from.

    model: {name: sensray-tiny}                 # the reference: the baseline, and what KL is taken against
    perturbation: checkpoint
    space:
      target: model
      checkpoint: {grid_search: [data/tiny-wanda50, data/tiny-mag50]}

Each trial copies every weight of a local Hugging Face directory that differs from the resident
model's into it (saving those originals first, like any kind), so the row has the checkpoint's
perplexity, its KL and top-1 agreement against the reference and, with `eval:`, its task scores,
beside the reference's in baseline.json; the restore puts the reference back bit for bit. The
checkpoint must have the resident model's architecture: every tensor it holds must exist in the
model with the same shape (checked at plan time, from its safetensors headers alone). A tensor the
checkpoint does not hold (a tied lm_head) keeps the reference's value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors import SafetensorError, safe_open
from torch import nn

from sensray.perturbations.base import Edits, ParamError, Params, Perturbation, register


class CheckpointParams(Params):
    target: Literal["model"] = Field(description="'model': every weight the checkpoint holds")
    checkpoint: str = Field(description="a local Hugging Face directory (or alias) of the same architecture")


@register
class Checkpoint(Perturbation):
    name = "checkpoint"
    summary = "swap in another checkpoint's weights (a pruned or healed export) to measure it against this model"
    Params = CheckpointParams

    @classmethod
    def check(cls, model: nn.Module, params: CheckpointParams) -> None:
        shapes = {name: tuple(t.shape) for name, t in _named_tensors(model)}
        for path in _files(params.checkpoint):
            for name, shape in _headers(path):
                if name not in shapes:
                    raise ParamError("checkpoint", f"{path.name} holds {name!r}, which the model has not: "
                                                   "a checkpoint of another architecture")
                if shapes[name] != shape:
                    raise ParamError("checkpoint", f"{name} is {list(shape)} in {path.name}, "
                                                   f"{list(shapes[name])} in the model")

    @classmethod
    def perturb(cls, model: nn.Module, params: CheckpointParams, edits: Edits) -> None:
        live = {name: tensor.data for name, tensor in _named_tensors(model)}  # .data: written in place, no autograd
        names = _canonical_names(model)
        for path in _files(params.checkpoint):
            with safe_open(str(path), framework="pt") as file:
                for name in file.keys():
                    new = file.get_tensor(name).to(device=live[name].device, dtype=live[name].dtype)
                    if not torch.equal(new, live[name]):  # only what differs is saved and written
                        edits.tensor(live[name], names.get(name, name)).copy_(new)


def _named_tensors(model: nn.Module):
    """Parameters and buffers by their state-dict names (a tied weight under each of its names)."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """HF parameter name -> canonical tensor name (blocks.3.mlp.down.weight), where the family's table has one."""
    from sensray.architectures import components

    return {ref.param: ref.name for c in components(model).values() for ref in c.tensors if ref.whole}


def _files(checkpoint: str) -> list[Path]:
    from sensray.models import resolve_name

    root = Path(resolve_name(checkpoint))
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        raise ParamError("checkpoint", f"{checkpoint!r} is not a local model directory with safetensors weights "
                                       "(e.g. one written by sensray prune)")
    return files


def _headers(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    try:
        with safe_open(str(path), framework="pt") as file:
            return [(name, tuple(file.get_slice(name).get_shape())) for name in file.keys()]
    except (OSError, SafetensorError) as err:
        raise ParamError("checkpoint", f"{path}: not a readable safetensors file ({err})") from None
