"""Evaluate a model: sensray's perplexity plus lm-eval task scores, written as a run directory.

    sensray evaluate --model sensray-tiny                                   # sensray's offline tasks
    sensray evaluate --model data/tiny-wanda50 --reference sensray-tiny     # + KL, top-1 against the dense model
    sensray evaluate --model pythia-70m --tasks hellaswag,arc_easy --limit 500   # where the network reaches
    sensray evaluate --model sensray-tiny --tasks sensray-data-ppl          # lm-eval's ppl protocol beside sensray's
    sensray evaluate --model sensray-tiny --dry-run                         # check names, types, data; run nothing
    sensray analyze results/evaluate/<run a> results/evaluate/<run b>      # two models side by side

Any model: an alias (sensray list models), a Hugging Face id, or a local directory such as a
pruned or healed export. Alone, the run is one trial of the `none` perturbation (nothing
changed): a baseline is a run too. With --reference, the reference is the run's resident model
and baseline, and the one trial swaps in the model's weights (the `checkpoint` perturbation; same
architecture, a local directory), so the row also has KL and top-1 agreement against the
reference, and both models' task scores are in the run. Either way the directory (spec.yaml,
baseline.json, trials.parquet) is read by `sensray analyze` and by the comparison like any sweep's.

Task scores are columns `<task>/<metric>`, `<task>/<metric>_stderr` and `<task>/n`; `ppl` and `nll`
are sensray's own protocol (data.* windows, each window's first token unscored), and
`sensray-data-ppl` is lm-eval's rolling-window perplexity of those same windows' text, to read both
protocols side by side (docs/analysis.md). Bad input (an unknown task, a generation task, a Hub
dataset while HF_HUB_OFFLINE is set or the Hub cannot be reached, --limit 0) exits with status 2, at --dry-run too, writing
nothing. The last line printed is the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from sensray.errors import SpecError, run_cli

DEFAULT_TASKS = ("sensray-pydoc-choice", "sensray-pydoc-swap", "sensray-pydoc-ppl", "sensray-data-ppl")
# Spec keys this command sets from its options: their errors name the option.
OPTIONS = {"eval.tasks": "--tasks", "eval.limit": "--limit", "eval.batch_size": "--batch-size",
           "model.name": "--model", "model.dtype": "--dtype", "model.device": "--device", "name": "--name",
           "space.checkpoint": "--model"}


def build_parser() -> argparse.ArgumentParser:
    from sensray.cli_options import SetKey as _SetKey, positive_int as _count

    parser = argparse.ArgumentParser(
        prog="python -m sensray.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="sensray-tiny", metavar="NAME",
                        help="alias, Hugging Face id or local directory (default: sensray-tiny)")
    parser.add_argument("--reference", metavar="NAME",
                        help="measure --model (a local directory of the same architecture) against this model: "
                             "KL, top-1 agreement and the change in every score")
    parser.add_argument("--tasks", type=_task_list, default=list(DEFAULT_TASKS), metavar="A,B",
                        help=f"lm-eval task names, comma-separated (default: {','.join(DEFAULT_TASKS)}); "
                             "--list-tasks shows sensray's offline ones")
    parser.add_argument("--limit", type=_count, metavar="N", help="score at most N documents per task")
    parser.add_argument("--batch-size", type=_count, default=8, metavar="N", help="lm-eval's batch size (default 8)")
    for option, key, about in (("--dtype", "model.dtype", "float32 (default), float16 or bfloat16"),
                               ("--device", "model.device", "auto (default), cpu or cuda"),
                               ("--revision", "model.revision", "Hub revision (branch, tag or commit) of the model"),
                               ("--name", "name", "the run's name: OUTPUT_DIR/NAME/<run id> (default: evaluate)"),
                               ("--output-dir", "output_dir", "where runs go (default: results)")):
        parser.add_argument(option, action=_SetKey, key=key, dest="overrides", default=[],
                            metavar=option.removeprefix("--").upper().replace("-", "_"), help=about)
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="any spec key, e.g. --set data.corpus=notes.txt --set data.num_sequences=32")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local (default: one trial, in this process) or ray")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with the model (its own config/modeling files)")
    parser.add_argument("--dry-run", action="store_true", help="check the model, tasks and data; run nothing")
    parser.add_argument("--list-tasks", action="store_true", help="print sensray's offline tasks and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    if args.list_tasks:
        return _list_tasks()
    from sensray.plan import make_plan
    from sensray.spec import check_permissions
    from sensray.sweep import Interrupted, _attributed, _checked_source, _run, describe

    with _as_options(), _attributed("sensray evaluate"):
        spec = evaluation_spec(args.model, args.reference, args.tasks, args.limit, args.batch_size, args.overrides)
        check_permissions(spec, args.trust_remote_code, allow_searcher_import=False)
        plan = make_plan(spec)
        _checked_source(plan, None, replicas_here=True)
        _hint_reference(args)
        if args.dry_run:
            print(describe(plan))
            return 0
        interrupted = Interrupted()  # learns the run directory as soon as it exists
        code = _run(plan, None, args.executor, interrupted=interrupted)
    _report(interrupted.run)
    return code


@contextlib.contextmanager
def _as_options():
    """Spec errors about keys this command sets from its options name the option instead."""
    try:
        yield
    except SpecError as err:
        if err.path not in OPTIONS:
            raise
        raise SpecError(OPTIONS[err.path], err.message) from None


def evaluation_spec(model: str, reference: str | None, tasks: list[str], limit: int | None, batch_size: int,
                    overrides: list[str] = ()):
    """The spec of an evaluation: one trial, every task scored on it. Without a reference the trial changes
    nothing; with one, the reference is resident and the trial swaps the model's weights in."""
    from sensray.spec import apply_override, validate

    swap = {"perturbation": "checkpoint", "space": {"target": "model", "checkpoint": model}}
    raw = {
        "name": "evaluate",
        "description": "a model measured: sensray's perplexity and lm-eval tasks"
                       + (f", against {reference}" if reference else ""),
        "model": {"name": reference or model},
        "data": {"corpus": "bundled", "seq_len": 128, "num_sequences": 16, "batch_size": 16},
        **(swap if reference else {"perturbation": "none", "space": {"target": "model"}}),
        "reuse": {"prefix": False},  # one trial, changing nothing or every block: no block output worth recording
        "eval": {"tasks": tasks, "limit": limit, "batch_size": batch_size},
    }
    for override in overrides or []:
        apply_override(raw, override)
    return validate(raw)


