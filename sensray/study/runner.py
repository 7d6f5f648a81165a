"""Running a study: every stage in order, each in its own directory, skipping what is done and current.

    steps = plan(study, root)        # each stage with its input hash and status: done, changed, to run, ...
    check(study)                     # what --dry-run validates, stage by stage, before anything exists
    run(study, root, only=None)      # run what is not done; `only`: one stage whose inputs are done

A stage's stdout (the tables and paths its command prints) goes to <stage>/output.txt; progress and
errors stay on stderr. The journal line is written only when a stage has finished, so an
interrupted study resumes at the stage it was in (and that stage resumes its own work).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sensray.errors import SpecError
from sensray.study import journal
from sensray.study.stages import Record, Stage, StageContext, log

STATUS_DONE, STATUS_CHANGED, STATUS_INTERRUPTED, STATUS_NEW = "done", "changed", "interrupted", "to run"


@dataclass(frozen=True)
class Step:
    stage: Stage
    input_hash: str
    status: str


def plan(study, root: Path | None) -> list[Step]:
    """Each stage's input hash, and what a run would do with it given the journal in `root`."""
    records = journal.records(root) if root is not None else {}
    hashes: dict[str, str] = {}
    steps = []
    for stage in study.stages:
        digest = journal.input_hash(study, stage, hashes)
        hashes[stage.name] = digest
        steps.append(Step(stage, digest, _status(root, stage, digest, records.get(stage.name))))
    return steps


def _status(root: Path | None, stage: Stage, digest: str, record: Record | None) -> str:
    if record is not None and record.input_hash == digest and (root / record.output).exists():
        return STATUS_DONE
    if root is not None and journal.started(root / stage.name) == digest:
        return STATUS_INTERRUPTED
    return STATUS_CHANGED if record is not None else STATUS_NEW


def check(study) -> None:
    """Every stage's own checks (files, models' structure, parameters), in order."""
    for stage in study.stages:
        stage.check(StageContext(study, stage, study.probe_dir / stage.name, {}))


def run(study, root: Path, only: str | None = None) -> list[Step]:
    """Run every stage not done (or only `only`); returns the plan as it stood before the run."""
    steps = plan(study, root)
    if only is not None:
        _check_only(steps, only)
    records = journal.records(root)
    for number, step in enumerate(steps, 1):
        name = step.stage.name
        if only is not None and name != only:
            continue
        if step.status == STATUS_DONE and only is None:
            log(f"[{number}/{len(steps)}] {name} ({step.stage.kind}): done, inputs unchanged: skipped")
            continue
        if step.status == STATUS_DONE:  # --stage NAME asks for it explicitly: run it again from scratch
            step = Step(step.stage, step.input_hash, STATUS_CHANGED)
        log(f"[{number}/{len(steps)}] {name} ({step.stage.kind}): {_verb(step.status)}")
        records[name] = run_stage(study, root, step, records)
        log(f"[{number}/{len(steps)}] {name}: finished in {records[name].seconds:.1f} s -> {records[name].output}")
    return steps


def run_stage(study, root: Path, step: Step, records: dict[str, Record]) -> Record:
    stage, directory = step.stage, root / step.stage.name
    resume = step.status == STATUS_INTERRUPTED
    if directory.exists() and not resume:
        shutil.rmtree(directory)  # started with other inputs: nothing in it is this stage's result
    journal.mark_started(directory, stage, step.input_hash)
    ctx = StageContext(study, stage, directory, dict(records), resume)
    start = time.perf_counter()
    with open(directory / "output.txt", "a", encoding="utf-8") as out, contextlib.redirect_stdout(out):
        result = stage.run(ctx)
    record = Record(stage.name, stage.kind, step.input_hash, str(result.output.relative_to(root)),
                    time.perf_counter() - start, time.strftime("%Y-%m-%dT%H:%M:%S%z"), result.summary,
                    result.command)
    journal.append(root, record)
    return record


def _verb(status: str) -> str:
    return {STATUS_INTERRUPTED: "interrupted before: continuing it", STATUS_CHANGED: "inputs changed: running again",
            STATUS_NEW: "running"}[status]


def _check_only(steps: list[Step], only: str) -> None:
    """--stage NAME: the stage exists and every stage it reads is done with the current inputs."""
    by_name = {step.stage.name: step for step in steps}
    if only not in by_name:
        raise SpecError("--stage", f"no stage {only!r} in this study (stages: {', '.join(by_name)})")
    target = by_name[only].stage
    reads = [s.stage.name for s in steps[: target.index]] if target.reads_all else target.upstream()
    pending = [name for name in reads if by_name[name].status != STATUS_DONE]
    if pending:
        raise SpecError("--stage", f"{only!r} reads {', '.join(pending)}, not done with the current inputs; run the "
                                   "study without --stage first (it skips what is done)")
