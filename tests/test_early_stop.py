"""Early stopping: the board's bounds, the replica's rung checks, and a sweep that finds the exhaustive top-k."""

from pathlib import Path

import polars as pl
import pytest

from sensray.early_stop import Board, RungCheck, rung_batches, savings
from sensray.errors import SpecError
from sensray.metrics import Scores
from sensray.spec import EarlyStopSpec
from sensray.sweep import main

STOP = EarlyStopSpec(top_k=2, rungs=[0.25, 0.5])


def row(tid, delta, rungs, stopped=None, error=None):
    return {"trial_id": tid, "nll": 1.0, "ppl": 10.0 * delta, "kl": 0.1, "top1_agreement": 0.9, "nonfinite": False,
            "rung_scores": rungs, "stopped_rung": stopped, "error": error, "tokens": 100}


def test_no_bounds_until_k_trials_finish_then_the_weakest_top_k_rung_scores():
    board = Board(STOP, baseline_ppl=10.0)
    assert board.bounds() == (None, None)
    board.tell(row("a", 3.0, [2.0, 2.5]))
    board.tell(row("b", 1.1, [1.0, 1.05], stopped=0))  # stopped early: never a member of the top-k
    board.tell(row("c", 9.0, [1.0, 1.0], error="boom"))  # failed: ignored
    assert board.bounds() == (None, None)
    board.tell(row("d", 2.0, [1.5, 3.0]))
    assert board.bounds() == (1.5, 2.5)
    board.tell(row("e", 5.0, [4.0, 4.5]))  # pushes d out of the top-2
    assert [tid for _, tid, _ in board.top()] == ["e", "a"] and board.bounds() == (2.0, 2.5)


def test_a_trial_that_shows_its_damage_late_lowers_the_bound_when_it_joins_the_top_k():
    """The bound is the weakest rung score of the current top-k: it falls when a trial that looked mild at
    the rung (1.0) but finished worst (x10) joins the top-k. A trial sent before that keeps the old bound."""
    board = Board(EarlyStopSpec(top_k=2, rungs=[0.5]), baseline_ppl=10.0)
    board.tell(row("a", 3.0, [2.0]))
    board.tell(row("d", 2.0, [1.5]))
    assert board.bounds() == (1.5,)
    board.tell(row("f", 10.0, [1.0]))
    assert [tid for _, tid, _ in board.top()] == ["f", "a"] and board.bounds() == (1.0,)


def scores(ppl):
    return Scores(nll=0.0, ppl=ppl, kl=0.0, top1_agreement=1.0, nonfinite=False, tokens=10)


def test_rung_check_stops_below_the_bound_and_records_partial_scores():
    check = RungCheck(STOP, rungs=[2, 4], baseline_ppls=[10.0, 20.0], bounds=(1.5, None))
    assert check(1, scores(100.0)) is False  # not a rung
    assert check(2, scores(20.0)) is False  # 2.0 >= 1.5
    assert check(4, scores(20.0)) is False  # no bound at the second rung
    assert check.row_fields() == {"rung_scores": [2.0, 1.0], "stopped_rung": None}
    low = RungCheck(STOP, rungs=[2, 4], baseline_ppls=[10.0, 20.0], bounds=(1.5, 1.0))
    assert low(2, scores(12.0)) is True and low.row_fields() == {"rung_scores": [1.2], "stopped_rung": 0}


def test_min_mode_flips_the_sign():
    spec = EarlyStopSpec(top_k=1, rungs=[0.5], metric="top1_agreement", mode="min")
    check = RungCheck(spec, rungs=[1], baseline_ppls=[1.0], bounds=(-0.5,))
    assert check(1, Scores(0, 1, 0, 0.6, False, 1)) is True  # agreement 0.6 is less damaging than 0.5


def test_rungs_need_batch_boundaries():
    assert rung_batches([0.25, 0.5], 8) == [2, 4]
    with pytest.raises(SpecError, match="early_stop.rungs"):
        rung_batches([0.25, 0.5], 2)  # both rungs fall on the first batch
    with pytest.raises(SpecError, match="batch_size"):
        rung_batches([0.5], 1)


def test_savings_counts_token_evaluations():
    rows = [row("a", 2, [1, 1]), row("b", 1, [1], stopped=0) | {"tokens": 25}, row("c", 1, [], error="x")]
    assert savings(rows, 100) == (125, 200)


STUDY = """\
name: worst
data: {{seq_len: 32, num_sequences: 8, batch_size: 2}}
perturbation: noise
space:
  target: {{each: "blocks.*.mlp.*"}}
  sigma: {{grid_search: [0.05, 0.3, 1.5]}}
output_dir: {out}
"""


def top_ids(table, k):
    full = table.filter(pl.col("stopped_rung").is_null()) if "stopped_rung" in table.columns else table
    return set(full.sort(["delta_ppl", "trial_id"], descending=[True, False])["trial_id"][:k])


def test_sweep_with_early_stopping_finds_the_exhaustive_top_k(write_spec, tmp_path, capsys):
    spec = write_spec(STUDY.format(out=tmp_path / "results"))
    assert main([str(spec), "--executor", "local"]) == 0
    exhaustive = pl.read_parquet(Path(capsys.readouterr().out.strip().splitlines()[-1]) / "trials.parquet")
    assert main([str(spec), "--executor", "local", "--set", "early_stop={top_k: 3, rungs: [0.25, 0.5]}"]) == 0
    out = capsys.readouterr()
    stopped = pl.read_parquet(Path(out.out.strip().splitlines()[-1]) / "trials.parquet")
    assert stopped.height == exhaustive.height == 8 * 3 * 3
    assert stopped["stopped_rung"].drop_nulls().len() > 0  # it did stop trials...
    assert top_ids(stopped, 3) == top_ids(exhaustive, 3)  # ...and still found the same three worst
    spent, full = savings(stopped.to_dicts(), 8 * 31)
    assert spent < full and "early stopping:" in out.err and "token evaluations" in out.err
    survivors = stopped.filter(pl.col("stopped_rung").is_null())
    merged = survivors.join(exhaustive, on="trial_id", suffix="_exhaustive")
    assert (merged["ppl"] == merged["ppl_exhaustive"]).all()  # trials run in full score exactly the same
