"""Run a sweep: every trial of an experiment spec, written to a run directory.

    python -m sensray.sweep experiments/bitflip.yaml --executor local
    python -m sensray.sweep experiments/bitflip.yaml --dry-run            # validate, count trials
    python -m sensray.sweep experiments/noise.yaml --set data.seq_len=64  # override any key
    python -m sensray.sweep experiments/bitflip.yaml --resume results/bitflip/<run id>
    python -m sensray.sweep --list-models | --list-perturbations

The last line printed is the run directory. Invalid specs exit with status 2 and one message
naming the file and key; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sensray.errors import RestoreError, SensrayError, SpecError
from sensray.plan import Plan, make_plan
from sensray.spec import load_spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sensray.sweep",
        description=__doc__.split("\n\n")[0],
        epilog="example: python -m sensray.sweep experiments/bitflip.yaml --executor local",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", nargs="?", help="experiment YAML (see experiments/)")
    parser.add_argument("--executor", choices=["local"], default="local", help="where trials run (default: local)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key, value parsed as YAML (repeatable), e.g. --set num_samples=2")
    parser.add_argument("--dry-run", action="store_true", help="validate, resolve targets, print the trial count")
    parser.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run: only trials not yet recorded")
    parser.add_argument("--list-models", action="store_true", help="print the model aliases and exit")
    parser.add_argument("--list-perturbations", action="store_true", help="print the perturbation kinds and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except SensrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are in the run's trials.jsonl; finish with --resume RUN_DIR",
              file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.list_models:
        return _list_models()
    if args.list_perturbations:
        return _list_perturbations()
    if not args.spec and not args.resume:
        raise SpecError("", "give an experiment spec (e.g. experiments/bitflip.yaml) or --resume RUN_DIR")
    if args.resume:
        return _resume(args)
    plan = make_plan(load_spec(args.spec, args.overrides))
    if args.dry_run:
        print(describe(plan))
        return 0
    return _run(plan, run_dir=None)


def _resume(args: argparse.Namespace) -> int:
    from sensray.results import RunDir

    run = RunDir.open(args.resume)
    spec = run.spec()
    if args.spec:
        given = load_spec(args.spec, args.overrides).resolved()
        changed = [k for k in given if given[k] != spec.resolved().get(k)]
        if changed:
            raise SensrayError(f"--resume: {args.spec} differs from {run.path}/spec.yaml in {', '.join(changed)}")
    plan = make_plan(spec)
    if args.dry_run:
        done = {row["trial_id"] for row in run.rows()}
        print(describe(plan) + f"\n  resume: {len(done)} done, {len(plan.trials) - len(done)} to run")
        return 0
    return _run(plan, run_dir=run)


def _run(plan: Plan, run_dir) -> int:
    from sensray.executors.local import run_local
    from sensray.progress import Progress
    from sensray.replica import Replica
    from sensray.results import Journal, RunDir
    from dataclasses import asdict

    spec = plan.spec
    replica = Replica(spec)  # loads model and data: any error here leaves nothing on disk
    run = run_dir or RunDir.create(spec)
    done = {row["trial_id"] for row in run.rows()}
    todo = [t for t in plan.trials if t.trial_id not in done]
    print(f"{spec.name}: {len(plan.trials)} trials ({len(todo)} to run) of {spec.perturbation} on "
          f"{spec.model.name} [{spec.model.dtype}, {replica.device}], baseline ppl {replica.baseline.ppl:.3f} "
          f"on {replica.baseline.tokens} tokens", file=sys.stderr)
    baseline = asdict(replica.baseline)
    run.write_baseline(baseline)
    progress = Progress(total=len(plan.trials), done=len(plan.trials) - len(todo))
    with Journal(run.journal) as journal:
        run_local(replica, todo, journal, progress)
    after = replica.checksum()
    run.write_baseline(baseline | {"checksum_after_sweep": after})
    order = {t.trial_id: i for i, t in enumerate(plan.trials)}
    rows = sorted((r for r in run.rows() if r["trial_id"] in order), key=lambda r: order[r["trial_id"]])
    run.finish(rows)
    if after != replica.baseline.checksum_at_load:
        raise RestoreError(f"weights checksum changed over the sweep ({replica.baseline.checksum_at_load} -> {after})")
    print(run.path)
    return 0


def describe(plan: Plan) -> str:
    """What a dry run prints: the trial count and what the targets resolved to."""
    spec = plan.spec
    targets = list(dict.fromkeys(str(t.params.get("target")) for t in plan.trials))
    shown = ", ".join(targets[:6]) + (f", ... ({len(targets)} in all)" if len(targets) > 6 else "")
    return (
        f"{spec.name}: {len(plan.trials)} trials of {spec.perturbation} on {spec.model.name} "
        f"[{spec.model.dtype}] (num_samples {spec.num_samples}, seed {spec.seed})\n"
        f"  targets: {shown}\n"
        f"  parameters: {', '.join(plan.trials[0].params) if plan.trials else '-'}"
    )


def _list_models() -> int:
    from sensray.models import ALIASES

    width = max(map(len, ALIASES))
    for alias, source in ALIASES.items():
        print(f"{alias:<{width}}  {source}")
    return 0


def _list_perturbations() -> int:
    from sensray.perturbations import PERTURBATIONS

    for name, kind in PERTURBATIONS.items():
        params = ", ".join(kind.Params.model_fields)
        print(f"{name:<10} {kind.summary}\n{'':<10} parameters: {params}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
