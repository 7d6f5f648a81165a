"""A format study: the same trials in several storage formats of one model, one run directory per format.

    sensray sweep experiments/bitflip-formats.yaml --executor local   # fp32, fp16, bf16, int8, nf4 in turn
    sensray sweep experiments/bitflip-formats.yaml --dry-run          # every format planned on its meta model
    sensray sweep --resume results/bitflip-formats/<study id>         # finish what is not done yet
    sensray analyze results/bitflip-formats/<study id>                # formats x bit roles

A spec with `formats:` (name -> the model keys that format changes) is a study:

    results/bitflip-formats/<study id>/
        spec.yaml            the study's spec, `formats` included
        fp32/ int8/ ...      one ordinary run directory per format: spec.yaml (`name: <study>.<format>`,
                             the format's model), baseline.json, trials.parquet

The formats run one after another, each a whole sweep with its own replicas (each format is another
model in memory). Every format runs the study's trials with the same trial ids (an id hashes the
parameters), and a bitflip `role` trial draws its weights from the seed and target alone, so the
rows of one trial id in every format flip the same weight in the same bit role: they join on
`trial_id`. A trial a format cannot express (role `scale` on float32 weights: they have no scale)
is left out of that format's run, and the dry run says how many.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sensray.plan import Plan, make_plan
from sensray.spec import ExperimentSpec

STUDY_SPEC = "spec.yaml"


def plans(spec: ExperimentSpec, max_trials: int) -> dict[str, Plan]:
    """Each format's plan, validated on that format's meta model, not-applicable trials left out."""
    return {name: make_plan(fmt, max_trials=max_trials, skip_not_applicable=True)
            for name, fmt in spec.format_specs().items()}


def describe(spec: ExperimentSpec, planned: dict[str, Plan]) -> str:
    from sensray.sweep import describe as describe_plan

    lines = [f"{spec.name}: a format study, {len(planned)} formats, one run directory each"]
    for name, plan in planned.items():
        text = describe_plan(plan)
        if plan.left_out:
            text += f"\n  left out: {len(plan.left_out)} trials ({plan.left_out[0]})"
        lines.append(f"[{name}] " + text)
    return "\n".join(lines)


def run_study(spec: ExperimentSpec, study_dir, args, interrupted, options: dict) -> int:
    """Plan and check every format, then run each format not finished yet; prints the study directory."""
    from sensray.results import RunDir
    from sensray.sweep import _checked_source

    planned = plans(spec, args.max_trials)
    replicas_here = args.executor == "local" or args.address is None
    left = {}
    for name, plan in planned.items():
        run = _format_run(study_dir, name)
        left[name] = _checked_source(plan, run, replicas_here)
    if args.dry_run:
        print(describe(spec, planned))
        return 0
    study = study_dir.path if study_dir is not None else RunDir.create(spec).path
    interrupted.run = study
    for name, plan in planned.items():
        _run_format(study, name, plan, left[name], args.executor, options)
    print(study)
    return 0


def _format_run(study_dir, name: str):
    from sensray.results import RunDir

    if study_dir is None or not (study_dir.path / name / STUDY_SPEC).is_file():
        return None
    return RunDir.open(study_dir.path / name)


def _run_format(study: Path, name: str, plan: Plan, left, executor: str, options: dict) -> None:
    from sensray.results import RunDir
    from sensray.sweep import Interrupted, _run

    path = study / name
    if (path / "trials.parquet").is_file():
        print(f"{plan.spec.name}: finished ({path})", file=sys.stderr)
        return
    run = RunDir.open(path) if (path / STUDY_SPEC).is_file() else RunDir.create(plan.spec, path)
    # The study's interrupt message names the study (`--resume STUDY`), not this format's directory.
    _run(plan, run, executor, interrupted=Interrupted(), left=left, **options)
