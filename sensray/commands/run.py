"""Run an analysis by name: its shipped preset (experiments/*.yaml) as a sweep, on your model.

    sensray run sensitivity --model gpt-neo-125m
    sensray run bit-level --executor local --dry-run
    sensray run robustness --model pythia-70m --set data.num_sequences=8 --output-dir results/pythia

Everything after the analysis name is a `sensray sweep` option (--model, --executor, --dry-run,
--set, --output-dir, --address, ...), applied to the preset; `sensray run ANALYSIS --help` lists
them. `adversarial` runs its preset with `sensray adversarial`, which takes the same options. The presets of
integrated and fine-tuning are studies: their options are `sensray study`'s
(--model, --dry-run, --set, --output-dir, --resume). `sensray list analyses` shows each name and the preset it runs. An analysis sensray cannot
run yet exits with status 2.
"""

from __future__ import annotations

import argparse

from sensray.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    from sensray.presets import ANALYSES, available

    parser = argparse.ArgumentParser(
        prog="sensray run",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + "\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("analysis", metavar="ANALYSIS",
                        help=f"one of {', '.join(available())} (not yet: "
                             f"{', '.join(n for n in ANALYSES if n not in available())})")
    parser.add_argument("sweep_options", nargs=argparse.REMAINDER, metavar="SWEEP OPTION",
                        help="passed to the sweep of the preset, e.g. --model NAME --executor local --dry-run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args, parser.prog))


def _run(args: argparse.Namespace, prog: str) -> int:
    from sensray.cli import call
    from sensray.presets import command_for, preset_for

    preset = preset_for(args.analysis)  # an unknown analysis fails here, before command_for
    return call(command_for(args.analysis), [str(preset), *args.sweep_options], prog=f"{prog} {args.analysis}")
