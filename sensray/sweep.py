"""Run a sweep: every trial of an experiment spec, written to a run directory.

    python -m sensray.sweep experiments/bitflip.yaml                     # Ray: a local one on 127.0.0.1
    python -m sensray.sweep experiments/bitflip.yaml --address auto      # Ray: a running cluster
    python -m sensray.sweep experiments/bitflip.yaml --executor local    # in this process, no Ray
    python -m sensray.sweep experiments/bitflip.yaml --dry-run            # validate, count trials
    python -m sensray.sweep experiments/noise.yaml --model pythia-70m --output-dir runs
    python -m sensray.sweep experiments/noise.yaml --set data.seq_len=64  # override any key
    python -m sensray.sweep experiments/bitflip.yaml --resume results/bitflip/<run id>
    python -m sensray.sweep --list-models | --list-perturbations

The last line printed is the run directory. Invalid specs exit with status 2 and one message
naming the file and key; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading

from sensray.errors import RestoreError, SensrayError, SpecError, run_cli
from sensray.executors import EXECUTORS
from sensray.plan import Plan, make_plan
from sensray.spec import load_spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sensray.sweep",
        description=__doc__.split("\n\n")[0],
        epilog="example: python -m sensray.sweep experiments/bitflip.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", nargs="?", help="experiment YAML (see experiments/)")
    parser.add_argument("--executor", choices=list(EXECUTORS), default=default_executor(),
                        help="where trials run: 'ray' (replica actors on a local Ray or a cluster) or 'local' "
                             "(one replica in this process, no Ray); default: ray when it is installed")
    parser.add_argument("--address", help="Ray only: a running cluster to join ('auto' on its head node); "
                                          "default: start a Ray on this machine, bound to 127.0.0.1")
    parser.add_argument("--replicas", type=_replicas, metavar="N|auto",
                        help="Ray only: how many replicas (default: the spec's resources.replicas)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key, value parsed as YAML (repeatable), e.g. --set num_samples=2")
    parser.add_argument("--model", action=_SetKey, key="model.name", dest="overrides", metavar="NAME",
                        help="the model: an alias (--list-models), HF id or local directory; --set model.name=NAME")
    parser.add_argument("--output-dir", action=_SetKey, key="output_dir", dest="overrides", metavar="DIR",
                        help="write the run to DIR/<name>/<run id> (default: the spec's output_dir, else results); "
                             "--set output_dir=DIR")
    parser.add_argument("--dry-run", action="store_true", help="validate, resolve targets, print the trial count")
    parser.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run: only trials not yet recorded")
    parser.add_argument("--list-models", action="store_true", help="print the model aliases and exit")
    parser.add_argument("--list-perturbations", action="store_true", help="print the perturbation kinds and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        with _terminate_as_interrupt():
            return _dispatch(args)

    return run_cli(command, interrupted="finished trials are in the run's trials.jsonl; finish with --resume RUN_DIR")


def _dispatch(args: argparse.Namespace) -> int:
    if args.list_models:
        return _list_models()
    if args.list_perturbations:
        return _list_perturbations()
    if not args.spec and not args.resume:
        raise SpecError("", "give an experiment spec (e.g. experiments/bitflip.yaml) or --resume RUN_DIR")
    if args.resume:
        return _resume(args)
    plan = _planned(load_spec(args.spec, args.overrides), args.spec)
    if args.dry_run:
        print(describe(plan))
        return 0
    return _run(plan, run_dir=None, executor_name=args.executor, **_executor_options(args))


def _resume(args: argparse.Namespace) -> int:
    from sensray.results import RunDir

    run = RunDir.open(args.resume)
    spec = run.spec()
    if args.spec:
        given = load_spec(args.spec, args.overrides).resolved()
        # resources only place the trials (how many replicas, where): they may change between runs
        changed = [k for k in given if k != "resources" and given[k] != spec.resolved().get(k)]
        if changed:
            raise SensrayError(f"--resume: {args.spec} differs from {run.path}/spec.yaml in {', '.join(changed)}")
    plan = _planned(spec, run.path / "spec.yaml")
    if args.dry_run:
        done = {row["trial_id"] for row in run.rows()}
        print(describe(plan) + f"\n  resume: {len(done)} done, {len(plan.trials) - len(done)} to run")
        return 0
    return _run(plan, run_dir=run, executor_name=args.executor, **_executor_options(args))


def _run(plan: Plan, run_dir, executor_name: str, **options) -> int:
    from sensray.executors import executor_for
    from sensray.executors.feed import table_rows, trial_source
    from sensray.progress import Progress
    from sensray.results import Journal, RunDir

    spec = plan.spec
    todo, total = trial_source(plan, run_dir.rows() if run_dir else [])  # a list, or a search's feed
    executor = executor_for(executor_name, spec, **options)
    try:
        baseline = executor.start()  # loads model and data: any error here leaves nothing on disk
        run = run_dir or RunDir.create(spec)
        print(f"{spec.name}: {total} trials ({len(todo)} to run) of {spec.perturbation} on "
              f"{spec.model.name} [{spec.model.dtype}, {baseline['device']}], baseline ppl {baseline['ppl']:.3f} "
              f"on {baseline['tokens']} tokens", file=sys.stderr)
        run.write_baseline(baseline)
        if spec.early_stop is not None:
            todo = _early_stopping(spec, todo, baseline, run.rows())
        progress = Progress(total=total, done=total - len(todo))
        progress.replicas = executor.replicas
        with Journal(run.journal) as journal:

            def on_row(row: dict) -> None:
                journal.append(row)
                if hasattr(todo, "tell"):
                    todo.tell(row)  # an adaptive search learns from each row as it is recorded
                progress.replicas = executor.replicas
                progress.update(failed=row["error"] is not None)

            executor.run(todo, on_row)
        after = executor.checksums()
    finally:
        executor.close()
    run.write_baseline(baseline | {"checksum_after_sweep": after[0] if len(set(after)) == 1 else after})
    rows = run.rows()
    run.finish(table_rows(plan, rows))
    if set(after) != {baseline["checksum_at_load"]}:
        raise RestoreError(f"weights checksum changed over the sweep ({baseline['checksum_at_load']} -> {after})")
    if spec.early_stop is not None:
        print(_savings_line(rows, baseline["tokens"]), file=sys.stderr)
    print(run.path)
    return 0


def _early_stopping(spec, todo, baseline: dict, done_rows: list[dict]):
    from sensray.early_stop import Board, EarlyStopFeed
    from sensray.executors.feed import StaticFeed

    feed = todo if hasattr(todo, "poll") else StaticFeed(todo)
    return EarlyStopFeed(feed, Board(spec.early_stop, baseline["ppl"]), done_rows)


def _savings_line(rows: list[dict], tokens_per_trial: int) -> str:
    from sensray.early_stop import savings

    spent, full = savings(rows, tokens_per_trial)
    stopped = sum(row.get("stopped_rung") is not None for row in rows)
    return (f"early stopping: {stopped} of {len(rows)} trials stopped early; {spent:,} of {full:,} token evaluations "
            f"({1 - spent / max(full, 1):.0%} saved)")


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (`kill`, `ray job stop`) ends the sweep like Ctrl-C: replicas stopped, journal kept."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_executor() -> str:
    """Ray when it is installed; the local executor on machines without it (e.g. a bare GPU box)."""
    import importlib.util

    return "ray" if importlib.util.find_spec("ray") is not None else "local"


def _replicas(value: str) -> int | str:
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'auto', got {value!r}")


class _SetKey(argparse.Action):
    """An option that is a --set of one key: `--model X` adds `model.name="X"` to the overrides, in command-line
    order with the --set ones. JSON-quoted, so a value like `2024` or `yes` stays a string."""

    def __init__(self, *args, key: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), f"{self.key}={json.dumps(value)}"])


def _executor_options(args: argparse.Namespace) -> dict:
    """--address/--replicas go to the Ray executor; the local one runs one replica in this process."""
    options = {k: v for k, v in (("address", args.address), ("replicas", args.replicas)) if v is not None}
    if options and args.executor != "ray":
        raise SensrayError(f"--{' and --'.join(options)}: only for --executor ray")
    return options


def _planned(spec, source) -> Plan:
    """make_plan, with its errors attributed to the spec file they come from."""
    try:
        return make_plan(spec)
    except SpecError as err:
        raise err.located(str(source)) from None


def describe(plan: Plan) -> str:
    """What a dry run prints: the trial count and what the targets resolved to."""
    spec = plan.spec
    targets = list(dict.fromkeys(str(t.params.get("target")) for t in plan.trials))
    shown = ", ".join(targets[:6]) + (f", ... ({len(targets)} in all)" if len(targets) > 6 else "")
    count = f"{len(plan.trials)} trials" if spec.search is None else (
        f"up to {spec.search.num_trials} trials, proposed by {spec.search.algorithm} "
        f"({spec.search.mode} {spec.search.metric}),")
    return (
        f"{spec.name}: {count} of {spec.perturbation} on {spec.model.name} "
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
