"""Errors a user can act on.

Anything raised as a `SensrayError` is reported by the CLI as one readable message with a
non-zero exit and no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class SensrayError(Exception):
    """An error caused by the user's input or environment, with a message that says what to fix.

    Every subclass pickles whole, whatever its constructor takes: a replica's error crosses Ray
    to the driver and must arrive as the same type, message, exit code and attributes.
    """

    exit_code = 1

    def __reduce__(self):
        # Exception's default pickles `cls(*self.args)`, which breaks for any subclass whose
        # __init__ takes other arguments than its message (SpecError(path, message, source)).
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type, args: tuple, state: dict) -> SensrayError:
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


class SpecError(SensrayError):
    """An experiment spec (or a CLI override of it) is invalid.

    `path` is the dotted key path inside the spec (`space.bit.grid_search[2]`), `source`
    the file it came from, so the message points at the exact place to edit.
    """

    exit_code = 2

    def __init__(self, path: str, message: str, source: str | None = None):
        self.path = path
        self.message = message
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        key = f"{self.path}: " if self.path else ""
        return f"{where}{key}{self.message}"

    def located(self, source: str) -> "SpecError":
        """The same error, attributed to a spec file."""
        return SpecError(self.path, self.message, source)


class RestoreError(SensrayError):
    """Weights after a trial differ from the weights before it: a correctness failure."""


def shorten(value: object, limit: int = 120) -> str:
    """repr(value), cut short: a message about a 50,000-element list must still be one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cli(command: Callable[[], int], interrupted: str | Callable[[], str] | None = None) -> int:
    """Run a command-line entry point: a `SensrayError` becomes one `error:` line on stderr and its
    exit code; with `interrupted` (what Ctrl-C leaves behind, or a function that says it once the
    interrupt came), Ctrl-C exits 130 saying so."""
    try:
        return command()
    except SensrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        said = interrupted() if callable(interrupted) else interrupted
        print(f"\ninterrupted: {said}", file=sys.stderr)
        return 130
