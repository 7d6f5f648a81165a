"""The optimizer side of a heal: accelerate (device, mixed precision, DDP), or DeepSpeed ZeRO.

    engine = make_engine(recipe, model, trainable)    # model: peft-wrapped or plain; trainable: its params
    loss = engine.loss(batch)                          # (rows, seq_len) token ids -> mean next-token loss
    engine.step(loss, lr)                              # backward, clip, optimizer step, zero grads
    engine.mean(loss)                                  # the same number on every worker

One process, or every worker of a Ray Train run, builds the same engine; accelerate reads the
process group Ray Train set up. DeepSpeed is driven directly (`deepspeed.initialize`): accelerate's
DeepSpeed integration does not run on a CPU (measured: it counts one process where there are two),
and DeepSpeed's own CPU accelerator with gloo does. ZeRO stages 1 and 2 only: they partition the
optimizer state and gradients but keep every parameter whole on each worker, so the pruning mask
and the export see ordinary tensors.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

OPTIMIZER_FILE = "optimizer.pt"


class AccelerateEngine:
    def __init__(self, recipe, model: nn.Module, trainable: list[nn.Parameter]):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        cpu = recipe.model.device == "cpu" or not torch.cuda.is_available()
        if not torch.distributed.is_initialized():
            # accelerate keeps one state per process and refuses a second heal (a study's) with another precision
            AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(mixed_precision=recipe.mixed_precision, cpu=cpu)
        optimizer = torch.optim.AdamW(trainable, lr=recipe.peak_lr, weight_decay=recipe.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.trainable, self.max_norm = trainable, recipe.max_grad_norm
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        return self.model(input_ids=batch, labels=batch, use_cache=False).loss

    def begin(self, lr: float) -> None:
        """A new optimizer step, whose update uses learning rate `lr`."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor, share: float, last: bool) -> None:
        """Accumulate the gradient of one micro-batch (`share` of this worker's rows); DDP averages
        over the workers on the last one only."""
        with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
            self.accelerator.backward(loss * share)

    def finish(self) -> None:
        """Clip, take the optimizer step, clear the gradients."""
        if self.max_norm is not None:
            self.accelerator.clip_grad_norm_(self.trainable, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def mean(self, value: torch.Tensor) -> float:
        return float(self.accelerator.reduce(value.detach().float(), reduction="mean"))

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def save_optimizer(self, directory: Path) -> None:
        if self.rank == 0:  # every worker holds the same state under DDP
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load_optimizer(self, directory: Path) -> None:
        state = torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state)


class DeepSpeedEngine(AccelerateEngine):
    """The same interface over a DeepSpeed engine (ZeRO stage 1 or 2, gloo on a CPU, nccl on GPUs)."""

    def __init__(self, recipe, model: nn.Module, trainable: list[nn.Parameter]):
        import deepspeed
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        rows = recipe.train.batch_size // self.world
        micro = recipe.micro_batch_size or rows
        config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": rows // micro,
            "zero_optimization": {"stage": recipe.deepspeed},
            "zero_allow_untested_optimizer": True,  # a client torch AdamW: its state is what is checkpointed
            "bf16": {"enabled": recipe.mixed_precision == "bf16"},
            "fp16": {"enabled": recipe.mixed_precision == "fp16"},
        }
        if recipe.max_grad_norm is not None:
            config["gradient_clipping"] = recipe.max_grad_norm
        optimizer = torch.optim.AdamW(trainable, lr=recipe.peak_lr, weight_decay=recipe.weight_decay)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.trainable, self.max_norm, self.device = trainable, None, self.model.device

    def backward(self, loss: torch.Tensor, share: float, last: bool) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself (equal micro-batches: `share` is 1/steps),
        # and its step() counts micro-batches: it clips, steps and zeroes only at the boundary, the last.
        self.model.backward(loss)
        self.model.step()

    def finish(self) -> None:
        """Nothing left: the last micro-batch's engine.step() took the optimizer step."""

    def mean(self, value: torch.Tensor) -> float:
        import torch.distributed as dist

        value = value.detach().float().clone()
        dist.all_reduce(value)
        return float(value) / self.world

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    @property
    def unwrapped(self) -> nn.Module:
        return self.model.module

    def save_optimizer(self, directory: Path) -> None:
        # Collective: each worker writes its partition of the optimizer state.
        self.model.save_checkpoint(str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=True)

    def load_optimizer(self, directory: Path) -> None:
        self.model.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False)


def make_engine(recipe, model: nn.Module, trainable: list[nn.Parameter]) -> AccelerateEngine:
    if recipe.deepspeed is not None:
        return DeepSpeedEngine(recipe, model, trainable)
    return AccelerateEngine(recipe, model, trainable)


def lr_at(recipe, step: int) -> float:
    """The learning rate of step `step` (0-based): linear warmup, then the recipe's decay to zero."""
    peak, warmup, steps = recipe.peak_lr, recipe.warmup_steps, recipe.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if recipe.schedule == "constant":
        return peak
    done = (step - warmup) / max(1, steps - warmup)  # 0 at the first step after warmup
    return peak * (1 - done) if recipe.schedule == "linear" else peak * 0.5 * (1 + math.cos(math.pi * done))
