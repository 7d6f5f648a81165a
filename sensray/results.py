"""The run directory and its trial table.

    results/<experiment>/<run id>/
        spec.yaml        the resolved spec (every default filled in)
        baseline.json    baseline metrics, model, dtype, parameter count, weight checksums, versions
        trials.jsonl     the journal: one row per finished trial, flushed and fsynced as it lands
        trials.parquet   the table (polars), written atomically when the sweep ends

The journal is what makes a crash lose at most the trials in flight: `--resume` reads it,
skips every trial id already there, and the final table holds each trial exactly once.
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

from sensray.errors import SensrayError
from sensray.spec import ExperimentSpec, validate

FIRST_COLUMNS = ("trial_id", "kind", "sample", "target")
# What the trial changed, from its undo record (sensray/perturbations/edits.py), between the parameters and
# the metrics. Flat columns hold the common single-tensor / single-element case, to group on directly;
# `changes` lists every changed element, `tensors` every touched tensor (or hooked module).
PROVENANCE = ("tensor", "index", "flipped_bit", "old", "new", "elements_changed", "changes", "bit_counts", "tensors")
LAST_COLUMNS = ("ppl", "nll", "delta_ppl", "kl", "top1_agreement", "nonfinite", "seconds", "replica", "error")


def new_run_id() -> str:
    """Sortable by time, unique across concurrent launches."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, spec: ExperimentSpec) -> "RunDir":
        run = cls(Path(spec.output_dir) / spec.name / new_run_id())
        run.path.mkdir(parents=True)
        _atomic_write(run.path / "spec.yaml", yaml.safe_dump(spec.resolved(), sort_keys=False))
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(Path(path))
        if not (run.path / "spec.yaml").is_file():
            raise SensrayError(f"{path} is not a sensray run directory (no spec.yaml)")
        return run

    def spec(self) -> ExperimentSpec:
        return validate(yaml.safe_load((self.path / "spec.yaml").read_text(encoding="utf-8")))

    @property
    def journal(self) -> Path:
        return self.path / "trials.jsonl"

    @property
    def table(self) -> Path:
        return self.path / "trials.parquet"

    def write_baseline(self, baseline: dict[str, Any]) -> None:
        _atomic_write(self.path / "baseline.json", json.dumps(baseline | {"versions": versions()}, indent=2) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        """Every finished trial so far (table and journal), each trial id once."""
        rows: dict[str, dict] = {}
        if self.table.is_file():
            import polars as pl

            rows.update((r["trial_id"], r) for r in pl.read_parquet(self.table).to_dicts())
        if self.journal.is_file():
            for line in self.journal.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash: that trial simply runs again
                rows[row["trial_id"]] = row
        return list(rows.values())

    def finish(self, rows: Iterable[dict[str, Any]]) -> Path:
        """Write trials.parquet atomically, then drop the journal it supersedes."""
        frame = to_frame(list(rows))
        tmp = self.table.with_suffix(".parquet.tmp")
        frame.write_parquet(tmp)
        os.replace(tmp, self.table)
        self.journal.unlink(missing_ok=True)
        return self.table


class Journal:
    """Append-only JSON lines, fsynced per row: durable as soon as a trial finishes."""

    def __init__(self, path: Path):
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
    middle = [n for n in names if n not in fixed]
    provenance = [n for n in PROVENANCE if n in names]  # absent in tables written before provenance existed
    order = [*FIRST_COLUMNS, *middle, *provenance, *LAST_COLUMNS]
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
        "nonfinite": pl.Boolean, "error": pl.String, "replica": pl.String,
    }


def versions() -> dict[str, str]:
    import polars
    import torch
    import transformers

    import sensray

    return {
        "sensray": sensray.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "polars": polars.__version__,
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
