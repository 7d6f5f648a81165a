"""One command for all of sensray: `sensray <command> ...` (or `python -m sensray <command> ...`).

    sensray sweep experiments/bitflip.yaml --executor local
    sensray run sensitivity --model gpt-neo-125m --dry-run
    sensray analyze results/bitflip/<run id>
    sensray list experiments

Each command is a module with `build_parser()` and `main(argv) -> int`, so its own entry point
(`python -m sensray.sweep ...`) keeps working unchanged. A module is imported only when its command
runs: `sensray --help` loads neither torch, Ray nor polars, and a command loads only what it needs
(`sensray sweep --executor local` on a machine without Ray never asks for it). A new command is one
`command(...)` line below.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator

from sensray import __version__
from sensray.registry import Registry


@dataclass(frozen=True)
class Command:
    module: str  # defines build_parser() and main(argv) -> int
    summary: str  # one line for `sensray --help`


COMMANDS: Registry[Command] = Registry("command")


def command(name: str, module: str, summary: str) -> None:
    COMMANDS.register(name)(Command(module, summary))


command("sweep", "sensray.sweep", "run an experiment spec's trials, on Ray or in this process")
command("run", "sensray.commands.run", "run an analysis by name (sensitivity, robustness, ...)")
command("analyze", "sensray.analyze.__main__", "tables, figures and a report from runs")
command("generate", "sensray.generate", "text from a model, as it is and perturbed")
command("prune", "sensray.prune", "prune a model, save it as a Hugging Face directory")
command("superweights", "sensray.superweights.cli", "find a model's super weights and verify them")
command("heal", "sensray.heal.cli", "fine-tune a pruned model back to health (LoRA or masked), keeping its zeros")
command("study", "sensray.study.cli", "stages in one resumable directory: sweep, allocate, prune, heal, evaluate, report")
command("saliency", "sensray.saliency.cli", "a whole-model sensitivity map from gradients; --check a sweep against it")
command("attack", "sensray.attack.cli", "the fewest bit flips that break a model: gradient-guided, on the replica pool")
command("evaluate", "sensray.evaluate", "a model's perplexity and lm-eval task scores, as a run directory")
command("adversarial", "sensray.adversarial.cli", "input edits that mislead a model (GCG, HotFlip), on damaged weights too")
command("list", "sensray.commands.listing", "models, perturbations, analyses, experiments")


def build_parser(prog: str = "sensray") -> argparse.ArgumentParser:
    """The top level only: it lists the commands from the registry, importing none of them."""
    summary, examples = __doc__.split("\n\n")[:2]
    width = max(map(len, COMMANDS))
    listed = "\n".join(f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{summary}\n\ncommands:\n{listed}",
        epilog=f"examples:\n{examples.replace('sensray ', prog + ' ')}\n\n'{prog} COMMAND --help' shows a "
               "command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="one of the commands above")
    parser.add_argument("options", nargs=argparse.REMAINDER, metavar="...", help="the command's options")
    parser.add_argument("--version", action="version", version=f"sensray {__version__}")
    return parser


def main(argv: list[str] | None = None, prog: str = "sensray") -> int:
    try:
        return _dispatch(sys.argv[1:] if argv is None else list(argv), prog)
    except BrokenPipeError:  # `sensray list experiments | head`: the reader has gone; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise (signal module)
        return 1


def _dispatch(argv: list[str], prog: str) -> int:
    if argv and argv[0] in COMMANDS:
        return call(argv[0], argv[1:], prog=f"{prog} {argv[0]}")
    parser = build_parser(prog)
    if argv and not argv[0].startswith("-"):
        parser.error(COMMANDS.unknown(argv[0]))  # exits 2, with the closest command names
    parser.parse_args(argv)  # --help and --version exit here
    parser.print_help(sys.stderr)
    return 2  # no command given


def call(name: str, argv: list[str], prog: str) -> int:
    """Run command `name` with `argv`; its usage, help and errors name it `prog` ('sensray sweep')."""
    module = importlib.import_module(COMMANDS.get(name).module)
    with _named(module, prog):
        return module.main(argv)


@contextlib.contextmanager
def _named(module: ModuleType, prog: str) -> Iterator[None]:
    """While the command runs, its `build_parser()` returns a parser called `prog`. Each module keeps its
    own `python -m` name for its own entry point; renaming here keeps the modules free of the dispatcher."""
    build = module.build_parser

    def renamed(*args, **kwargs) -> argparse.ArgumentParser:
        parser = build(*args, **kwargs)
        parser.prog = prog
        return parser

    module.build_parser = renamed
    try:
        yield
    finally:
        module.build_parser = build
