"""The analysis of lm-eval task scores (sensray/analyze/tasks.py) on synthetic runs with known answers: no model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import polars as pl
import pytest

from sensray.analyze import tables
from sensray.analyze.run import load_run
from sensray.analyze.tasks import compare_tasks, figure, interval, task_table, write
from sensray.results import to_frame

matplotlib.use("Agg")
ACC, PPL = "choice/acc", "text/token_perplexity"


def noise_run(root: Path, name: str, damage: float) -> Path:
    """Noise on two targets at three sigmas; accuracy falls with sigma (faster for mlp.down, times `damage`)."""
    rows = []
    for target, scale in (("blocks.*.attn.q", 0.2), ("blocks.*.mlp.down", 1.0)):
        for sigma in (0.01, 0.1, 1.0):
            acc = max(0.25, 0.9 - damage * scale * sigma)
            rows.append({"trial_id": f"{target.split('.')[-1]}-{sigma}", "kind": "noise", "sample": 0, "target": target,
                         "sigma": sigma, "seed": 0, "ppl": 20 * (1 + sigma), "nll": 3.0, "delta_ppl": 1 + sigma,
                         "kl": 0.1, "top1_agreement": 0.9, "nonfinite": False, "seconds": 1.0, "replica": "local-0",
                         "error": None, ACC: acc, f"{ACC}_stderr": math.sqrt(acc * (1 - acc) / 99), "choice/n": 100,
                         PPL: 40 * (1 + 30 * sigma), f"{PPL}_stderr": None, "task_seconds": 0.5})
    path = root / name / "20260101-000000-000000"
    path.mkdir(parents=True)
    to_frame(rows).write_parquet(path / "trials.parquet")
    base = {ACC: 0.9, f"{ACC}_stderr": 0.03, "choice/n": 100, PPL: 40.0, f"{PPL}_stderr": None}
    (path / "baseline.json").write_text(json.dumps({"model": name, "ppl": 20.0, "nll": 3.0, "tokens": 2048,
                                                    "tasks": base}))
    (path / "spec.yaml").write_text(f"name: {name}\nperturbation: noise\n")
    return path


@pytest.fixture
def runs(tmp_path):
    return load_run(noise_run(tmp_path, "dense", 0.5)), load_run(noise_run(tmp_path, "pruned", 1.0))


def test_intervals_wilson_for_shares_stderr_otherwise_none_for_perplexity():
    low, high = interval(ACC, 1.0, 0.0, 20)  # lm-eval's stderr of 20/20 is 0: Wilson's interval is not
    assert high == 1.0 and 0.8 < low < 0.9
    assert interval("x/mcc", 0.5, 0.1, None) == pytest.approx((0.5 - 0.196, 0.5 + 0.196), abs=1e-3)
    assert interval(PPL, 40.0, None, 3) == (None, None)


def test_task_columns_are_outcomes_never_conditions(runs):
    trials = runs[0].trials
    assert tables.parameters(trials) == ["sigma", "seed"] and tables.conditions(trials) == ["sigma"]
    order = trials.columns
    assert order.index("seed") < order.index(ACC) < order.index("ppl")  # after the parameters, before the metrics


def test_task_table_has_intervals_changes_and_the_worst_first(runs):
    table = task_table(runs[0])
    acc = table.filter(pl.col("task_metric") == ACC)
    assert acc.height == 6 and acc["value"].to_list() == sorted(acc["value"].to_list())  # lowest accuracy first
    worst = acc.row(0, named=True)
    assert worst["target"] == "blocks.*.mlp.down" and worst["sigma"] == 1.0
    assert worst["ci_low"] < worst["value"] < worst["ci_high"] and worst["change"] == pytest.approx(-0.5)
    ppl = table.filter(pl.col("task_metric") == PPL)
    assert ppl["value"][0] == ppl["value"].max() and ppl["ci_low"].is_null().all()  # highest perplexity first


def test_the_figure_and_files(runs, tmp_path):
    fig = figure(runs[0])
    assert fig is not None and [ax.get_xlabel() for ax in fig.axes if ax.get_visible()] == ["sigma", "sigma"]
    assert fig.axes[1].get_yscale() == "log"  # perplexity from 52 to 1240
    written = write(runs[0], tmp_path / "out")
    assert [p.name for p in written] == ["tasks.png", "tasks.md"]
    assert "choice/acc: most damaged trials first (of 6 scored)" in (tmp_path / "out" / "tasks.md").read_text()


def test_compare_puts_baselines_then_shared_trials_side_by_side(runs):
    table = compare_tasks(runs, ["dense", "pruned"])
    first = table.row(0, named=True)
    assert table.columns[:3] == ["trial_id", "target", "task_metric"] and first["trial_id"] == "baseline" and {"dense", "pruned", "dense_low", "pruned_high"} <= set(table.columns)
    worst = table.filter((pl.col("task_metric") == ACC) & (pl.col("trial_id") == "down-1.0")).row(0, named=True)
    assert (worst["dense"], worst["pruned"]) == pytest.approx((0.4, 0.25))
