"""Run a study: stages that each read earlier ones (sweep, allocate, prune, heal, evaluate, report).

    sensray study experiments/integrated.yaml                      # every stage, into results/integrated/<id>
    sensray study experiments/integrated.yaml --dry-run            # check every stage, write nothing
    sensray study experiments/integrated.yaml --resume results/integrated/<study id>
    sensray study --resume results/integrated/<study id>          # the study.yaml saved there
    sensray study experiments/integrated.yaml --model data/my-model --set healed-lora.steps=300
    sensray study experiments/integrated.yaml --resume results/integrated/<id> --stage report

Each stage writes its own directory inside the study directory and a journal line with the hash
of its inputs. --resume skips every stage whose inputs are unchanged, continues one that was
interrupted, and runs again whatever an edit changed, with everything after it. --stage NAME
runs one stage alone, again if it was done (the stages it reads must be done). The last line printed is the study
directory; its report stage writes report.md and report.html. Invalid specs exit with status 2
and one message naming the file and key; nothing is written. docs/study.md describes the kinds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from sensray.cli_options import add_spec_options
from sensray.errors import SpecError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sensray.study", description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_options(parser, spec="study YAML (e.g. experiments/integrated.yaml)",
                     set_example="healed-lora.steps=300 (STAGE.KEY=VALUE: a key of the stage named STAGE)",
                     dry_run="check every stage and say what would run",
                     resume="continue a study directory: skip what is done", resume_metavar="STUDY_DIR")
    parser.add_argument("--stage", metavar="NAME", help="run only this stage (with --resume; its inputs done)")
    return parser


class Interrupted:
    def __init__(self) -> None:
        self.root: Path | None = None

    def __call__(self) -> str:
        if self.root is None:
            return "nothing was written"
        return f"finished stages are listed in {self.root / 'journal.jsonl'}; continue with --resume {self.root}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupted = Interrupted()
    return run_cli(lambda: _run(args, interrupted), interrupted=interrupted)


def _run(args: argparse.Namespace, interrupted: Interrupted) -> int:
    from sensray.results import new_run_id
    from sensray.spec import check_remote_code
    from sensray.study import runner

    study = _study(args)
    check_remote_code(study.spec.model, args.trust_remote_code)
    if args.stage and not args.resume:
        raise SpecError("--stage", "runs one stage of an existing study: give --resume STUDY_DIR too")
    study.root = Path(args.resume) if args.resume else None
    try:
        runner.check(study)
    except SpecError as err:  # the stages' own checks: name the study file, as parse errors do
        raise err if err.source else err.located(str(study.source)) from None
    steps = runner.plan(study, study.root)
    if args.dry_run:
        print(describe(study, steps))
        return 0
    print(describe(study, steps), file=sys.stderr)
    if study.root is None:
        study.root = _create(Path(study.spec.output_dir) / study.spec.name / new_run_id())
    interrupted.root = study.root
    _save(study)
    if study.spec.threads:
        import torch

        torch.set_num_threads(study.spec.threads)
    with _ray(study.spec):
        runner.run(study, study.root, only=args.stage)
    print(closing(study), file=sys.stderr)
    print(study.root)
    return 0


@contextlib.contextmanager
def _ray(spec):
    """`executor: ray`: one Ray connection for every stage (sweeps, heals, tasks), stopped at the end if started."""
    if spec.executor != "ray":
        yield
        return
    import ray

    from sensray.executors.ray import connect

    started = connect(spec.address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _study(args: argparse.Namespace):
    from sensray.study.spec import load_study

    if args.spec:
        return load_study(args.spec, args.overrides)
    if not args.resume:
        raise SpecError("", "give a study spec (e.g. experiments/integrated.yaml) or --resume STUDY_DIR")
    saved = Path(args.resume) / "study.yaml"
    if not saved.is_file():
        raise SpecError("--resume", f"{args.resume} is not a study directory (no study.yaml)")
    return load_study(saved, args.overrides)


def _create(root: Path) -> Path:
    try:
        root.mkdir(parents=True)
    except OSError as err:
        raise SpecError("output_dir", f"cannot create the study directory {root}: {err.strerror or err}") from None
    return root


def _save(study) -> None:
    """study.yaml: the spec as this run reads it, files inlined, so --resume alone can read it back."""
    import yaml

    text = yaml.safe_dump(study.resolved(), sort_keys=False)
    tmp = study.root / "study.yaml.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(study.root / "study.yaml")


def describe(study, steps) -> str:
    spec = study.spec
    lines = [f"{spec.name}: {len(study.stages)} stages on {spec.model.name} [{spec.model.dtype}]; eval on "
             f"{spec.eval.corpus} ({spec.eval.max_sequences or 'all'} windows of {spec.eval.seq_len} tokens)"]
    width = max(len(s.name) for s in study.stages)
    for number, step in enumerate(steps, 1):
        stage = step.stage
        lines.append(f"  {number:>2}. {stage.name:<{width}}  {stage.kind:<8}  {step.status:<11}  {stage.describe()}")
    where = study.root or Path(spec.output_dir) / spec.name / "<study id>"
    counts = {status: sum(s.status == status for s in steps) for status in dict.fromkeys(s.status for s in steps)}
    lines.append(f"  study directory: {where} ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    return "\n".join(lines)


def closing(study) -> str:
    """Each stage's time, each evaluated model's ppl and achieved sparsity (from the last report), where it all is."""
    from sensray.study import journal

    records = journal.records(study.root)
    times = ", ".join(f"{name} {r.seconds:.0f} s" for name, r in records.items())
    reports = [study.root / r.output for r in records.values() if r.kind == "report"]
    lines = [f"study {study.spec.name} finished; stage times: {times}"]
    if reports:
        lines += model_lines(json.loads((reports[-1] / "summary.json").read_text())["models"])
        lines.append(f"report: {reports[-1] / 'report.md'}")
    return "\n".join(lines)


def model_lines(models: dict) -> list[str]:
    """`name: ppl P, sparsity S` per model, and what it descends from: the numbers a reader checks first."""
    width = max(map(len, models))
    return [f"  {name:<{width}}  ppl {m['ppl']:8.4f}  sparsity {m['sparsity']:7.2%}"
            + (f"  ({m['healing']} heal of {m['arm']})" if m["healing"] != "none" else "")
            for name, m in models.items()]


if __name__ == "__main__":
    sys.exit(main())