def _hint_reference(args: argparse.Namespace) -> None:
    """A pruned export knows its source: say how to measure against it."""
    meta = Path(args.model) / "sensray-prune.json"
    if args.reference is None and meta.is_file():
        source = json.loads(meta.read_text(encoding="utf-8")).get("source", {}).get("model")
        if source:
            print(f"note: {args.model} was pruned from {source}; add --reference {source} for KL, top-1 agreement "
                  "and every score's change against it", file=sys.stderr)


def _report(path: Path) -> None:
    """The scores, one per line, on stderr (stdout keeps only the run directory)."""
    from sensray.results import RunDir

    run = RunDir.open(path)
    (row,) = run.rows()
    baseline = json.loads((run.path / "baseline.json").read_text(encoding="utf-8"))
    swapped = row.get("checkpoint")
    if swapped:
        print(f"{swapped} against {baseline['model']}: ppl {row['ppl']:.4f} (reference {baseline['ppl']:.4f}, "
              f"×{row['delta_ppl']:.4f}), KL {row['kl']:.4g}, top-1 agreement {row['top1_agreement']:.4f}",
              file=sys.stderr)
    else:
        print(f"{baseline['model']}: ppl {row['ppl']:.4f} (sensray: {baseline['tokens']:,} tokens)", file=sys.stderr)
    reference = baseline.get("tasks") or {}
    for column, value in row.items():
        if "/" in column and not column.endswith(("_stderr", "/n")) and value is not None:
            line = f"  {column:<40} {_score(value, row.get(f'{column}_stderr')):<18}"
            if swapped and column in reference:
                line += f"   reference {_score(reference[column], reference.get(f'{column}_stderr'))}"
            print(line, file=sys.stderr)
    if row.get("task_seconds") is not None:
        print(f"  ({row['task_seconds']:.1f} s of lm-eval)", file=sys.stderr)


def _score(value: float, stderr) -> str:
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, float) else "")


def _task_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected task names separated by commas, got {value!r}")
    return names


def _list_tasks() -> int:
    from sensray.tasks.shipped import shipped_names

    print("\n".join(shipped_names()))
    print("(and every task lm-eval knows, where its data is reachable: lm-eval ls tasks)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
