"""The options the spec-driven commands share (sensray/cli_options.py): the same everywhere, parsed alike."""

from __future__ import annotations

import importlib

import pytest

from sensray.cli_options import default_executor

SPEC_COMMANDS = ["sensray.sweep", "sensray.attack.cli", "sensray.adversarial.cli", "sensray.study.cli"]
SHARED = ["--set", "--model", "--output-dir", "--dry-run", "--resume", "--trust-remote-code"]
REPLICA_COMMANDS = ["sensray.sweep", "sensray.attack.cli", "sensray.adversarial.cli"]


def _options(module: str) -> dict:
    parser = importlib.import_module(module).build_parser()
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings}


def _shape(action) -> tuple:
    return (action.dest, action.default, type(action).__name__, getattr(action, "key", None), action.type)


@pytest.mark.parametrize("option", SHARED)
def test_every_spec_command_declares_the_shared_option_alike(option):
    shapes = {module: _shape(_options(module)[option]) for module in SPEC_COMMANDS}
    assert all(shape == shapes["sensray.sweep"] for shape in shapes.values()), shapes


@pytest.mark.parametrize("module", SPEC_COMMANDS)
def test_one_key_options_join_the_overrides_in_command_line_order(module):
    parser = importlib.import_module(module).build_parser()
    args = parser.parse_args(["x.yaml", "--model", "m", "--set", "a=1", "--output-dir", "2024"])
    assert args.overrides == ['model.name="m"', "a=1", 'output_dir="2024"']  # JSON-quoted: 2024 stays a string
    assert parser.parse_args([]).overrides == []


def test_replica_options_keep_each_commands_executor_default():
    defaults = {module: _options(module)["--executor"].default for module in REPLICA_COMMANDS}
    # adversarial picks its executor from the replicas and --address asked for; the others default to Ray if present
    assert defaults == {"sensray.sweep": default_executor(), "sensray.attack.cli": default_executor(),
                        "sensray.adversarial.cli": None}
    for module in REPLICA_COMMANDS:
        parser = importlib.import_module(module).build_parser()
        assert parser.parse_args(["--replicas", "auto"]).replicas == "auto"
        assert parser.parse_args(["--replicas", "3"]).replicas == 3
        with pytest.raises(SystemExit):
            parser.parse_args(["--replicas", "0"])
