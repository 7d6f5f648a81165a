"""What the in-process sweep tests share: a small spec, running `sensray.sweep.main`, reading its errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

from sensray.sweep import main

# 8 trials of the shipped model: 2 blocks x 2 fields x 2 samples, 2 windows of 32 tokens in one batch.
SMALL = """\
name: small
data: {{seq_len: 32, num_sequences: 2, batch_size: 2}}
perturbation: bitflip
space:
  target: {{each: "blocks.0-1"}}
  field: {{grid_search: [exponent_msb, mantissa]}}
  count: 2
num_samples: 2
output_dir: {out}
"""


def spec_writer(directory: Path, results: Path):
    """write(text=SMALL, name=..., **fields): a spec in `directory` (text.format(out=results, **fields))."""

    def write(text: str = SMALL, name: str = "spec.yaml", **fields) -> Path:
        path = directory / name
        path.write_text(textwrap.dedent(text).format(out=results, **fields), encoding="utf-8")
        return path

    return write


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


def fails(capsys, code: int, *args, words: tuple[str, ...] = ()) -> str:
    """Run the sweep; it must exit `code` with one error line holding every one of `words`."""
    got, _, err = sweep(capsys, *args)
    line = one_error(err)
    assert got == code, err
    for word in words:
        assert word in line, line
    return line
