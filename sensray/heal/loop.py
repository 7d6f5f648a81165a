"""One heal worker: load, wrap, train from the latest checkpoint to the last step, export.

    train({"recipe": recipe.model_dump(mode="json"), "work": "data/x.heal-state"})

The same function runs in this process (one worker) and in every worker of a Ray Train group:
there, accelerate or DeepSpeed reads the process group Ray Train set up, each worker takes its
rows of every global batch, and worker 0 measures, checkpoints and writes the export. A loss that
is not finite stops every worker before the step is taken; worker 0 writes stopped.json and the
last good checkpoint stays as it was.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sensray.heal import checkpoint
from sensray.heal.checkpoint import Curve, read_json, write_json
from sensray.heal.recipe import HealRecipe
from sensray.progress import Progress, _duration

BEFORE = "before.json"
STOPPED = "stopped.json"
RECIPE = "recipe.json"


@dataclass
class Context:
    """What one heal knows besides its model: the recipe, where its state lives, what is held at zero."""

    recipe: HealRecipe
    work: Path
    pruning: tuple[str, dict] | None
    masks: dict[str, torch.Tensor]
    source_checksum: str
    before: dict[str, Any] = field(default_factory=dict)
    trainable: dict[str, Any] = field(default_factory=dict)
    resumed: list[dict] = field(default_factory=list)
    workers: dict[str, Any] = field(default_factory=dict)

    @property
    def held_at_zero(self) -> int:
        return sum(int(mask.sum()) for mask in self.masks.values())


def train(job: dict[str, Any]) -> None:
    """Run (or continue) the heal `job` describes; returns when the export is written or training stopped."""
    from sensray.checksum import weights_checksum
    from sensray.heal.data import training_windows
    from sensray.heal.export import eval_batches_for, finish
    from sensray.heal.masks import pruned_masks, read_pruning
    from sensray.models import load_model, load_tokenizer

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    recipe, work = HealRecipe.model_validate(job["recipe"]), Path(job["work"])
    model, tokenizer = load_model(recipe.model, _device(recipe)), load_tokenizer(recipe.model)
    pruning = read_pruning(recipe.model.name)
    ctx = Context(recipe, work, pruning, pruned_masks(model, pruning, recipe.mask), weights_checksum(model),
                  resumed=read_json(work / RECIPE)["resumed"])
    main = _rank() == 0
    batches = eval_batches_for(recipe, tokenizer, next(model.parameters()).device) if main else []
    if main:
        ctx.before = _before(work, model, batches)
    windows = training_windows(recipe.train, tokenizer)
    model, trainable = _wrapped(recipe, model, ctx)
    trained = _train(ctx, model, trainable, windows)
    if trained is not None and main:
        finish(ctx, trained[0], tokenizer, trained[1], batches)


def _train(ctx: Context, model, trainable: list, windows: torch.Tensor):
    """(trained model, loss curve), from the latest checkpoint on; None when the loss went non-finite."""
    from sensray.heal.data import batch_rows
    from sensray.heal.engine import lr_at, make_engine

    recipe, work = ctx.recipe, ctx.work
    latest = checkpoint.latest(work)
    if latest is not None:
        checkpoint.load_trainable(model, latest)
    engine = make_engine(recipe, model, trainable)
    if latest is not None:
        engine.load_optimizer(latest)
    curve = checkpoint.load_curve(latest) if latest is not None else Curve()
    saved = curve.done  # the step of the last good checkpoint
    progress = StepProgress(recipe.steps, curve.done) if engine.rank == 0 else None
    engine.model.train()
    started = time.perf_counter() - curve.seconds
    for step in range(curve.done, recipe.steps):
        torch.manual_seed(_step_seed(recipe.seed, step, engine.rank))  # dropout: the same draws after a resume
        rows = batch_rows(len(windows), recipe.train.batch_size, recipe.seed, step)[engine.rank::engine.world]
        lr = lr_at(recipe, step)
        value = _step(engine, windows[rows], recipe.micro_batch_size or len(rows), lr)
        if not math.isfinite(value):
            if engine.rank == 0:  # the checkpoint of these very weights (saved == step) is not good
                kept = checkpoint.discard_latest(work) if saved == step else saved
                write_json(work / STOPPED, {"step": step + 1, "loss": repr(value), "lr": lr, "checkpoint": kept})
            engine.barrier()
            return None
        curve.add(step + 1, value, lr)
        curve.seconds = time.perf_counter() - started
        if progress is not None:
            progress.loss, progress.lr = value, lr
            progress.update()
        if (step + 1) % recipe.every == 0 or step + 1 == recipe.steps:
            checkpoint.save(work, engine, engine.unwrapped, curve)
            saved = step + 1
    ctx.workers = _agreement(engine)
    return engine.unwrapped, curve


def _step(engine, batch: torch.Tensor, micro: int, lr: float) -> float:
    """One optimizer step over this worker's rows, in micro-batches; returns the mean loss over every
    worker, or a non-finite one as soon as any micro-batch's is (then no update is taken)."""
    engine.begin(lr)
    chunks = batch.split(micro)
    total = 0.0
    for i, chunk in enumerate(chunks):
        loss = engine.loss(chunk)
        value = engine.mean(loss)  # the same on every worker, so all stop together
        if not math.isfinite(value):
            return value
        engine.backward(loss, len(chunk) / len(batch), last=i == len(chunks) - 1)
        total += value * len(chunk) / len(batch)
    engine.finish()
    return total


