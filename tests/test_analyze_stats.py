"""Honest statistics on synthetic tables: bootstrap intervals over eval sequences and draws, distinct
positions, what each trial hit (provenance), and the one number policy per column."""

from __future__ import annotations

import math

import polars as pl
import pytest
from synthetic_runs import BASE_SEQ, BASELINE_PPL, bitflip_table, noise_table, prune_table, seq_nll

from sensray.analyze import fmt, tables
from sensray.analyze.stats import Sequences, distinguishable
from sensray.results import to_frame

BASELINE = {"ppl": BASELINE_PPL, "seq_nll": BASE_SEQ}


def _trials(deltas: list[float], wobble: float = 0.0, seeds: bool = True) -> pl.DataFrame:
    rows = [{"trial_id": f"t{i}", "kind": "noise", "sample": 0, "target": "blocks.*.attn.q",
             **({"seed": i} if seeds else {}), "ppl": d * BASELINE_PPL, "delta_ppl": d, "nonfinite": False,
             "seq_nll": seq_nll(d, wobble * (1 if i % 2 else -1)), "seconds": 0.1, "replica": "r", "error": None}
            for i, d in enumerate(deltas)]
    return to_frame(rows)


def test_no_interval_without_per_sequence_nlls():
    assert Sequences.of(bitflip_table(), {"ppl": 20.0}) is None
    assert Sequences.of(bitflip_table().drop("seq_nll"), BASELINE) is None


def test_baseline_interval_brackets_the_baseline():
    ppl, low, high = Sequences.of(bitflip_table(), BASELINE).baseline()
    assert ppl == pytest.approx(BASELINE_PPL) and low < ppl < high
    assert 0.7 * ppl < low and high < 1.3 * ppl  # sequences spread +-0.3 nats: an interval of a few percent


def test_a_change_every_sequence_shares_is_distinguishable_however_small():
    seq = Sequences.of(bitflip_table(), BASELINE)
    uniform = seq.trials(_trials([1.0001]))  # every sequence 0.01% worse: paired, the interval is that point
    assert uniform["ratio_low"][0] == pytest.approx(1.0001) and uniform["ratio_high"][0] == pytest.approx(1.0001)
    assert distinguishable(uniform["ratio_low"][0], uniform["ratio_high"][0]) is True
    mixed = seq.trials(_trials([1.0001], wobble=0.01))  # sequences move both ways by 1%: not told apart
    assert mixed["ratio_low"][0] < 1 < mixed["ratio_high"][0]
    assert distinguishable(mixed["ratio_low"][0], mixed["ratio_high"][0]) is False


def test_cell_intervals_resample_draws_only_when_there_are_draws():
    seq = Sequences.of(bitflip_table(), BASELINE)
    spread = [1.0, 1.5, 2.0, 3.0]
    random = seq.cells(_trials(spread), ["target"], random=True).row(0, named=True)
    census = seq.cells(_trials([2.0]), ["target"], random=False).row(0, named=True)
    assert random["median_low"] < 1.5 and random["median_high"] > 2.0  # which draws: most of the spread
    assert census["median_low"] == pytest.approx(2.0) and census["median_high"] == pytest.approx(2.0)
    assert census["ppl_low"] < 2 * BASELINE_PPL < census["ppl_high"]  # the ppl itself varies with the text


def test_nonfinite_trials_keep_an_infinite_interval_and_failed_ones_none():
    seq = Sequences.of(bitflip_table(), BASELINE)
    t = bitflip_table()
    broken = t.filter(pl.col("delta_ppl").is_infinite())
    bounds = seq.trials(broken)
    assert len(broken) == 2 and bounds["ratio_low"].to_list() == [math.inf, math.inf]
    failed = noise_table().filter(pl.col("error").is_not_null())
    assert seq.trials(failed)["ratio_low"].to_list() == [None]


