"""Find input edits that mislead a model (GCG, HotFlip), and test them on damaged weights.

    sensray adversarial experiments/adversarial.yaml                 # the shipped model, minutes on 2 cores
    sensray adversarial experiments/adversarial.yaml --dry-run       # check inputs, count the attacks
    sensray adversarial experiments/adversarial.yaml --model data/tiny-wanda50 --set attack.steps=20
    sensray adversarial --resume results/adversarial/<run id>        # finish an interrupted attack
    sensray adversarial --resume results/adversarial/<run id> --transfer results/prune/<run id> --trials top:5
    sensray adversarial experiments/adversarial.yaml --transfer data/tiny-wanda50
    sensray adversarial experiments/adversarial-mistral-7b.yaml --address auto

The last line printed is the run directory. With --transfer (repeatable: a finished sweep run on the
same model, or an exported model directory) the found inputs are then measured under each weight
condition (sensray.adversarial.damage). Invalid specs and inputs exit with status 2 and one line
naming the file and key; nothing is written. A spec never runs code by itself (--trust-remote-code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sensray.cli_options import add_replica_options, add_spec_options
from sensray.errors import SpecError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sensray.adversarial", description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_options(parser, spec="adversarial spec YAML (experiments/adversarial*.yaml)",
                     set_example="attack.steps=20",
                     dry_run="check the spec, inputs and transfer sources; print the attacks; write nothing",
                     resume="finish an interrupted attack (--set may change only resources.*); a finished one is "
                            "left as it is")
    add_replica_options(parser, decided_by="ray when more than one replica or --address is asked for")
    parser.add_argument("--transfer", action="append", default=[], metavar="RUN_OR_MODEL",
                        help="after the attack, measure its inputs under a sweep run's trials or an exported "
                             "model (repeatable)")
    parser.add_argument("--trials", default="top:5", help="with --transfer RUN: top:K (most damaging), spread:K "
                                                          "(over the range of damage), all, or ids,... (top:5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from sensray.sweep import Interrupted, _terminate_as_interrupt

    class Steps(Interrupted):
        def __call__(self) -> str:  # what Ctrl-C leaves: the steps journal, not a trial journal
            if self.run is None:
                return "nothing was written (the attack stopped before its run directory existed)"
            return f"finished steps are in {self.run / 'steps.jsonl'}; finish with --resume {self.run}"

    args = build_parser().parse_args(argv)
    interrupted = Steps()

    def command() -> int:
        with _terminate_as_interrupt():
            return _dispatch(args, interrupted)

    return run_cli(command, interrupted=interrupted)


def _dispatch(args: argparse.Namespace, interrupted) -> int:
    from sensray.adversarial.plan import describe, make_attack_plan, preflight
    from sensray.adversarial.pool import default_executor
    from sensray.adversarial.store import AttackRun
    from sensray.spec import check_remote_code

    if not args.spec and not args.resume:
        raise SpecError("", "give an adversarial spec (e.g. experiments/adversarial.yaml) or --resume RUN_DIR")
    if args.trials != "top:5" and not args.transfer:
        raise SpecError("--trials", "selects the trials of a --transfer RUN; give --transfer too")
    run = AttackRun.open(args.resume) if args.resume else None
    spec, source = _spec(args, run)
    check_remote_code(spec.model, args.trust_remote_code)
    executor = args.executor or default_executor(spec, args.address, args.replicas)
    try:
        plan = make_attack_plan(spec, cases=run.cases() if run is not None else None)
        conditions = _transfer_plan(spec, args, plan)
        preflight(spec, executor, Path(args.resume) if args.resume else None)
    except SpecError as err:
        if err.source or err.path.startswith("--"):
            raise
        raise err.located(source) from None
    if args.dry_run:
        finished = "; finished (nothing to search)" if run is not None and run.table.is_file() else ""
        print(describe(plan) + finished + (f"\n  transfer: {len(conditions)} weight conditions (the undamaged "
                                           "model included)" if conditions else ""))
        return 0
    return _run(spec, plan, args, executor, interrupted)


def _run(spec, plan, args, executor: str, interrupted) -> int:
    from sensray.adversarial.run import run_attack, summary_text

    options = dict(executor=executor, address=args.address, replicas=args.replicas)
    interrupted.run = Path(args.resume) if args.resume else None
    path = run_attack(spec, plan.cases, resume=args.resume, on_run=lambda p: setattr(interrupted, "run", p),
                      **options)
    print(summary_text(path) + f"\n  clean vs adversarial continuations: {path / 'continuations.md'}",
          file=sys.stderr)
    if args.transfer:
        _transfer(path, args, options)
    print(path)
    return 0


def _transfer(path: Path, args, options: dict) -> None:
    import polars as pl

    from sensray.adversarial.damage import transfer
    from sensray.adversarial.damage_report import text_summary

    table = transfer(path, args.transfer, args.trials, **options)
    summary = pl.read_parquet(table.with_name("transfer-summary.parquet"))
    print(f"transfer ({table}):\n{text_summary(summary)}", file=sys.stderr)


def _transfer_plan(spec, args, plan) -> list:
    from sensray.adversarial.damage import plan_transfer
    from sensray.models import load_tokenizer

    if not args.transfer:
        return []
    return plan_transfer(spec, args.transfer, args.trials, plan.meta, load_tokenizer(spec.model))


def _spec(args: argparse.Namespace, run):
    """The spec to run and the file it came from. Resuming, it is the run's own spec.yaml with any --set (or
    a spec file) applied, and only `resources` may differ: where the attack runs may change, not what it is."""
    from sensray.adversarial.spec import load_adversarial_spec

    if run is None:
        return load_adversarial_spec(args.spec, args.overrides), args.spec
    recorded = run.spec()
    given = load_adversarial_spec(args.spec, args.overrides) if args.spec else run.spec(args.overrides)
    before, after = recorded.resolved(), given.resolved()
    changed = [key for key in after if key != "resources" and after[key] != before.get(key)]
    if changed:
        raise SpecError("--resume", f"{args.spec or '--set'} differs from {run.path / 'spec.yaml'} in "
                                    f"{', '.join(changed)}; an attack resumes as it started (only resources.* "
                                    "may change)")
    return given, args.spec or str(run.path / "spec.yaml")


if __name__ == "__main__":
    sys.exit(main())
