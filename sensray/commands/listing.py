"""What sensray knows by name.

    sensray list models          # aliases and the Hugging Face ids they stand for
    sensray list perturbations   # the kinds a spec's `perturbation:` names, with their parameters
    sensray list analyses        # the names `sensray run` takes, and the preset each runs
    sensray list experiments     # the shipped experiments/*.yaml, each with its description
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sensray.errors import run_cli


def _models() -> int:
    from sensray.sweep import main

    return main(["--list-models"])


def _perturbations() -> int:
    from sensray.sweep import main

    return main(["--list-perturbations"])


def _analyses() -> int:
    from sensray.presets import ANALYSES

    width = max(map(len, ANALYSES))
    runs = {name: f"experiments/{a.preset}.yaml" if a.preset else "-" for name, a in ANALYSES.items()}
    runs_width = max(map(len, runs.values()))
    for name, analysis in ANALYSES.items():
        print(f"{name:<{width}}  {runs[name]:<{runs_width}}  {analysis.summary}")
    return 0


def _experiments() -> int:
    from sensray.presets import experiments

    shipped = [(_shown(path), about) for path, about in experiments()]
    width = max((len(name) for name, _ in shipped), default=0)
    for name, about in shipped:
        print(f"{name:<{width}}  {about}")
    return 0


def _shown(path: Path) -> str:
    """experiments/x.yaml when run from the checkout, else the full path."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


LISTS = {"models": _models, "perturbations": _perturbations, "analyses": _analyses, "experiments": _experiments}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sensray list",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", choices=list(LISTS), metavar="WHAT", help=f"one of {', '.join(LISTS)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(LISTS[args.what])
