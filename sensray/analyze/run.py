"""A finished run directory, read for analysis: the trial table, the baseline, the spec.

    run = load_run("results/bitflip/20261126-161055-6a52c0")
    run.trials        # polars DataFrame, one row per trial (trials.parquet)
    run.baseline      # dict (baseline.json)
    run.spec          # dict (spec.yaml, as resolved by the sweep)

Analysis reads only these three files, never the model. Every problem with them is an
`AnalysisError` (exit status 2) that names the file and the missing key or column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from sensray import safe_yaml
from sensray.errors import SensrayError, SpecError

REQUIRED_COLUMNS = ("trial_id", "kind", "target", "delta_ppl", "ppl", "nonfinite", "seconds", "error")
REQUIRED_BASELINE = ("model", "ppl", "nll", "tokens")


class AnalysisError(SensrayError):
    """A run directory (or a request about it) that cannot be analysed as asked."""

    exit_code = 2


@dataclass(frozen=True)
class Run:
    path: Path
    trials: pl.DataFrame
    baseline: dict[str, Any]
    spec: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def name(self) -> str:
        return str(self.spec.get("name", self.path.parent.name))

    @property
    def kind(self) -> str:
        kinds = self.trials["kind"].unique().to_list()
        return kinds[0] if len(kinds) == 1 else "+".join(sorted(map(str, kinds)))


def load_run(path: str | Path) -> Run:
    """Read and check a run directory; raise `AnalysisError` naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise AnalysisError(f"{path}: no such run directory")
    return Run(path, read_trials(path), read_baseline(path), read_spec(path))


def read_trials(path: Path) -> pl.DataFrame:
    table = path / "trials.parquet"
    if not table.is_file():
        raise AnalysisError(f"{table}: not found{_missing_hint(path)}")
    try:
        trials = pl.read_parquet(table)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise AnalysisError(f"{table}: cannot read: {err}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in trials.columns]
    if missing:
        raise AnalysisError(f"{table}: missing column {missing[0]!r} (columns: {', '.join(trials.columns)})")
    if trials.is_empty():
        raise AnalysisError(f"{table}: the table has no trials")
    return trials


def _missing_hint(path: Path) -> str:
    if (path / "trials.jsonl").is_file():
        return ("; the sweep did not finish (trials.jsonl is there): finish it with "
                f"python -m sensray.sweep --resume {path}")
    runs = sorted(p.parent.name for p in path.glob("*/trials.parquet"))
    if runs:  # an experiment directory: run ids sort by time, so the last is the latest
        return f"; {path} holds {len(runs)} run{'s' * (len(runs) != 1)}, the latest is {path / runs[-1]}"
    return " (is this a run directory? expected results/<experiment>/<run id>/)"


def read_baseline(path: Path) -> dict[str, Any]:
    file = path / "baseline.json"
    if not file.is_file():
        raise AnalysisError(f"{file}: not found (every run directory has one; is {path} a sensray run?)")
    try:
        baseline = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnalysisError(f"{file}: not valid JSON: {err}") from None
    if not isinstance(baseline, dict):
        raise AnalysisError(f"{file}: expected a JSON object")
    missing = [k for k in REQUIRED_BASELINE if k not in baseline]
    if missing:
        raise AnalysisError(f"{file}: missing key {missing[0]!r}")
    return baseline


def read_spec(path: Path) -> dict[str, Any]:
    """The resolved spec as plain data; absent or unreadable, the report says less, nothing fails."""
    file = path / "spec.yaml"
    try:
        spec = safe_yaml.load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SpecError):
        return {}
    return spec if isinstance(spec, dict) else {}
