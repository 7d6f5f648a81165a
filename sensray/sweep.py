"""Run a sweep: every trial of an experiment spec, written to a run directory.

    python -m sensray.sweep experiments/bitflip.yaml                     # Ray: a local one on 127.0.0.1
    python -m sensray.sweep experiments/bitflip.yaml --address auto      # Ray: a running cluster
    python -m sensray.sweep experiments/bitflip.yaml --executor local    # in this process, no Ray
    python -m sensray.sweep experiments/bitflip.yaml --dry-run            # validate, count trials
    python -m sensray.sweep experiments/noise.yaml --model pythia-70m --output-dir runs
    python -m sensray.sweep experiments/noise.yaml --set data.seq_len=64  # override any key
    python -m sensray.sweep --resume results/bitflip/<run id>            # finish an interrupted run
    python -m sensray.sweep --list-models | --list-perturbations

The last line printed is the run directory. Invalid specs exit with status 2 and one message
naming the file and key; nothing is written. Before anything loads or is written, a sweep runs
the same checks as --dry-run (sensray.preflight). A spec never runs code by itself: a model's
own code and an imported searcher each need their flag.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from pathlib import Path

from sensray.cli_options import add_replica_options, add_spec_options, positive_int
from sensray.errors import RestoreError, SensrayError, SpecError, run_cli
from sensray.plan import MAX_TRIALS, Plan, make_plan
from sensray.spec import ExperimentSpec, check_permissions, load_spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sensray.sweep",
        description=__doc__.split("\n\n")[0],
        epilog="example: python -m sensray.sweep experiments/bitflip.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_spec_options(parser, spec="experiment YAML (see experiments/)", set_example="num_samples=2",
                     dry_run="validate, resolve targets, print the trial count",
                     resume="finish an interrupted run: only trials not yet recorded (--set may change only "
                            "resources.*)")
    add_replica_options(parser)
    parser.add_argument("--max-trials", type=positive_int, default=MAX_TRIALS, metavar="N",
                        help=f"refuse a space that expands to more trials (default {MAX_TRIALS:,})")
    parser.add_argument("--allow-searcher-import", action="store_true",
                        help="allow search.algorithm: module:Class (imports, so runs, that module)")
    parser.add_argument("--list-models", action="store_true", help="print the model aliases and exit")
    parser.add_argument("--list-perturbations", action="store_true", help="print the perturbation kinds and exit")
    return parser


class Interrupted:
    """What an interrupt (Ctrl-C, SIGTERM) leaves behind, said once it comes: the run directory, if any."""

    def __init__(self) -> None:
        self.run: Path | None = None
        self.study = False  # a format study's directory: a run directory per format

    def __call__(self) -> str:
        if self.run is None:
            return "nothing was written (the sweep stopped before its run directory existed)"
        if self.study:
            return f"finished formats and trials are in {self.run}; finish with --resume {self.run}"
        return f"finished trials are in {self.run / 'trials.jsonl'}; finish with --resume {self.run}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupted = Interrupted()

    def command() -> int:
        with _terminate_as_interrupt():
            return _dispatch(args, interrupted)

    return run_cli(command, interrupted=interrupted)


def _dispatch(args: argparse.Namespace, interrupted: Interrupted) -> int:
    if args.list_models:
        return _list_models()
    if args.list_perturbations:
        return _list_perturbations()
    if not args.spec and not args.resume:
        raise SpecError("", "give an experiment spec (e.g. experiments/bitflip.yaml) or --resume RUN_DIR")
    options = _executor_options(args)
    run = _open_run(args.resume) if args.resume else None
    spec, source = _spec(args, run)
    with _attributed(source):
        check_permissions(spec, args.trust_remote_code, args.allow_searcher_import)
        if spec.formats is not None:  # a format study: one run per format (sensray/formats.py)
            from sensray.formats import run_study

            interrupted.run, interrupted.study = (run.path if run is not None else None), True
            return run_study(spec, run, args, interrupted, options)
        plan = make_plan(spec, max_trials=args.max_trials)
        if run is not None and run.table.is_file():  # finished: say so, run nothing, change nothing
            print(describe(plan) + f"\n  resume: {run.path} is finished ({len(run.rows())} trials in its "
                                   "trials.parquet); nothing to run", file=sys.stderr)
            print(run.path)
            return 0
        todo, total = _checked_source(plan, run, replicas_here=args.executor == "local" or args.address is None)
        if args.dry_run:
            resumed = f"\n  resume: {total - len(todo)} done, {len(todo)} to run" if run is not None else ""
            print(describe(plan) + resumed)
            return 0
        interrupted.run = run.path if run is not None else None
        return _run(plan, run, args.executor, interrupted=interrupted, left=(todo, total), **options)


def _checked_source(plan: Plan, run, replicas_here: bool):
    """What is left to run (a list, or a search's feed: its searcher built, its options checked), after
    every check that needs no weights (sensray.preflight): the same for a dry run and a real one."""
    from sensray.executors.feed import trial_source
    from sensray.preflight import preflight

    todo, total = trial_source(plan, run.rows() if run is not None else [])
    preflight(plan.spec, replicas_here, run=run.path if run is not None else None)
    return todo, total


def _open_run(path: str):
    from sensray.results import RunDir

    return RunDir.open(path)


def _spec(args: argparse.Namespace, run) -> tuple[ExperimentSpec, Path]:
    """The spec to run and the file it came from. Resuming, it is the run's own spec.yaml with any
    --set (or a spec file) applied, and only `resources` may differ from what the run started with:
    where the trials run may change, which trials and how they are measured may not."""
    if run is None:
        return load_spec(args.spec, args.overrides), Path(args.spec)
    recorded = run.spec()
    source = Path(args.spec) if args.spec else run.path / "spec.yaml"
    given = load_spec(args.spec, args.overrides) if args.spec else run.spec(args.overrides)
    before, after = recorded.resolved(), given.resolved()
    changed = [key for key in after if key != "resources" and after[key] != before.get(key)]
    if changed:
        given_by = f"{args.spec}{' with --set' if args.overrides else ''}" if args.spec else "--set"
        raise SpecError("--resume", f"{given_by} differs from {run.path / 'spec.yaml'} in {', '.join(changed)}; "
                                    "a run resumes as it started (only resources.* may change)")
    return given, source


@contextlib.contextmanager
def _attributed(source: Path):
    """SpecErrors raised inside (plan, checks, replicas) name the spec file they come from."""
    try:
        yield
    except SpecError as err:
        if err.source is not None:
            raise
        raise err.located(str(source)) from None


def _run(plan: Plan, run_dir, executor_name: str, interrupted: Interrupted | None = None, left=None,
         **options) -> int:
    """Run what is `left` (todo, total: default, every trial not in run_dir yet) and write the run directory;
    `interrupted` learns the run directory as soon as it exists. (sensray.superweights drives sweeps here too.)"""
    from sensray.executors import executor_for
    from sensray.executors.feed import table_rows, trial_source
    from sensray.progress import Progress
    from sensray.results import Journal, RunDir

    spec = plan.spec
    todo, total = left if left is not None else trial_source(plan, run_dir.rows() if run_dir else [])
    interrupted = interrupted if interrupted is not None else Interrupted()
    executor = executor_for(executor_name, spec, **options)
    try:
        baseline = executor.start()  # loads model and data: any error here leaves nothing on disk
        run = run_dir or RunDir.create(spec)
        interrupted.run = run.path
        print(f"{spec.name}: {total} trials ({len(todo)} to run) of {spec.perturbation} on "
              f"{spec.model.name} [{spec.model.storage}, {baseline['device']}], baseline ppl {baseline['ppl']:.3f} "
              f"on {baseline['tokens']} tokens", file=sys.stderr)
        run.write_baseline(baseline)
        if spec.eval is not None and spec.eval.every is not None:
            from sensray.tasks.selection import marked

            todo = marked(todo, plan.trials, spec.eval.every)
        if spec.early_stop is not None:
            todo = _early_stopping(spec, todo, baseline, run.rows())
        progress = Progress(total=total, done=total - len(todo))
        progress.replicas = executor.replicas
        with Journal(run.journal) as journal:
            if journal.dropped:
                print(f"{run.journal}: its last line was cut short ({journal.dropped} bytes, a crash mid-write); "
                      "that trial runs again", file=sys.stderr)

            def on_row(row: dict) -> None:
                journal.append(row)
                if hasattr(todo, "tell"):
                    todo.tell(row)  # an adaptive search learns from each row as it is recorded
                progress.replicas = executor.replicas
                progress.update(failed=row["error"] is not None)

            executor.run(todo, on_row)
            if spec.eval is not None and spec.eval.top_k is not None:
                # A list, not the feed: a search must not learn from the re-runs (on_row tells `todo`).
                todo, k = _top_k_phase(plan, run.rows())
                progress = Progress(total=k, done=k - len(todo))
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


def _top_k_phase(plan: Plan, rows: list[dict]):
    """The top-k trials by damage still without lm-eval task scores (sensray.tasks.selection), marked."""
    from sensray.perturbations import PERTURBATIONS
    from sensray.tasks.selection import second_phase

    spec = plan.spec
    todo, k = second_phase(rows, spec.eval, plan.trials, PERTURBATIONS.get(spec.perturbation))
    print(f"lm-eval tasks: the {k} most damaging trials by {spec.eval.metric} again, with {', '.join(spec.eval.tasks)}"
          f" ({len(todo)} to run)", file=sys.stderr)
    return todo, k


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


def _executor_options(args: argparse.Namespace) -> dict:
    """--address/--replicas go to the Ray executor; the local one runs one replica in this process."""
    options = {k: v for k, v in (("address", args.address), ("replicas", args.replicas)) if v is not None}
    if options and args.executor != "ray":
        raise SensrayError(f"--{' and --'.join(options)}: only for --executor ray")
    return options


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
        f"[{spec.model.storage}] (num_samples {spec.num_samples}, seed {spec.seed})\n"
        f"  targets: {shown}\n"
        f"  parameters: {', '.join(plan.trials[0].params) if plan.trials else '-'}"
    ) + (_describe_eval(spec) if spec.eval is not None else "")


def _describe_eval(spec: ExperimentSpec) -> str:
    how, n = spec.eval.selection
    which = {"all": "every trial", "every": f"every {n}th trial of the plan",
             "top_k": f"the top {n} trials by {spec.eval.metric}, applied again after the sweep"}[how]
    limit = f", at most {spec.eval.limit} documents each" if spec.eval.limit else ""
    return f"\n  lm-eval tasks: {', '.join(spec.eval.tasks)} on {which}{limit}"


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