def test_summaries_carry_every_metric_and_their_intervals():
    seq = Sequences.of(bitflip_table(), BASELINE)
    flips = {r["flip"]: r for r in tables.by_flip(bitflip_table(), seq=seq).iter_rows(named=True)}
    assert flips["sign"]["top1"] == pytest.approx(0.999) and flips["mantissa"]["kl"] == pytest.approx(1e-6)
    assert flips["exponent_msb"]["ppl"] > 100 * BASELINE_PPL
    assert flips["mantissa"]["median_low"] <= 1 <= flips["mantissa"]["median_high"]
    assert list(tables.by_flip(bitflip_table())["flip"]) == ["sign", "exponent_msb", "exponent", "mantissa"]


def test_distinct_positions_and_draws():
    t = bitflip_table()
    cell = tables.summarize(t, ["target", "field"]).filter(
        (pl.col("target") == "blocks.0") & (pl.col("field") == "sign")).row(0, named=True)
    assert cell["distinct"] == 4  # four seeds, four different elements
    repeated = t.with_columns(pl.col("changes").list.eval(pl.element().struct.with_fields(
        pl.lit("blocks.0.attn.q.weight").alias("tensor"), pl.lit(7, pl.Int64).alias("index"))))
    same = tables.summarize(repeated, ["target", "field"]).row(0, named=True)
    assert same["n"] == 4 and same["distinct"] == 1  # four draws that hit one element back the cell once
    noise = tables.summarize(noise_table(), ["target", "sigma"])
    assert set(noise["distinct"]) == {2}  # whole-tensor noise: distinct draws (seeds)


def test_what_each_trial_hit():
    t = bitflip_table()
    bits = tables.by_bit(t)
    assert bits["flipped_bit"].to_list() == sorted(bits["flipped_bit"].to_list(), reverse=True)
    assert bits.filter(pl.col("flipped_bit") == 30)["n"].item() == 20  # 16 exponent_msb + 4 exponent seed 0
    matrices = tables.by_matrix(t)
    assert matrices["matrix"].to_list() == ["attn.q", "attn.k", "attn.v", "attn.o"]  # model order
    assert tables.matrix_of("blocks.3.mlp.down.weight") == "mlp.down" and tables.matrix_of("lm_head.weight") == "lm_head"
    assert tables.by_matrix(noise_table()).is_empty()  # noise touches 2 tensors per trial: no single matrix


def test_worst_trials_say_exactly_what_changed():
    worst = tables.worst_trials(bitflip_table(), 3).row(2, named=True)  # the first finite one
    assert worst["tensor"] == "blocks.0.attn.o.weight" and worst["element"] == "[3, 10]" and worst["bit"] == 30
    assert worst["old -> new"] == "0.02 -> 6.806e+36"
    pruned = tables.worst_trials(prune_table(), 1).row(0, named=True)
    assert "blocks.0.mlp.up.weight: 80.0% of 16,384 elements changed" in pruned["changed"]


def test_achieved_sparsity_from_the_pruned_tensors():
    t = prune_table()
    achieved = tables.achieved_sparsity(t)
    expected = [s + (0.001 if scope == "row" else 0.0) for s, scope in zip(t["sparsity"], t["scope"])]
    assert achieved.to_list() == pytest.approx(expected)
    assert tables.achieved_sparsity(bitflip_table()) is None


@pytest.mark.parametrize("x, text", [(1.000022, "1.00"), (0.99996, "1.00"), (47.41, "47.4"), (1234.0, "1,230"),
                                     (0.00123, "0.00123"), (math.inf, "inf"), (None, "–")])
def test_three_significant_figures_for_every_ratio(x, text):
    assert fmt.sig(x) == text


def test_ratio_marks_what_the_baseline_cannot_be_told_from():
    assert fmt.ratio(1.000022, 0.9998, 1.0003) == "≈1.00" and fmt.ratio(1.000022, 1.00001, 1.00003) == "1.00"
    assert fmt.ratio(47.4) == "47.4" and fmt.ppl(2048.0) == "2,048.00" and fmt.agreement(0.76125) == "76.12%"
    assert fmt.kl(3.14159e-6) == "3.1e-06" and fmt.span(0.16, 0.368, fmt.percent) == "16.0%–36.8%"
