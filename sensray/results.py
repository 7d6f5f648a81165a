"""The run directory and its trial table.

    results/<experiment>/<run id>/
        spec.yaml        the resolved spec (every default filled in)
        baseline.json    baseline metrics, model, dtype, parameter count, weight checksums, versions
        trials.jsonl     the journal: one row per finished trial, flushed and fsynced as it lands
        trials.parquet   the table (polars), written atomically when the sweep ends

The journal is what makes a crash lose at most the trials in flight: `--resume` reads it,
skips every trial id already there, and the final table holds each trial exactly once. A crash
can cut only the last line short (every row is one write, fsynced): that line is dropped and its
trial runs again. A bad line anywhere else is corruption, reported as file:line, never skipped.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from sensray.errors import SensrayError, SpecError
from sensray.spec import ExperimentSpec, load_spec

FIRST_COLUMNS = ("trial_id", "kind", "sample", "target")
# What the trial changed, from its undo record (sensray/perturbations/edits.py), between the parameters and
# the metrics. Flat columns hold the common single-tensor / single-element case, to group on directly;
# `changes` lists every changed element, `tensors` every touched tensor (or hooked module).
PROVENANCE = ("tensor", "index", "flipped_bit", "old", "new", "elements_changed", "changes", "bit_counts", "tensors")
LAST_COLUMNS = ("ppl", "nll", "delta_ppl", "kl", "top1_agreement", "nonfinite", "seq_nll", "seconds", "replica",
                "error")
TASK_SECONDS = "task_seconds"  # lm-eval's share of `seconds` (sensray.tasks)


def is_task_column(name: str) -> bool:
    """An lm-eval task score (`<task>/<metric>`, its `_stderr`, `<task>/n`) or its time: an outcome like
    the metrics, never a parameter (parameter names hold no '/')."""
    return "/" in name or name == TASK_SECONDS


def new_run_id() -> str:
    """Sortable by time, unique across concurrent launches."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, spec: ExperimentSpec, path: Path | None = None) -> "RunDir":
        """A new run directory: `output_dir/<name>/<run id>`, or `path` (a format study's format runs)."""
        run = cls(Path(path) if path is not None else Path(spec.output_dir) / spec.name / new_run_id())
        try:
            run.path.mkdir(parents=True)
        except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
            raise SpecError("output_dir", f"cannot create the run directory {run.path}: "
                                          f"{getattr(err, 'strerror', None) or err}") from None
        _atomic_write(run.path / "spec.yaml", yaml.safe_dump(spec.resolved(), sort_keys=False))
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(Path(path))
        if not (run.path / "spec.yaml").is_file():
            raise SensrayError(f"{path} is not a sensray run directory (no spec.yaml)")
        return run

    def spec(self, overrides: list[str] = ()) -> ExperimentSpec:
        """The run's spec.yaml (with `--set` overrides applied); errors name the file."""
        return load_spec(self.path / "spec.yaml", overrides)

    @property
    def journal(self) -> Path:
        return self.path / "trials.jsonl"

    @property
    def table(self) -> Path:
        return self.path / "trials.parquet"

    def write_baseline(self, baseline: dict[str, Any]) -> None:
        """baseline.json, with the package versions and the command line that started the run (a resume
        keeps the first command: it is the one that says what was run)."""
        previous = self.path / "baseline.json"
        command = json.loads(previous.read_text(encoding="utf-8")).get("command") if previous.is_file() else None
        extra = {"versions": versions(), "command": command or command_line()}
        _atomic_write(previous, json.dumps(baseline | extra, indent=2) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        """Every finished trial so far (table and journal), each trial id once."""
        rows: dict[str, dict] = {}
        if self.table.is_file():
            rows.update((r["trial_id"], r) for r in self._table_rows())
        if self.journal.is_file():
            rows.update((r["trial_id"], r) for r in read_journal(self.journal))
        return list(rows.values())

    def _table_rows(self) -> list[dict[str, Any]]:
        import polars as pl

        try:
            table = pl.read_parquet(self.table)
        except (OSError, pl.exceptions.PolarsError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SensrayError(f"{self.table}: not a readable Parquet table ({first})") from None
        if "trial_id" not in table.columns:
            raise SensrayError(f"{self.table}: has no trial_id column; not a sensray trial table")
        return table.to_dicts()

    def finish(self, rows: Iterable[dict[str, Any]]) -> Path:
        """Write trials.parquet atomically, then drop the journal it supersedes."""
        frame = to_frame(list(rows))
        tmp = self.table.with_suffix(".parquet.tmp")
        frame.write_parquet(tmp)
        os.replace(tmp, self.table)
        self.journal.unlink(missing_ok=True)
        return self.table


def read_journal(path: Path, key: str = "trial_id") -> list[dict[str, Any]]:
    """The journal's rows, each identified by a string `key`. Its last line, when a crash cut it short (no
    newline), is left out."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SensrayError(f"{path}: cannot read the journal: {err.strerror or err}") from None
    *complete, _cut = data.split(b"\n")  # _cut: b"" unless the last write was cut short
    rows = []
    for number, line in enumerate(complete, start=1):
        if line.strip():
            rows.append(_journal_row(path, number, line, key))
    return rows


def _journal_row(path: Path, number: int, line: bytes, key: str = "trial_id") -> dict[str, Any]:
    fix = "fix or delete that line (its trial then runs again) and resume again"
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise SensrayError(f"{path}:{number}: corrupt journal line ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:80]}); {fix}") from None
    if not isinstance(row, dict) or not isinstance(row.get(key), str):
        noun = key.removesuffix("_id")
        raise SensrayError(f"{path}:{number}: a journal line that is not {'an' if noun[0] in 'aeiou' else 'a'} "
                           f"{noun} row (no {key}); {fix}")
    return row


def drop_cut_line(path: Path) -> int:
    """Truncate a journal after its last complete line, so new rows start on a line of their own;
    returns how many bytes of a cut-short line were dropped (0: none)."""
    if not path.is_file():
        return 0
    with open(path, "r+b") as file:
        end = file.seek(0, os.SEEK_END)
        keep = end
        while keep > 0:  # scan back, a block at a time, for the last newline
            start = max(0, keep - 2**16)
            file.seek(start)
            block = file.read(keep - start)
            if b"\n" in block:
                keep = start + block.rindex(b"\n") + 1
                break
            keep = start
        if keep < end:
            file.truncate(keep)
            os.fsync(file.fileno())
        return end - keep


class Journal:
    """Append-only JSON lines, fsynced per row: durable as soon as a trial finishes."""

    def __init__(self, path: Path):
        self.dropped = drop_cut_line(path)  # a crash's half-written row: its trial reruns
        self.file = open(path, "a", encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row, allow_nan=True) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_frame(rows: list[dict[str, Any]]):
    """Rows -> one flat polars DataFrame: ids first, parameters, what changed, then metrics and timing."""
    import polars as pl

    names: dict[str, None] = dict.fromkeys(FIRST_COLUMNS)
    for row in rows:
        names.update(dict.fromkeys(row))
    fixed = set(FIRST_COLUMNS) | set(PROVENANCE) | set(LAST_COLUMNS)
    middle = [n for n in names if n not in fixed and not is_task_column(n)]
    provenance = [n for n in PROVENANCE if n in names]  # absent in tables written before provenance existed
    tasks = [n for n in names if is_task_column(n)]  # lm-eval task scores, when the spec asked for them
    order = [*FIRST_COLUMNS, *middle, *provenance, *tasks, *LAST_COLUMNS]
    schema = {name: dtype for name, dtype in column_types().items() if name in order}
    columns = {n: [row.get(n) for row in rows] for n in order}
    return pl.DataFrame(columns, schema_overrides=schema, strict=False)


def column_types() -> dict[str, Any]:
    """The polars types of the columns sensray itself writes (parameters are inferred)."""
    import polars as pl

    change = pl.Struct({"tensor": pl.String, "index": pl.Int64, "coords": pl.List(pl.Int64), "bit": pl.Int64,
                        "old": pl.Float64, "new": pl.Float64, "old_bits": pl.Int64, "new_bits": pl.Int64})
    touched = pl.Struct({"tensor": pl.String, "how": pl.String, "numel": pl.Int64, "changed": pl.Int64,
                         "fraction_changed": pl.Float64, "rel_norm": pl.Float64, "sparsity": pl.Float64})
    return {
        "sample": pl.Int64, "tensor": pl.String, "index": pl.Int64, "flipped_bit": pl.Int64, "old": pl.Float64,
        "new": pl.Float64, "elements_changed": pl.Int64, "changes": pl.List(change),
        "bit_counts": pl.List(pl.Struct({"bit": pl.Int64, "count": pl.Int64})), "tensors": pl.List(touched),
        **dict.fromkeys(("ppl", "nll", "delta_ppl", "kl", "top1_agreement", "seconds"), pl.Float64),
        "nonfinite": pl.Boolean, "seq_nll": pl.List(pl.Float64), "error": pl.String, "replica": pl.String,
    }


def versions() -> dict[str, str]:
    """What a run needs to be reproduced: the packages that compute its numbers, and sensray's git commit
    when it runs from a checkout (`+dirty` when that checkout has uncommitted changes)."""
    from importlib.metadata import PackageNotFoundError, version

    import sensray

    found = {"sensray": sensray.__version__, "python": platform.python_version()}
    commit = git_commit(Path(sensray.__file__).parent)
    if commit:
        found["sensray_commit"] = commit
    for package in ("torch", "transformers", "numpy", "polars", "ray"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def git_commit(where: Path) -> str | None:
    """The commit checked out at `where` (with `+dirty` for local changes), or None outside a git checkout."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if not (top / where.name / "__init__.py").samefile(where / "__init__.py"):
            return None  # installed inside some other repository: its commit says nothing about sensray
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def command_line() -> str:
    """How this process was started, as a shell line (`sensray sweep experiments/bitflip.yaml ...`)."""
    import shlex
    import sys

    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":  # python -m sensray ...
        program = "python -m " + Path(sys.argv[0]).parent.name
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
