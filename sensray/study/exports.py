"""Stages that write a model: `prune` (sensray prune) and `heal` (sensray heal), each into <stage>/model.

    - {name: pruned-uniform, kind: prune, method: wanda, sparsity: 0.5}
    - {name: pruned-allocated, kind: prune, method: sensitivity, score: wanda, allocation: allocation}
    - {name: healed, kind: heal, model: pruned-uniform, method: lora, steps: 100, lr: 0.001}

A prune stage prunes the study's model; with `method: sensitivity` it takes its run, sparsity,
spread and target from an allocation stage, so both say the same thing. A heal stage takes every
key `sensray heal` takes (docs/heal.md) except the eval text (the study's) and the output (the
stage's). Both run the command itself in this process; the journal records the command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from sensray.errors import SpecError
from sensray.heal.recipe import HealRecipe
from sensray.spec import Frozen
from sensray.study.stages import Stage, StageContext, StageResult, register, shell

MODEL = "model"  # the model directory inside a stage's directory


class PruneStageParams(Frozen):
    method: Literal["magnitude", "wanda", "sensitivity"]
    sparsity: Optional[float] = Field(None, ge=0, le=1, description="sensitivity: taken from the allocation")
    allocation: Optional[str] = Field(None, description="sensitivity: an earlier allocate stage")
    target: str = "blocks.*"
    pattern: Optional[str] = None
    scope: Optional[Literal["tensor", "row"]] = None
    score: Optional[Literal["magnitude", "wanda"]] = None
    calibration: Optional[str] = None
    calib_sequences: Optional[int] = Field(None, ge=1)
    calib_seq_len: Optional[int] = Field(None, ge=2)

    @model_validator(mode="after")
    def _allocation_iff_sensitivity(self) -> "PruneStageParams":
        if (self.method == "sensitivity") != (self.allocation is not None):
            raise ValueError("method sensitivity takes its per-layer sparsities from `allocation: <an allocate "
                             "stage>`; the other methods take no allocation")
        return self


@register
class Prune(Stage):
    kind, produces = "prune", "model"
    summary = "prune the study's model and export it (sensray prune)"
    Params = PruneStageParams
    needs = {"allocation": ("allocation",)}

    def check(self, ctx: StageContext) -> None:
        from sensray.models import meta_model
        from sensray.perturbations import PERTURBATIONS, ParamError

        kind, given = PERTURBATIONS.get("prune"), self._options(ctx, run=None)
        if self.params.method == "sensitivity":  # the run does not exist before the study runs: check the rest
            given |= {"method": given.get("score") or "magnitude", "spread": None, "run": None}
        try:
            kind.check(meta_model(ctx.spec.model), kind.parse({k: v for k, v in given.items() if v is not None}))
        except ParamError as err:
            raise SpecError(f"{self.key}.{err.param or 'method'}", str(err)) from None

    def _options(self, ctx: StageContext, run: str | None) -> dict[str, Any]:
        """The prune parameters; with an allocation, its run, sparsity, spread and target."""
        given = self.params.model_dump(exclude={"allocation"})
        if self.params.allocation is None:
            return given
        allocation = ctx.stage_named(self.params.allocation).params
        if self.params.sparsity is not None and self.params.sparsity != allocation.sparsity:
            raise SpecError(f"{self.key}.sparsity", f"{self.params.sparsity:g} differs from the sparsity of "
                                                    f"{self.params.allocation!r} ({allocation.sparsity:g}); leave it out")
        return given | {"sparsity": allocation.sparsity, "spread": allocation.spread, "target": allocation.target,
                        "run": run}

    def run(self, ctx: StageContext) -> StageResult:
        from sensray.prune import METADATA

        out, run = ctx.dir / MODEL, None
        if self.params.allocation is not None:
            table = ctx.output_of(self.params.allocation) / "allocation.json"
            run = json.loads(table.read_text(encoding="utf-8"))["run"]
        argv = ["--model", ctx.spec.model.name, "--output-dir", str(out), "--dtype", ctx.spec.model.dtype]
        argv += ["--trust-remote-code"] if ctx.spec.model.trust_remote_code else []
        argv += ["--revision", ctx.spec.model.revision] if ctx.spec.model.revision else []
        for key, value in self._options(ctx, run).items():
            if value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        if not (out / METADATA).is_file():  # an export is renamed into place whole: if it is there, it is done
            ctx.call("prune", argv, on_cluster=True)  # it loads the whole model (and calibrates wanda)
        record = json.loads((out / METADATA).read_text(encoding="utf-8"))
        summary = {"method": record["method"], "score": record["score"], "sparsity": record["achieved"]["overall"],
                   "zeros": record["achieved"]["zeros"]}
        return StageResult(out, summary, shell(["sensray", "prune", *argv]))


class HealStageParams(HealRecipe):
    """A heal recipe whose model names an earlier stage (or dense); the eval text and output are the study's."""

    model: str = Field(description="an earlier stage that makes a model, or dense")
    output_dir: str = Field("", description="set by the study: <stage>/model")

    @model_validator(mode="after")
    def _study_owned(self) -> "HealStageParams":
        for key in ("eval", "output_dir"):
            if key in self.model_fields_set:
                raise ValueError(f"{key} is set by the study (eval: the study's eval text; output_dir: the "
                                 "stage's directory); leave it out of the stage")
        return self


