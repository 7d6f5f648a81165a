"""A study spec: the model, the eval text, and a list of stages that each read earlier ones.

    name: integrated
    model: {name: sensray-tiny}
    eval: {corpus: bundled, seq_len: 128, num_sequences: 16, batch_size: 16}
    stages:
      - {name: sensitivity, kind: sweep, experiment: prune-layers.yaml}
      - {name: allocation, kind: allocate, sweep: sensitivity, sparsity: 0.5}
      - {name: pruned, kind: prune, method: sensitivity, score: wanda, allocation: allocation}
      - {name: healed, kind: heal, model: pruned, method: lora, steps: 100}
      - {name: evaluation, kind: evaluate, models: [dense, pruned, healed]}
      - {name: report, kind: report, evaluation: evaluation}

Read like an experiment spec (sensray.safe_yaml, strict pydantic, key paths in every error,
`--set` overrides first; `--set healed.steps=10` sets a key of the stage named `healed`). Every
stage is validated by its kind, and every reference must name an earlier stage that makes what
the key needs, so a study that could not run fails at --dry-run, before anything is written.
A sweep stage's `experiment:` file is read relative to the study file and kept inline in the
study directory's study.yaml, which therefore resumes on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, field_validator

from sensray import safe_yaml
from sensray.errors import SpecError
from sensray.heal.recipe import EVAL_TEXT
from sensray.spec import (MAX_NAME, SLUG, DataSpec, Frozen, ModelSpec, apply_override, describe, key_path,
                          read_spec_text, run_name)
from sensray.study.stages import DENSE, Stage, check_refs, load_kinds



class StudySpec(Frozen):
    name: str = Field(max_length=MAX_NAME)
    description: str = ""
    model: ModelSpec = ModelSpec()
    eval: DataSpec = EVAL_TEXT
    output_dir: str = "results"
    executor: Literal["local", "ray"] = Field("local", description="where sweep stages run their trials")
    address: Optional[str] = Field(None, description="Ray cluster for sweeps and multi-worker heals (null: local)")
    threads: Optional[int] = Field(None, ge=1, description="torch threads in the study's process (null: torch's)")
    stages: list[dict[str, Any]] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        return run_name(name)


@dataclass
class Study:
    spec: StudySpec
    stages: list[Stage]
    base: Path  # the directory relative paths in the spec are read from
    source: Path | None = None  # the file it was read from
    root: Path | None = None  # the study directory, once there is one

    @property
    def probe_dir(self) -> Path:
        """The study directory, or one like it for checks that a path could be made (never created)."""
        return self.root or Path(self.spec.output_dir) / self.spec.name / "00000000-000000-000000"

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def resolved(self) -> dict[str, Any]:
        """The spec as study.yaml records it: the study's defaults filled in, each stage's keys as given
        (a stage's defaults are its kind's), experiment files inlined."""
        data = self.spec.model_dump(mode="json")
        data["stages"] = [{"name": s.name, "kind": s.kind, **s.params.model_dump(mode="json", exclude_unset=True)}
                          for s in self.stages]
        return data


def load_study(path: str | Path, overrides: list[str] = ()) -> Study:
    """Read, override and validate a study file; every failure is a SpecError naming the file."""
    try:
        raw = safe_yaml.load(read_spec_text(path))
        if not isinstance(raw, dict):
            raise SpecError("", f"must be a mapping of keys to values, got {type(raw).__name__}")
        study = parse_study(raw, Path(path).resolve().parent, overrides)
        study.source = Path(path)
        return study
    except SpecError as err:
        raise err.located(str(path)) from None


def is_study(raw: Any) -> bool:
    """A parsed YAML document is a study spec (it lists stages), not an experiment spec."""
    return isinstance(raw, dict) and "stages" in raw


def parse_study(raw: dict[str, Any], base: Path, overrides: list[str] = ()) -> Study:
    for override in overrides:
        _override(raw, override)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise SpecError(key_path(first["loc"]), describe(first)) from None
    stages = [_stage(entry, i, base) for i, entry in enumerate(spec.stages)]
    _unique(stages)
    check_refs(stages, {s.name: s.produces for s in stages})
    return Study(spec, stages, base)


def _stage(entry: dict[str, Any], index: int, base: Path) -> Stage:
    key = f"stages[{index}]"
    name, kind = entry.get("name"), entry.get("kind")
    if not isinstance(name, str) or not SLUG.fullmatch(name):
        raise SpecError(f"{key}.name", f"every stage needs a name: a slug of letters, digits, '_', '.', '-' "
                                       f"(it names the stage's directory), got {name!r}")
    if name == DENSE:
        raise SpecError(f"{key}.name", f"{DENSE!r} means the study's own model; give the stage another name")
    kinds = load_kinds()
    if kind not in kinds:
        raise SpecError(f"{key}.kind", kinds.unknown(kind))
    cls = kinds.get(kind)
    params = {k: v for k, v in entry.items() if k not in ("name", "kind")}
    if hasattr(cls, "prepare"):
        params = cls.prepare(params, base, key)  # e.g. a sweep stage reads its experiment file
    try:
        return cls(name, index, cls.Params.model_validate(params))
    except ValidationError as err:
        first = err.errors()[0]
        raise SpecError(".".join(filter(None, (key, key_path(first["loc"])))), describe(first)) from None


def _unique(stages: list[Stage]) -> None:
    seen: dict[str, int] = {}
    for stage in stages:
        if stage.name in seen:
            raise SpecError(f"{stage.key}.name", f"{stage.name!r} is already the name of stages[{seen[stage.name]}]; "
                                                 "each stage needs its own name")
        seen[stage.name] = stage.index


def _override(raw: dict[str, Any], override: str) -> None:
    """`--set KEY=VALUE`; a KEY starting with a stage's name sets a key of that stage."""
    head = override.partition("=")[0].split(".")[0]
    entries = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    stage = next((e for e in entries if isinstance(e, dict) and e.get("name") == head), None)
    if stage is None:
        apply_override(raw, override)
        return
    try:
        apply_override(stage, override[len(head) + 1:])
    except SpecError as err:
        raise SpecError(f"{head}.{err.path}", err.message) from None
