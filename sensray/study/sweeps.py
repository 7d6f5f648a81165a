"""Stages over sweeps: run one (`sweep`), analyse one (`analyze`), allot per-layer sparsity from one (`allocate`).

    - {name: sensitivity, kind: sweep, experiment: prune-layers.yaml}     # on the study's model
    - {name: sensitivity-analysis, kind: analyze, run: sensitivity}
    - {name: allocation, kind: allocate, sweep: sensitivity, sparsity: 0.5, spread: 0.1}

A sweep stage is `sensray sweep` on its experiment, with the study's model and the stage's
directory as output (an interrupted one resumes its run); analyze is `sensray analyze`. An
allocation is the per-tensor sparsity `sensray prune --method sensitivity` would use
(sensray.pruning.allocation), written out with a figure, so the report can show where it put
the zeros. A sensitivity sweep measured on the study's eval text is refused: weights chosen by
the text that then judges them flatter the method.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field

from sensray import safe_yaml
from sensray.errors import SpecError
from sensray.spec import ExperimentSpec, Frozen, apply_override, read_spec_text, validate
from sensray.study.stages import Stage, StageContext, StageResult, register, shell


class SweepParams(Frozen):
    experiment: dict[str, Any] = Field(description="an experiment spec: a file (relative to the study file) or inline")
    source: Optional[str] = Field(None, description="the file the experiment was read from")
    set: list[str] = Field([], description="--set overrides of the experiment")
    executor: Optional[Literal["local", "ray"]] = Field(None, description="default: the study's executor")


@register
class Sweep(Stage):
    kind, produces = "sweep", "sweep"
    summary = "a sweep of an experiment spec on the study's model (sensray sweep)"
    Params = SweepParams

    @classmethod
    def prepare(cls, params: dict[str, Any], base: Path, key: str) -> dict[str, Any]:
        """Read `experiment: FILE` into the stage, so the study directory holds everything it ran."""
        given = params.get("experiment")
        if not isinstance(given, str):
            return params
        path = Path(given) if Path(given).is_absolute() else base / given
        try:
            raw = safe_yaml.load(read_spec_text(path))
        except SpecError as err:
            raise SpecError(f"{key}.experiment", f"{path}: {err.message}") from None
        if not isinstance(raw, dict):
            raise SpecError(f"{key}.experiment", f"{path} is not a mapping (an experiment spec)")
        return params | {"experiment": raw, "source": str(path)}

    def describe(self) -> str:
        name = self.params.experiment.get("name", "?")
        source = f" from {Path(self.params.source).name}" if self.params.source else ""
        return f"experiment {name}{source}" + (f", set {', '.join(self.params.set)}" if self.params.set else "")

    def experiment(self, study) -> ExperimentSpec:
        """The experiment as it runs: the study's model, the stage's --set overrides."""
        raw = copy.deepcopy(self.params.experiment)
        raw["model"] = (raw.get("model") if isinstance(raw.get("model"), dict) else {}) | study.spec.model.model_dump()
        try:
            for override in self.params.set:
                apply_override(raw, override)
            return validate(raw)
        except SpecError as err:
            raise SpecError(f"{self.key}.experiment.{err.path}", err.message) from None

    def hashed(self, ctx: StageContext) -> dict[str, Any]:
        resolved = self.experiment(ctx.study).resolved()
        resolved.pop("output_dir")  # the study puts it in the stage directory
        return {"experiment": resolved, "executor": self._executor(ctx)}

    def check(self, ctx: StageContext) -> None:
        from sensray.plan import make_plan
        from sensray.preflight import check_data

        spec = self.experiment(ctx.study)
        try:
            make_plan(spec)
            if self._executor(ctx) == "local" or ctx.spec.address is None:
                check_data(spec)
        except SpecError as err:
            raise SpecError(f"{self.key}.experiment.{err.path}", err.message) from None

    def run(self, ctx: StageContext) -> StageResult:
        spec = self.experiment(ctx.study)
        path = ctx.dir / "experiment.yaml"
        path.write_text(yaml.safe_dump(spec.resolved() | {"output_dir": str(ctx.dir)}, sort_keys=False),
                        encoding="utf-8")
        where = ["--executor", self._executor(ctx)] + (["--address", ctx.spec.address] if ctx.spec.address else [])
        partial = [run for run in sorted((ctx.dir / spec.name).glob("*/spec.yaml"))
                   if not (run.parent / "trials.parquet").is_file()]
        resumed = partial[-1].parent if ctx.resume and partial else None
        argv = ["--resume", str(resumed), *where] if resumed else [str(path), *where]
        before = set((ctx.dir / spec.name).glob("*/"))
        ctx.call("sweep", argv)
        # The run this call made (or finished): not the last by name, since run ids made in one second sort at random.
        run = resumed or next(iter(set((ctx.dir / spec.name).glob("*/")) - before))
        return StageResult(run, sweep_summary(run), shell(["sensray", "sweep", *argv]))

    def _executor(self, ctx: StageContext) -> str:
        return self.params.executor or ctx.spec.executor


def sweep_summary(run: Path) -> dict[str, Any]:
    import polars as pl

    trials = pl.read_parquet(run / "trials.parquet", columns=["delta_ppl", "error"])
    baseline = json.loads((run / "baseline.json").read_text(encoding="utf-8"))
    return {"trials": len(trials), "failed": int(trials["error"].is_not_null().sum()),
            "baseline_ppl": baseline["ppl"], "worst_delta_ppl": trials["delta_ppl"].max()}


class AnalyzeParams(Frozen):
    run: str = Field(description="an earlier sweep or evaluation stage")
    threshold: float = Field(2.0, gt=1, description="catastrophic above this multiple of the baseline ppl")


@register
class Analyze(Stage):
    kind, produces = "analyze", "analysis"
    summary = "tables, figures and a report of an earlier sweep (sensray analyze)"
    Params = AnalyzeParams
    needs = {"run": ("sweep", "evaluation")}

    def run(self, ctx: StageContext) -> StageResult:
        argv = [str(ctx.output_of(self.params.run)), "--output-dir", str(ctx.dir),
                "--threshold", str(self.params.threshold)]
        ctx.call("analyze", argv)
        return StageResult(ctx.dir, {"files": sorted(p.name for p in ctx.dir.iterdir() if p.is_file())},
                           shell(["sensray", "analyze", *argv]))


class AllocateParams(Frozen):
    sweep: str = Field(description="an earlier sweep that perturbs each layer on its own")
    sparsity: float = Field(ge=0, le=1, description="the parameter-weighted mean sparsity")
    spread: float = Field(0.1, ge=0, le=1, description="half the gap between the most and least pruned layer")
    target: str = "blocks.*"


@register
class Allocate(Stage):
    kind, produces = "allocate", "allocation"
    summary = "per-layer sparsity from a sensitivity sweep (what sensray prune --method sensitivity uses)"
    Params = AllocateParams
    needs = {"sweep": ("sweep",)}

    def check(self, ctx: StageContext) -> None:
        from sensray.heal.data import corpus_identity
        from sensray.models import meta_model
        from sensray.perturbations.prune import matrices
        from sensray.targets import TargetError, select

        sweep = ctx.stage_named(self.params.sweep).experiment(ctx.study)
        if corpus_identity(sweep.data) == corpus_identity(ctx.spec.eval):
            raise SpecError(f"{self.key}.sweep", f"stage {self.params.sweep!r} measures sensitivity on the eval text "
                                                 f"({sweep.data.corpus}); an allocation chosen by the text that then "
                                                 "judges it flatters it: sweep on training text (bundled-train)")
        model = meta_model(ctx.spec.model)
        try:
            matrices(model, select(model, self.params.target).tensors, self.params.target)
        except (TargetError, ValueError) as err:
            raise SpecError(f"{self.key}.target", str(err)) from None

    def run(self, ctx: StageContext) -> StageResult:
        from sensray.study.allocation import allocate, allocation_figure

        run = ctx.output_of(self.params.sweep)
        table = allocate(ctx.spec.model, run, self.params.sparsity, self.params.spread, self.params.target)
        (ctx.dir / "allocation.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
        allocation_figure(table, f"{ctx.spec.model.name}: sparsity allotted from {run.parent.name}/{run.name}").savefig(
            ctx.dir / "allocation.png", dpi=130, facecolor="white")
        command = shell(["sensray", "prune", "--model", ctx.spec.model.name, "--method", "sensitivity", "--run",
                         str(run), "--sparsity", str(self.params.sparsity), "--spread", str(self.params.spread),
                         "--output-dir", "DIR"])
        summary = {"run": str(run), "sparsity": table["overall"], "min": table["min"], "max": table["max"]}
        return StageResult(ctx.dir, summary, f"{command}  (prunes by this allocation)")