def _agreement(engine) -> dict[str, Any]:
    """Every worker's trained tensors hash the same (DDP and ZeRO-1/2 keep whole replicas); else an error."""
    from sensray.heal.checkpoint import trainable_state
    from sensray.perturbations.base import as_bits

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(trainable_state(engine.unwrapped).items()):
        digest.update(name.encode())
        digest.update(as_bits(tensor).contiguous().numpy().tobytes())
    hashes = [digest.hexdigest()]
    if engine.world > 1:
        import torch.distributed as dist

        hashes = [None] * engine.world
        dist.all_gather_object(hashes, digest.hexdigest())
    if len(set(hashes)) != 1:
        raise RuntimeError(f"the {engine.world} workers ended with different weights ({hashes}): not exported")
    return {"count": engine.world, "identical": True, "trained_checksum": hashes[0]}


def _wrapped(recipe: HealRecipe, model, ctx: Context):
    """(model to train, its trainable parameters): LoRA adapters, or every weight with pruned ones held."""
    from sensray.heal.lora import add_adapters, lora_modules
    from sensray.heal.masks import hold_at_zero

    total = sum(p.numel() for p in model.parameters())
    if recipe.method == "lora":
        modules = lora_modules(model, recipe.lora.targets)
        torch.manual_seed(_step_seed(recipe.seed, -1, 0))  # the adapters' random init: the same in every run
        model = add_adapters(model, recipe.lora, modules)
        ctx.trainable = {"modules": len(modules)}
    else:
        hold_at_zero(model, ctx.masks)
        ctx.trainable = {"modules": None}
    trainable = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    ctx.trainable |= {"parameters": count, "share_of_model": count / total}
    if recipe.method == "masked":  # the weights that can actually move
        ctx.trainable["free_parameters"] = count - ctx.held_at_zero
    return model, trainable


def _before(work: Path, model, batches: list[torch.Tensor]) -> dict[str, Any]:
    """The eval perplexity of the model as loaded: measured once, kept for a resume."""
    from sensray.heal.export import perplexity

    path = work / BEFORE
    if path.is_file():
        return read_json(path)
    before = perplexity(model, batches)
    write_json(path, before)
    return before


def _device(recipe: HealRecipe) -> torch.device:
    """This worker's device: its GPU (LOCAL_RANK under Ray Train) when it has one and may use it."""
    if recipe.model.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _step_seed(seed: int, step: int, rank: int) -> int:
    from sensray.perturbations.base import keyed_rng

    return int(keyed_rng(seed, "heal-dropout", step, rank).integers(2**63))


class StepProgress(Progress):
    """Progress's line in steps, with the loss and the learning rate."""

    loss = math.nan
    lr = 0.0

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"[step {self.done:>{len(str(self.total))}}/{self.total}] {100 * self.done / self.total:5.1f}%  "
                f"loss {self.loss:.4f}  lr {self.lr:.2e}  {rate:5.2f} steps/s  ETA {eta}  elapsed {_duration(elapsed)}")
