"""benchmarks/soak.py: a short soak passes every check, and a weight left changed is caught.

The long runs (3,000 trials, and 100,000 finished by --resume) are in docs/BENCHMARKS.md;
this is the same code on 2,000 trials.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import polars as pl
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("soak", None)


def run_dir(output: Path) -> Path:
    (path,) = (output / "soak").iterdir()
    return path


@pytest.mark.slow  # 2,000 trials on three replicas: about 30 s of CPU
def test_short_soak_restores_every_trial_and_records_each_once(soak, tmp_path, capsys):
    assert soak.main(["--trials", "2000", "--check-every", "500", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| weights checksum vs load, every 500 trials | 4/4 intact |" in out
    assert "float32 intact, float16 intact, bfloat16 intact" in out
    table = pl.read_parquet(run_dir(tmp_path) / "trials.parquet")
    assert table.height == table["trial_id"].n_unique() == 2000  # exactly once, read back independently
    assert set(table["format"]) == {"float32", "float16", "bfloat16"}
    assert set(table["kind"]) == {"bitflip", "noise", "ablation", "zero", "prune"}
    assert set(table["case"]) == set(soak.CASES)
    assert table["error"].null_count() == 2000
    naninf = table.filter(pl.col("case") == "naninf")
    assert naninf.height > 100 and all(not math.isfinite(c[0]["new"]) for c in naninf["changes"])
    assert naninf["nonfinite"].all()  # an inf/NaN weight reaches the logits, and is reported, not raised
    repeats = table.filter(pl.col("case") == "repeat")
    originals = {r["trial_id"]: r for r in table.to_dicts() if r["trial_id"] in set(repeats["repeat_of"])}
    assert repeats.height > 100
    for row in repeats.to_dicts():
        assert soak.same({k: row[k] for k in soak.COMPARED}, {k: originals[row["repeat_of"]][k] for k in soak.COMPARED})
    checks = [line for line in (run_dir(tmp_path) / "soak-checks.jsonl").read_text().splitlines()]
    assert len(checks) == 4


def test_a_weight_left_changed_fails_the_next_check(soak, tmp_path, monkeypatch, capsys):
    from sensray.replica import Replica

    run_trial = Replica.run_trial

    def leaky(self, trial):  # trial 150 leaves one weight of the model changed behind the undo record's back
        row = run_trial(self, trial)
        if trial.trial_id == "soak-000150":
            self.model.get_parameter("model.layers.2.mlp.down_proj.weight").data[0, 0] += 1.0
        return row

    monkeypatch.setattr(Replica, "run_trial", leaky)
    code = soak.main(["--trials", "400", "--check-every", "100", "--formats", "float32", "--output-dir", str(tmp_path)])
    assert code == 1
    assert "error: weights changed" in capsys.readouterr().err
    checks = (run_dir(tmp_path) / "soak-checks.jsonl").read_text().splitlines()
    assert [('"float32": true' in c) for c in checks] == [True, False]  # stopped at the first failed check
    assert not (run_dir(tmp_path) / "trials.parquet").exists()


@pytest.mark.slow  # two soaks (two replicas each), one of them resumed
def test_resume_runs_only_what_is_missing(soak, tmp_path, capsys):
    args = ["--trials", "120", "--check-every", "60", "--formats", "float32,bfloat16", "--output-dir", str(tmp_path)]
    assert soak.main(args) == 0
    path = run_dir(tmp_path)
    table = pl.read_parquet(path / "trials.parquet")
    (path / "trials.parquet").unlink()  # as if the run had stopped after 80 of its 120 trials
    journal = [row for row in table.head(80).to_dicts()]
    from sensray.results import Journal

    with Journal(path / "trials.jsonl") as out:
        for row in journal:
            out.append(row)
    capsys.readouterr()
    assert soak.main(["--resume", str(path)]) == 0
    assert "120 trials, 40 to run" in capsys.readouterr().err
    again = pl.read_parquet(path / "trials.parquet")
    assert again.height == again["trial_id"].n_unique() == 120
    assert again.sort("trial_id")["nll"].to_list() == table.sort("trial_id")["nll"].to_list()