@register
class Heal(Stage):
    kind, produces = "heal", "model"
    summary = "fine-tune an earlier model back to health, keeping its zeros (sensray heal)"
    Params = HealStageParams
    needs = {"model": ("model",)}
    uses_eval = True  # its record holds the eval ppl before and after

    def recipe(self, ctx: StageContext, model_name: str | None = None) -> HealRecipe:
        from sensray.heal.recipe import parse_recipe

        raw = self.params.model_dump(mode="json") | {
            "model": ctx.spec.model.model_dump() | {"name": model_name or ctx.spec.model.name},
            "eval": ctx.spec.eval.model_dump(), "output_dir": str(ctx.dir / MODEL)}
        try:
            return parse_recipe(raw)
        except SpecError as err:
            raise SpecError(f"{self.key}.{err.path}", err.message) from None

    def check(self, ctx: StageContext) -> None:
        """Against the study's model: an earlier stage's export has its structure, and does not exist yet."""
        from sensray.heal.recipe import check_recipe

        check_recipe(self.recipe(ctx).model_copy(update={"output_dir": str(ctx.study.probe_dir / self.name)}),
                     key=self.key)

    def run(self, ctx: StageContext) -> StageResult:
        recipe = self.recipe(ctx, ctx.model_name(self.params.model))
        out = Path(recipe.output_dir)
        argv = heal_argv(recipe, ctx.spec.address)
        resuming = ctx.resume and (out.parent / f"{out.name}.heal-state").is_dir()
        if not (out / "sensray-heal.json").is_file():
            ctx.call("heal", argv + ["--resume"] * resuming)
        record = json.loads((out / "sensray-heal.json").read_text(encoding="utf-8"))
        summary = {"method": recipe.method, "steps": record["steps"], "ppl_before": record["eval"]["ppl_before"],
                   "ppl_after": record["eval"]["ppl_after"], "sparsity": record["achieved"]["overall"],
                   "trainable": record["trainable"]["parameters"], "seconds_training": record["seconds"]}
        return StageResult(out, summary, shell(["sensray", "heal", *argv]))


def heal_argv(recipe: HealRecipe, address: str | None) -> list[str]:
    """The `sensray heal` command line of a recipe: its main flags, every other key as --set KEY=JSON."""
    flags = {"model", "method", "steps", "output_dir"}
    model = recipe.model
    argv = ["--model", model.name, "--method", recipe.method, "--steps", str(recipe.steps),
            "--output-dir", recipe.output_dir, "--dtype", model.dtype, "--device", model.device]
    argv += ["--revision", model.revision] if model.revision else []
    argv += ["--trust-remote-code"] if model.trust_remote_code else []
    argv += ["--address", address] if address else []
    defaults = _flat(HealRecipe.model_construct().model_dump(mode="json"))
    for key, value in _flat(recipe.model_dump(mode="json")).items():
        if key.split(".")[0] not in flags and (key not in defaults or defaults[key] != value):
            argv += ["--set", f"{key}={json.dumps(value)}"]
    return argv


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"corpus": x}} -> {"train.corpus": x}: each leaf a key `--set` takes."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
