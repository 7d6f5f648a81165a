"""sensray attack: the fewest bit flips that break a model, found with gradients, checked exactly.

    sensray attack experiments/attack-bitflip.yaml                      # a local Ray on 127.0.0.1
    sensray attack experiments/attack-bitflip.yaml --address auto       # the replicas of a running cluster
    sensray attack experiments/attack-bitflip.yaml --executor local     # one replica in this process
    sensray attack experiments/attack-bitflip.yaml --set attack.field=mantissa --dry-run
    sensray attack --resume results/attack-bitflip/<run id>              # after a crash or Ctrl-C

Each step one replica ranks candidate flips by the gradient of the attack text's loss; the best
candidates run as ordinary bitflip trials on the replica pool; the one that damages most is committed
on every replica (and journaled, so --resume continues the same sequence). Writes the flip sequence,
every evaluated candidate, a random-flip baseline, damage.png and report.md to
<output_dir>/<name>/<run id>/ (printed last). `sensray generate --attack DIR` gives the attacked
model's text. Invalid specs exit with status 2 and one message naming the file and key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sensray import sweep
from sensray.cli_options import add_replica_options, add_spec_options
from sensray.errors import SpecError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sensray.attack", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_options(p, spec="attack YAML (see experiments/attack-*.yaml)", set_example="stop.max_flips=5",
                     dry_run="validate against the model's structure; load nothing",
                     resume="continue an interrupted attack (--set may change only resources.*)")
    add_replica_options(p)
    return p


class Interrupted(sweep.Interrupted):
    def __call__(self) -> str:
        if self.run is None:
            return "nothing was written (the attack stopped before its directory existed)"
        return f"the committed flips are in {self.run / 'flips.jsonl'}; continue with --resume {self.run}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupted = Interrupted()

    def command() -> int:
        with sweep._terminate_as_interrupt():
            return _dispatch(args, interrupted)

    return run_cli(command, interrupted=interrupted)


def _dispatch(args: argparse.Namespace, interrupted: Interrupted) -> int:
    from sensray.attack.checks import check_attack, describe
    from sensray.attack.state import AttackRun
    from sensray.spec import check_remote_code
    from sensray.sweep import _attributed, _executor_options

    if not args.spec and not args.resume:
        raise SpecError("", "give an attack spec (e.g. experiments/attack-bitflip.yaml) or --resume RUN_DIR")
    options = _executor_options(args)
    run = AttackRun.open(args.resume) if args.resume else None
    spec, source = _spec(args, run)
    with _attributed(source):
        check_remote_code(spec.model, args.trust_remote_code)
        if run is not None and run.finished:
            print(f"{run.path} is finished ({run.summary()['stop_reason']}); nothing to run", file=sys.stderr)
            print(run.path)
            return 0
        meta = check_attack(spec, replicas_here=args.executor == "local" or args.address is None,
                            run=run.path if run is not None else None)
        if args.dry_run:
            done = f"\n  resume: {len(run.flips())} flips committed" if run is not None else ""
            print(describe(spec, meta) + done)
            return 0
    return _run(spec, run, args.executor, options, interrupted)


def _spec(args: argparse.Namespace, run):
    """The spec and its file; resuming, the run's own spec.yaml, of which only `resources` may change."""
    from sensray.attack.spec import load_attack_spec

    if run is None:
        return load_attack_spec(args.spec, args.overrides), Path(args.spec)
    given = load_attack_spec(args.spec, args.overrides) if args.spec else run.spec(args.overrides)
    before, after = run.spec().resolved(), given.resolved()
    changed = [key for key in after if key != "resources" and after[key] != before.get(key)]
    if changed:
        raise SpecError("--resume", f"differs from {run.path / 'spec.yaml'} in {', '.join(changed)}; an attack "
                                    "resumes as it started (only resources.* may change)")
    return given, Path(args.spec) if args.spec else run.path / "spec.yaml"


def _run(spec, run, executor_name: str, options: dict, interrupted: Interrupted) -> int:
    from sensray.attack.loop import run_attack
    from sensray.attack.report import finish

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def on_run(made) -> None:
        interrupted.run = made.path

    made, summary = run_attack(spec, run, executor_name, options, log, on_run)
    finish(made, summary)
    log(summary["stop_reason"])
    print(made.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
