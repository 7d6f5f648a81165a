"""Aggregations on synthetic trial tables with known answers, and the analyze CLI's input errors."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
from synthetic_runs import INF, ablation_table, bitflip_table, noise_table, write_run

from sensray.analyze import tables
from sensray.analyze.__main__ import main


@pytest.mark.parametrize("target, expected", [
    ("blocks.3", (3, "block")),
    ("blocks.3.mlp.down", (3, "mlp.down")),
    ("blocks.12.attn.q.weight", (12, "attn.q.weight")),
    ("blocks.*.attn.q", (None, "attn.q")),
    ("blocks.0-7.mlp.up", (None, "mlp.up")),
    ("blocks.*", (None, "block")),
    ("embed", (None, "embed")),
    ("lm_head", (None, "lm_head")),
    ("model.layers.3.mlp.down_proj.weight", (3, "mlp.down_proj.weight")),
    ("model.layers.*.mlp.down_proj.weight", (None, "model.layers.*.mlp.down_proj.weight")),
])
def test_parse_target(target, expected):
    assert tables.parse_target(target) == expected


def test_annotate_adds_layer_module_and_flip():
    t = tables.annotate(bitflip_table())
    assert t["layer"].dtype == pl.Int64 and sorted(t["layer"].unique()) == [0, 1, 2, 3]
    assert t["module"].unique().to_list() == ["block"]
    assert set(t["flip"]) == {"sign", "exponent_msb", "exponent", "mantissa"}
    assert tables.annotate(t) is t  # idempotent


def test_flip_column_from_bit_positions():
    t = bitflip_table().drop("field").with_columns(pl.lit(30).alias("bit"))
    assert set(tables.annotate(t)["flip"]) == {"bit 30"}


def test_conditions_leave_out_seeds_constants_and_random_draws():
    assert tables.conditions(tables.annotate(bitflip_table())) == ["field"]  # count is 1 everywhere
    assert tables.conditions(noise_table()) == ["sigma"]  # the target is always a key, never a condition
    drawn = bitflip_table().with_columns(pl.Series("rate", [1e-6 * (i + 1.5) for i in range(64)]))
    assert "rate" not in tables.conditions(drawn)


def test_rank_targets_known_answer():
    ranked = tables.rank_targets(bitflip_table())
    top = ranked.row(0, named=True)
    # blocks.0 exponent_msb: seeds 0-1 non-finite, 2-3 at 10002, 10003 -> the median is non-finite
    assert (top["target"], top["field"], top["n"], top["nonfinite"], top["catastrophic"]) == ("blocks.0", "exponent_msb", 4, 2, 4)
    assert math.isinf(top["median"]) and math.isinf(top["worst"])
    second = ranked.row(1, named=True)
    assert (second["target"], second["field"], second["median"], second["worst"]) == ("blocks.1", "exponent_msb", 1001.5, 1003.0)
    assert second["q25"] <= second["median"] <= second["q75"]
    last = ranked.filter(pl.col("field") == "mantissa")
    assert last["median"].to_list() == [1.0] * 4 and last["catastrophic"].sum() == 0


def test_by_flip_and_by_layer():
    flips = {r["flip"]: r for r in tables.by_flip(bitflip_table()).iter_rows(named=True)}
    assert flips["exponent_msb"]["share"] == 1.0 and flips["exponent_msb"]["n"] == 16
    assert flips["mantissa"]["median"] == 1.0 and flips["mantissa"]["share"] == 0.0
    assert flips["sign"]["median"] == pytest.approx(1.0025)
    layers = tables.by_layer(bitflip_table())
    assert sorted(layers["layer"]) == [0, 1, 2, 3] and set(layers["n"]) == {16}
    assert set(layers["catastrophic"]) == {4}  # every exponent_msb flip, in every layer
    assert tables.by_flip(noise_table()).is_empty()


def test_wilson_interval_known_values():
    assert tables.wilson_interval(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))
    assert tables.wilson_interval(5, 10) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))
    assert tables.wilson_interval(10, 10) == (pytest.approx(0.72247, abs=1e-5), 1.0)
    assert all(math.isnan(x) for x in tables.wilson_interval(0, 0))


def test_summary_intervals_match_the_function():
    for r in tables.by_flip(bitflip_table()).iter_rows(named=True):
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(tables.wilson_interval(r["catastrophic"], r["n"]))


def test_catastrophic_threshold_is_the_users():
    t = bitflip_table()
    assert tables.catastrophic_share(t)["catastrophic"].item() == 16
    strict = tables.catastrophic_share(t, threshold=20_000).row(0, named=True)
    assert (strict["catastrophic"], strict["nonfinite"]) == (2, 2)  # only the non-finite trials are left
    by_field = tables.catastrophic_share(t, by=["field"])
    assert by_field.row(0, named=True)["field"] == "exponent_msb"


def test_census_has_no_interval_and_failed_trials_are_counted_apart():
    ablation = tables.by_module(ablation_table())
    assert ablation["ci_low"].null_count() == len(ablation)  # one trial per component: nothing sampled
    noise = {r["module"]: r for r in tables.by_module(noise_table()).iter_rows(named=True)}
    assert (noise["attn.q"]["n"], noise["attn.q"]["failed"]) == (8, 1)
    assert noise["mlp.down"]["failed"] == 0


def test_by_sigma_and_where_noise_breaks():
    curves = tables.by_sigma(noise_table())
    assert curves["module"].to_list()[:4] == ["attn.q"] * 4  # model order, then sigma
    assert curves.filter(pl.col("module") == "attn.q")["sigma"].to_list() == [0.01, 0.1, 0.3, 1.0]
    breaks = {r["module"]: r["breaks_at"] for r in tables.threshold_sigma(noise_table()).iter_rows(named=True)}
    assert breaks == {"attn.q": None, "mlp.down": 0.3}


def test_nonfinite_trials_count_as_catastrophic_at_any_threshold():
    t = ablation_table()
    row = tables.rank_targets(t, threshold=1e9).row(0, named=True)
    assert row["target"] == "blocks.0.mlp.down" and row["mode"] == "zero" and row["catastrophic"] == 1
    assert row["median"] == INF


# --- the CLI's input errors: exit status 2, the file and the key named, no traceback ---


def test_missing_table_names_the_file(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/trials.parquet: not found" in err and "Traceback" not in err


def test_unfinished_run_points_to_resume(tmp_path, capsys):
    (tmp_path / "trials.jsonl").write_text("{}\n")
    assert main([str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_experiment_directory_points_to_its_latest_run(tmp_path, capsys):
    write_run(tmp_path, bitflip_table(), run_id="20260101-000000-aaaaaa")
    write_run(tmp_path, bitflip_table(), run_id="20260102-000000-bbbbbb")
    assert main([str(tmp_path / "bitflip")]) == 2
    err = capsys.readouterr().err
    assert "holds 2 runs, the latest is" in err and err.strip().endswith("20260102-000000-bbbbbb")


def test_missing_column_and_key_are_named(tmp_path, capsys):
    run = write_run(tmp_path, bitflip_table().drop("delta_ppl"))
    assert main([str(run)]) == 2
    assert "trials.parquet: missing column 'delta_ppl'" in capsys.readouterr().err
    run = write_run(tmp_path, bitflip_table(), run_id="20260101-000000-cccccc")
    baseline = json.loads((run / "baseline.json").read_text())
    del baseline["ppl"]
    (run / "baseline.json").write_text(json.dumps(baseline))
    assert main([str(run)]) == 2
    assert "baseline.json: missing key 'ppl'" in capsys.readouterr().err


def test_threshold_must_be_above_one(tmp_path, capsys):
    run = write_run(tmp_path, bitflip_table())
    assert main([str(run), "--threshold", "0.5"]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "python -m sensray.analyze results/" in capsys.readouterr().out


def test_no_write_prints_ranked_tables_and_writes_nothing(tmp_path, capsys):
    run = write_run(tmp_path, bitflip_table())
    assert main([str(run), "--no-write", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "16 of 64 trials" in out and "Most sensitive conditions (first 3 of 10 rows)" in out
    fields = out.split("\nBit fields: Per field asked for (first 3 of 4 rows)\n")[1].splitlines()
    assert fields[0].split()[:3] == ["flip", "n", "×"] and fields[2].split()[0] == "sign"  # IEEE order
    assert "Catastrophic faults by the field of the bit that flipped" in out  # the study's answer, first
    assert not (run / "analysis").exists()
