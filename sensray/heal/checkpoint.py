"""A heal's state on disk, so `--resume` continues exactly where a crash stopped it.

    <output dir>.heal-state/
        recipe.json            the recipe as started, and every resume that changed it (lr, steps)
        before.json            the eval perplexity of the model before training
        checkpoint/            the latest checkpoint, replaced whole (never half-written):
            trainable.safetensors    the trained tensors only (LoRA adapters, or the full weights)
            optimizer.pt             AdamW's state (torch.save of tensors; read back weights_only)
            deepspeed/               or DeepSpeed's partitioned optimizer state
            progress.json            steps done, the loss and lr of every step so far
        stopped.json           present when the loss went non-finite: where, and with which lr

        checkpoint.previous/   the one before it, kept for when the newest turns out bad

A checkpoint is written into checkpoint.partial/ and renamed into place only once every worker
has written its part, so a crash at any moment leaves a complete checkpoint. The one before is
kept because the newest holds weights whose loss nobody has computed yet: when that loss comes
out non-finite, the newest is dropped and the one before is the last good checkpoint.
The order of training batches and every dropout draw are functions of (seed, step), so the
steps after a resume are the ones the interrupted run would have taken.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

TRAINABLE = "trainable.safetensors"
PROGRESS = "progress.json"


@dataclass
class Curve:
    """The loss and learning rate of every step so far (step numbers count from 1)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: float = 0.0  # training time so far, over every resume

    def add(self, step: int, loss: float, lr: float) -> None:
        self.step.append(step)
        self.loss.append(loss)
        self.lr.append(lr)

    @property
    def done(self) -> int:
        return self.step[-1] if self.step else 0

    def as_dict(self) -> dict[str, list]:
        return {"step": self.step, "loss": self.loss, "lr": self.lr}


def state_dir(output: Path) -> Path:
    """Where the heal writing `output` keeps its checkpoints (beside it, so the same filesystem)."""
    return output.with_name(output.name + ".heal-state")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes, by name: requires_grad parameters, each storage once."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save(work: Path, engine, model: nn.Module, curve: Curve) -> None:
    """Write a checkpoint (every worker calls this: DeepSpeed's optimizer state is collective)."""
    from safetensors.torch import save_file

    partial, final, previous = work / "checkpoint.partial", work / "checkpoint", work / "checkpoint.previous"
    if engine.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    engine.barrier()
    engine.save_optimizer(partial)
    if engine.rank == 0:
        save_file(trainable_state(model), str(partial / TRAINABLE))
        write_json(partial / PROGRESS, {"curve": curve.as_dict(), "seconds": curve.seconds})
    engine.barrier()
    if engine.rank == 0:  # the one before stays: the newest may hold the weights that make the next loss NaN
        shutil.rmtree(previous, ignore_errors=True)
        if final.exists():
            os.replace(final, previous)
        os.replace(partial, final)
    engine.barrier()


def latest(work: Path) -> Path | None:
    """The newest complete checkpoint (a crash between the two renames leaves only checkpoint.previous)."""
    for name in ("checkpoint", "checkpoint.previous"):
        path = work / name
        if (path / PROGRESS).is_file():
            return path
    return None


def discard_latest(work: Path) -> int:
    """Drop the newest checkpoint (its weights made the loss non-finite); returns the step of the one left."""
    newest = work / "checkpoint"
    if (work / "checkpoint.previous" / PROGRESS).is_file():
        shutil.rmtree(newest, ignore_errors=True)
        os.replace(work / "checkpoint.previous", newest)
    else:
        shutil.rmtree(newest, ignore_errors=True)
    kept = latest(work)
    return load_curve(kept).done if kept is not None else 0


def load_curve(checkpoint: Path) -> Curve:
    progress = json.loads((checkpoint / PROGRESS).read_text(encoding="utf-8"))
    data = progress["curve"]
    return Curve(list(data["step"]), list(data["loss"]), list(data["lr"]), float(progress["seconds"]))


def load_trainable(model: nn.Module, checkpoint: Path) -> None:
    """Copy the checkpoint's tensors into the model's trainable parameters (same names, same shapes)."""
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / TRAINABLE))
    live = dict(model.named_parameters())
    missing = sorted(set(trainable_state(model)) - set(saved))
    if missing:
        raise RuntimeError(f"{checkpoint / TRAINABLE} lacks {missing[0]}: it was written by another recipe")
    with torch.no_grad():
        for name, tensor in saved.items():
            live[name].copy_(tensor)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)

