"""The registry of stage kinds a study is made of, and what every kind shares.

A kind is a class: `kind` (its name in the spec), `summary`, `Params` (its keys, strict pydantic),
`produces` (what its output is: sweep, analysis, allocation, model, evaluation, report), `needs`
(which of its keys name earlier stages, and what those must produce), then `check(ctx)` (what a
dry run validates) and `run(ctx)` (do the work in ctx.dir; return a StageResult). A new kind is
one class with `@register` (e.g. an input attack that produces a `sweep`):

    @register
    class Adversarial(Stage):
        kind, summary, produces = "adversarial", "input attack on a model", "sweep"
        Params = AdversarialParams
        needs = {"model": ("model",)}
        def run(self, ctx): return ctx.call("adversarial", [...])

`model` keys may also name `dense`: the study's own model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sensray.errors import SensrayError, SpecError
from sensray.registry import Registry
from sensray.spec import Frozen

DENSE = "dense"  # a model reference to the study's own model; no stage may take the name


@dataclass
class StageResult:
    output: Path  # what later stages read: a run directory, a model directory, the stage directory
    summary: dict[str, Any] = field(default_factory=dict)  # a few numbers for the journal and the report
    command: str | None = None  # the standalone command that does the same, where there is one


@dataclass(frozen=True)
class Record:
    """A finished stage, as the study journal lists it."""

    stage: str
    kind: str
    input_hash: str
    output: str  # relative to the study directory
    seconds: float
    finished: str
    summary: dict[str, Any]
    command: str | None


class Stage:
    kind: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[Frozen]]
    produces: ClassVar[str]
    needs: ClassVar[dict[str, tuple[str, ...]]] = {}
    uses_eval: ClassVar[bool] = False  # its result depends on the study's eval text
    reads_all: ClassVar[bool] = False  # it reads every earlier stage (the report): all of them are its inputs

    def __init__(self, name: str, index: int, params: Frozen):
        self.name, self.index, self.params = name, index, params

    @property
    def key(self) -> str:
        return f"stages[{self.index}]"

    def refs(self) -> dict[str, list[str]]:
        """Each referring key -> the stage names (or `dense`) it names."""
        out = {}
        for param in self.needs:
            value = getattr(self.params, param)
            out[param] = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        return out

    def upstream(self) -> list[str]:
        return [name for names in self.refs().values() for name in names if name != DENSE]

    def describe(self) -> str:
        """One line for the dry run: the keys given in the spec (defaults left out)."""
        given = self.params.model_dump(mode="json", exclude_defaults=True)
        return ", ".join(f"{key}: {_short(value)}" for key, value in given.items())

    def hashed(self, ctx) -> dict[str, Any]:
        """What besides its params and upstream stages its output depends on (e.g. a file's content)."""
        return {}

    def check(self, ctx) -> None:
        """What a dry run can validate before any earlier stage has run."""

    def run(self, ctx) -> StageResult:
        raise NotImplementedError


STAGES: Registry[type[Stage]] = Registry("stage kind")
# The modules that define sensray's own kinds, imported when a study is read (not by `sensray --help`).
BUILTIN = ("sensray.study.sweeps", "sensray.study.exports", "sensray.study.evaluation", "sensray.study.report")


def register(cls: type[Stage]) -> type[Stage]:
    return STAGES.register(cls.kind)(cls)


def load_kinds() -> Registry[type[Stage]]:
    import importlib

    for module in BUILTIN:
        importlib.import_module(module)
    return STAGES


@dataclass
class StageContext:
    """One stage's view of the study: its directory, the records of the stages before it."""

    study: Any  # study.spec.Study
    stage: Stage
    dir: Path
    records: dict[str, Record]
    resume: bool = False  # the stage started before with the same inputs: continue it

    @property
    def spec(self):
        return self.study.spec

    def output_of(self, name: str) -> Path:
        """The output of earlier stage `name` (a model reference `dense` is the study's model)."""
        if name == DENSE:
            return Path(self.spec.model.name)
        return self.study.root / self.records[name].output

    def model_name(self, name: str) -> str:
        return self.spec.model.name if name == DENSE else str(self.output_of(name))

    def stage_named(self, name: str) -> Stage:
        return self.study.stage(name)

    def on_cluster(self, fn, *args):
        """fn(*args) in this process; with `executor: ray`, as a Ray task on a node with a GPU when the
        cluster has one: what loads a whole model runs where it fits, not on a small CPU head node."""
        if self.spec.executor != "ray":
            return fn(*args)
        import ray

        from sensray.executors.ray import _cause, connect

        connect(self.spec.address)  # the study connected already: this keeps that connection
        gpus = 1 if self.spec.model.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        try:
            return ray.get(ray.remote(num_gpus=gpus, num_cpus=1, max_retries=0)(fn).remote(*args))
        except ray.exceptions.RayTaskError as err:
            raise _cause(err) from None

    def call(self, command: str, argv: list[str], on_cluster: bool = False) -> None:
        """Run `sensray COMMAND ARGV` in this process, as a user would; a failure stops the study."""
        code = self.on_cluster(run_command, command, argv) if on_cluster else run_command(command, argv)
        if code == 130:
            raise KeyboardInterrupt
        if code != 0:
            raise SensrayError(f"stage {self.stage.name}: `{shell(['sensray', command, *argv])}` exited {code} "
                               f"(its message is above)")


def run_command(command: str, argv: list[str]) -> int:
    """`sensray COMMAND ARGV` in this process; its exit status."""
    from sensray.cli import call

    return call(command, argv, prog=f"sensray {command}")


def shell(argv: list[str]) -> str:
    """A command line a user can paste."""
    import shlex

    return " ".join(shlex.quote(str(a)) for a in argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_refs(stages: list[Stage], produced: dict[str, str]) -> None:
    """Every reference names an earlier stage that makes what the referring key needs (SpecError otherwise)."""
    earlier: dict[str, str] = {}
    for stage in stages:
        for param, names in stage.refs().items():
            allowed = stage.needs[param]
            for i, name in enumerate(names):
                where = f"{stage.key}.{param}" + (f"[{i}]" if isinstance(getattr(stage.params, param), list) else "")
                _check_ref(name, where, allowed, earlier, produced)
        earlier[stage.name] = stage.produces


def _check_ref(name: str, where: str, allowed: tuple[str, ...], earlier: dict[str, str], all_: dict[str, str]) -> None:
    import difflib

    if name == DENSE and "model" in allowed:
        return
    if name not in earlier:
        makers = [n for n, made in earlier.items() if made in allowed] + ([DENSE] if "model" in allowed else [])
        close = difflib.get_close_matches(name, makers, n=1)
        later = " (it comes later: a stage reads only the stages before it)" if name in all_ else ""
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError(where, f"{name!r} is not an earlier stage{later}{hint} (earlier stages that make "
                               f"{' or '.join(allowed)}: {', '.join(makers) or 'none'})")
    if earlier[name] not in allowed:
        raise SpecError(where, f"stage {name!r} makes {a(earlier[name])}, not {' or '.join(map(a, allowed))}")


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def a(product: str) -> str:
    return ("an " if product[0] in "aeiou" else "a ") + product
