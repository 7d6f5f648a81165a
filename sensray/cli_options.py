"""The options every spec-driven command shares, declared once so they read and behave alike.

    sensray sweep experiments/bitflip.yaml --model pythia-70m --set num_samples=2 --dry-run
    sensray attack experiments/attack-bitflip.yaml --output-dir runs --executor local

`sensray sweep`, `attack`, `adversarial` and `study` each read a YAML spec, so each takes the spec,
overrides of its keys (--set, and --model / --output-dir as a --set of one key), --dry-run, --resume
and --trust-remote-code (`add_spec_options`); those that run on replicas also take --executor,
--address and --replicas (`add_replica_options`). Each command declares its own options beside these
and says in its own words what its dry run checks and what --resume continues. Imports nothing
heavy: `sensray --help` must not load torch or Ray.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["SetKey", "add_replica_options", "add_spec_options", "default_executor", "positive_int",
           "replicas_or_auto"]


class SetKey(argparse.Action):
    """An option that is a --set of one key: `--model X` adds `model.name="X"` to the overrides, in command-line
    order with the --set ones. JSON-quoted, so a value like `2024` or `yes` stays a string."""

    def __init__(self, *args, key: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), f"{self.key}={json.dumps(value)}"])


def positive_int(value: str) -> int:
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")


def replicas_or_auto(value: str) -> int | str:
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'auto', got {value!r}")


def default_executor() -> str:
    """Ray when it is installed; the local executor on machines without it (e.g. a bare GPU box)."""
    import importlib.util

    return "ray" if importlib.util.find_spec("ray") is not None else "local"


def add_spec_options(parser: argparse.ArgumentParser, *, spec: str, set_example: str, dry_run: str, resume: str,
                     resume_metavar: str = "RUN_DIR") -> None:
    """The spec and the options about it. `spec`, `dry_run`, `resume`: the command's help for them."""
    parser.add_argument("spec", nargs="?", help=spec)
    # --set first: --model and --output-dir share its dest, and argparse takes the first action's default ([]).
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a spec key, value parsed as YAML (repeatable), e.g. --set {set_example}")
    parser.add_argument("--model", action=SetKey, key="model.name", dest="overrides", metavar="NAME",
                        help="the model: an alias (sensray list models), HF id or local directory; "
                             "--set model.name=NAME")
    parser.add_argument("--output-dir", action=SetKey, key="output_dir", dest="overrides", metavar="DIR",
                        help="write to DIR/<name>/<id> (default: the spec's output_dir, else results); "
                             "--set output_dir=DIR")
    parser.add_argument("--dry-run", action="store_true", help=dry_run)
    parser.add_argument("--resume", metavar=resume_metavar, help=resume)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model.trust_remote_code: true (runs Python code shipped with the model)")


def add_replica_options(parser: argparse.ArgumentParser, *, decided_by: str | None = None) -> None:
    """--executor, --address, --replicas. Without --executor: `default_executor()`, or, given `decided_by`
    (how the command chooses, for the help), None, left to the command."""
    from sensray.executors import EXECUTORS

    parser.add_argument("--executor", choices=list(EXECUTORS), default=None if decided_by else default_executor(),
                        help="where the work runs: 'ray' (replica actors on a local Ray or a cluster) or 'local' "
                             f"(one replica in this process, no Ray); default: {decided_by or 'ray when installed'}")
    parser.add_argument("--address", help="Ray only: a running cluster to join ('auto' on its head node); "
                                          "default: start a Ray on this machine, bound to 127.0.0.1")
    parser.add_argument("--replicas", type=replicas_or_auto, metavar="N|auto",
                        help="Ray only: how many replicas (default: the spec's resources.replicas)")
