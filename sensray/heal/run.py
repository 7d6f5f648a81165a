"""Driving a heal: its state directory, in this process or under Ray Train, and what it says at the end.

    out = heal(recipe)                          # the export's directory
    out = heal(recipe, resume=True)             # continue from <out>.heal-state/checkpoint

The state directory beside the output holds the recipe as started; `--resume` may change only
the steps, the learning rate, the checkpoint interval and the number of workers (RESUMABLE),
and each change is recorded in the export. When the export is written the state directory goes.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from sensray.errors import SensrayError, SpecError
from sensray.heal import checkpoint
from sensray.heal.loop import RECIPE, STOPPED
from sensray.heal.recipe import RESUMABLE, HealRecipe


class HealStopped(SensrayError):
    """Training stopped because the loss went non-finite; the last good checkpoint is kept."""


def heal(recipe: HealRecipe, resume: bool = False, address: str | None = None) -> Path:
    out = Path(recipe.output_dir)
    work = checkpoint.state_dir(out)
    check_state(recipe, resume)
    _prepare(work, recipe, resume)
    job = {"recipe": recipe.model_dump(mode="json"), "work": str(work.resolve())}
    if recipe.distributed:
        from sensray.heal.distributed import run_on_ray

        run_on_ray(job, recipe, address)
    else:
        from sensray.heal.loop import train

        train(job)
    _raise_if_stopped(work, recipe)
    if not out.is_dir():
        raise SensrayError(f"the heal ended without writing {out}; its state is kept in {work} (--resume)")
    shutil.rmtree(work, ignore_errors=True)
    return out


def check_state(recipe: HealRecipe, resume: bool) -> None:
    """The output does not exist yet, and the state directory exists exactly when resuming."""
    out = Path(recipe.output_dir)
    work = checkpoint.state_dir(out)
    if out.exists():
        raise SpecError("output_dir", f"{out} already exists; choose a new directory (nothing is overwritten)")
    if not resume and work.exists():
        raise SpecError("--resume", f"{work} holds an interrupted heal of this output: continue it with --resume "
                                    f"(same recipe; {', '.join(RESUMABLE)} may change) or delete it")
    if resume and not (work / RECIPE).is_file():
        raise SpecError("--resume", f"no interrupted heal to continue: {work} does not exist (run without --resume)")


def _prepare(work: Path, recipe: HealRecipe, resume: bool) -> None:
    """Create the state directory (a new heal) or check the recipe against it and record the resume."""
    if not resume:
        work.mkdir(parents=True)
        checkpoint.write_json(work / RECIPE, {"recipe": recipe.resolved(), "resumed": []})
        return
    state = checkpoint.read_json(work / RECIPE)
    started, now = state["recipe"], recipe.resolved()
    changed = sorted(key for key in now if key not in RESUMABLE and now[key] != started.get(key))
    if changed:
        raise SpecError("--resume", f"{', '.join(changed)} differ from the heal started in {work}; a heal resumes "
                                    f"with the same recipe (only {', '.join(RESUMABLE)} may change)")
    latest = checkpoint.latest(work)
    done = checkpoint.load_curve(latest).done if latest is not None else 0
    if recipe.steps < done:
        raise SpecError("--steps", f"{recipe.steps} is fewer than the {done} steps already done in {work}")
    if recipe.deepspeed is not None and now["workers"] != started["workers"]:
        raise SpecError("--workers", "DeepSpeed partitions the optimizer state over the workers: resume with "
                                     f"{started['workers']} workers")
    moved = {key: [started[key], now[key]] for key in RESUMABLE if now[key] != started[key]}
    state["resumed"].append({"at_step": done, "changed": moved, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    checkpoint.write_json(work / RECIPE, state)
    (work / STOPPED).unlink(missing_ok=True)
    print(f"resuming {work} at step {done} of {recipe.steps}" + (f" (changed: {moved})" if moved else ""),
          file=sys.stderr)


def _raise_if_stopped(work: Path, recipe: HealRecipe) -> None:
    path = work / STOPPED
    if not path.is_file():
        return
    stop = checkpoint.read_json(path)
    kept = (f"the last good checkpoint (step {stop['checkpoint']}) is kept in {work / 'checkpoint'}"
            if stop["checkpoint"] else f"no checkpoint had been written yet (the first comes at step {recipe.every})")
    raise HealStopped(f"the training loss became {stop['loss']} at step {stop['step']} (learning rate "
                      f"{stop['lr']:.3g}): training stopped and nothing was exported; {kept}; continue with a "
                      f"lower learning rate: the same command with --resume --lr {recipe.peak_lr / 10:.3g}")
