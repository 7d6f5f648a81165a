"""Predicted against measured: join the gradient predictions with a finished sweep's delta_nll.

    checked = CheckedRun.read("results/noise/<run id>")     # rows, spec, baseline nll
    table = joined(checked, probes.predictions(fisher=True), probes.magnitude)
    correlations(table)        # Spearman per granularity: trial, condition, block, module (and per field)

The measured loss change of a trial is delta_nll = nll - baseline nll (nats; +inf when the outputs
went non-finite), on the run's own eval text, which the saliency passes then use too. Granularities:
`trial` (each row), `condition` (the trial's parameters but its seed: the median over seeds), `block`
and `module` (the layer and module kind of the tensors it touched, where all agree; medians). Rows
stopped early (measured on fewer tokens), failed, or of kinds with no prediction are left out and
counted. Spearman's rho ranks both sides with ties averaged; +inf ranks above everything, so "the
flip made the outputs non-finite" and "predicted +inf" agree as ranks.

`magnitude` (the norm of the weight change, sqrt(sum Delta^2)) is the control: a prediction that ranks no
better than the size of the change has learnt nothing from the gradient.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from sensray.analyze.tables import parse_target
from sensray.errors import SensrayError
from sensray.results import FIRST_COLUMNS, LAST_COLUMNS, PROVENANCE, RunDir
from sensray.spec import ExperimentSpec

# Row columns that are not the trial's parameters (`target` is one: it stays).
NOT_PARAMS = {*FIRST_COLUMNS, *PROVENANCE, *LAST_COLUMNS, "rung_scores", "stopped_rung", "tokens"} - {"target"}


@dataclass
class CheckedRun:
    path: Path
    spec: ExperimentSpec
    baseline_nll: float
    rows: list[dict[str, Any]]

    @classmethod
    def read(cls, path: str | Path) -> "CheckedRun":
        run = RunDir.open(path)
        try:
            baseline = json.loads((run.path / "baseline.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SensrayError(f"{run.path}: no readable baseline.json ({err}); has the sweep started?") from None
        rows = [row for row in run.rows() if row.get("stopped_rung") is None]
        if not rows:
            raise SensrayError(f"{run.path}: no finished trials to check against")
        return cls(run.path, run.spec(), float(baseline["nll"]), rows)

    @property
    def label(self) -> str:
        return f"{self.spec.name}/{self.path.name}"


def measured(row: dict[str, Any], baseline_nll: float) -> float:
    if row.get("error") is not None or row.get("nll") is None:
        return np.nan
    return np.inf if row.get("nonfinite") else float(row["nll"]) - baseline_nll


def place(row: dict[str, Any]) -> tuple[int | None, str | None]:
    """(layer, module kind) of the tensors the trial touched, each None when they disagree."""
    names = [t["tensor"] for t in row.get("tensors") or []] or [row.get("target") or ""]
    parsed = {parse_target(name) for name in names}
    layers = {layer for layer, _ in parsed}
    modules = {module.removesuffix(".weight").removesuffix(".bias") for _, module in parsed}
    return (layers.pop() if len(layers) == 1 else None), (modules.pop() if len(modules) == 1 else None)


def condition(row: dict[str, Any]) -> str:
    """The trial's parameters but its seed: trials that differ only in their draw."""
    return json.dumps({k: v for k, v in row.items() if k not in NOT_PARAMS and k != "seed"}, sort_keys=True,
                      default=str)


def joined(run: CheckedRun, predictions: dict[str, np.ndarray], magnitude: np.ndarray) -> pl.DataFrame:
    """One row per trial: its keys, measured delta_nll, the predictions and the control."""
    places = [place(row) for row in run.rows]
    return pl.DataFrame({
        "run": [run.label] * len(run.rows),
        "kind": [row["kind"] for row in run.rows],
        "trial_id": [row["trial_id"] for row in run.rows],
        "target": [row.get("target") for row in run.rows],
        "field": [row.get("field") for row in run.rows],
        "mode": [row.get("mode") for row in run.rows],
        "condition": [condition(row) for row in run.rows],
        "layer": [p[0] for p in places],
        "module": [p[1] for p in places],
        "measured": [measured(row, run.baseline_nll) for row in run.rows],
        "first": predictions["first"], "second": predictions["second"], "predicted": predictions["predicted"],
        "magnitude": magnitude,
    }, schema_overrides={"layer": pl.Int64, "field": pl.String, "mode": pl.String, "module": pl.String,
                         "target": pl.String})


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (ties averaged, +inf the largest); NaN pairs dropped; NaN below 3 pairs or no spread."""
    keep = ~(np.isnan(x) | np.isnan(y))
    if keep.sum() < 3:
        return np.nan
    rx = pl.Series(x[keep]).rank("average").to_numpy()
    ry = pl.Series(y[keep]).rank("average").to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return np.nan
    return float(np.corrcoef(rx, ry)[0, 1])


PREDICTORS = ("first", "predicted", "magnitude")


def correlations(table: pl.DataFrame) -> pl.DataFrame:
    """Spearman's rho of each predictor with the measured delta_nll, per run and granularity."""
    out = []
    usable = table.filter(pl.col("predicted").is_not_nan() & pl.col("measured").is_not_nan())
    for (run,), part in usable.group_by("run", maintain_order=True):
        groups = {"trial": part, "condition": _medians(part, ["condition"]),
                  "block": _medians(part.filter(pl.col("layer").is_not_null()), ["layer"]),
                  "module": _medians(part.filter(pl.col("module").is_not_null()), ["module"])}
        if part["condition"].n_unique() == len(part):
            del groups["condition"]  # no seeds: the same as `trial`
        for (field,), subset in part.filter(pl.col("field").is_not_null()).group_by("field", maintain_order=True):
            groups[f"trial, field {field}"] = subset
        for name, group in groups.items():
            if not len(group):
                continue  # e.g. no trial of a noise run sits in one block
            measured = group["measured"].to_numpy()
            out.append({"run": run, "kind": part["kind"][0], "granularity": name, "n": len(group),
                        **{f"rho_{p}": spearman(group[p].to_numpy(), measured) for p in PREDICTORS}})
    return pl.DataFrame(out, schema={"run": pl.String, "kind": pl.String, "granularity": pl.String, "n": pl.Int64,
                                     **{f"rho_{p}": pl.Float64 for p in PREDICTORS}})


def _medians(part: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    return part.group_by(keys, maintain_order=True).agg(pl.col(c).median() for c in ("measured", *PREDICTORS))


def unused(table: pl.DataFrame) -> dict[str, int]:
    """Per run: trials left out (no prediction for their kind, failed, or stopped early)."""
    missing = table.filter(pl.col("predicted").is_nan() | pl.col("measured").is_nan())
    return dict(missing.group_by("run").len().iter_rows())
