"""What the in-process sweep tests share: run `sensray.sweep.main` and read what it printed."""

from __future__ import annotations

from sensray.sweep import main


def sweep(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process `python -m sensray.sweep ARGS`."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    """The single `error:` line of stderr; fails if there are several, or a traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
