"""sensray saliency end to end on a tiny model: the map, --check against a real sweep, bad input, atomic output."""

from __future__ import annotations

import json

import polars as pl
import pytest
from ray_support import spec_text

from sensray.saliency.cli import main


def saliency(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines()[-1] if captured.out.strip() else "", captured.err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory):
    """A finished 12-trial bit-flip sweep of the tiny model (2 blocks x 2 fields x 3 seeds)."""
    from sensray.sweep import main as sweep

    out = tmp_path_factory.mktemp("sweeps")
    path = out / "spec.yaml"
    path.write_text(spec_text(*tiny, out), encoding="utf-8")
    assert sweep([str(path), "--executor", "local"]) == 0
    (run,) = (out / "raysweep").iterdir()
    return run


def test_the_map_of_a_model(tiny, tmp_path, capsys):
    model_dir, corpus = tiny
    code, out, err = saliency(capsys, "--model", model_dir, "--corpus", corpus, "--seq-len", 32, "--num-sequences", 4,
                              "--fisher-windows", 2, "--top-k", 3, "--output-dir", tmp_path)
    assert code == 0, err
    files = {p.name for p in (tmp_path / "saliency").iterdir()}
    assert len(files) == 1 and not any(name.startswith(".") for name in files)  # only the finished directory
    run = tmp_path / "saliency" / files.pop()
    tensors, rows = pl.read_parquet(run / "tensors.parquet"), pl.read_parquet(run / "rows.parquet")
    assert tensors["tensor"].to_list()[0] == "embed.weight" and tensors["tensor"].n_unique() == len(tensors)
    summed = rows.group_by("tensor").agg(pl.col("taylor").sum()).join(tensors.select("tensor", "taylor"), on="tensor")
    assert ((summed["taylor"] - summed["taylor_right"]).abs() < 1e-6 * summed["taylor_right"].abs() + 1e-12).all()
    flips = pl.read_parquet(run / "flips.parquet")
    assert set(flips["field"]) == {"sign", "exponent_msb", "exponent", "mantissa"}
    assert (flips.group_by("tensor", "field").len()["len"] <= 3).all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["fisher_windows"] == 2 and summary["memory"]["peak_bytes"] > 0
    report = (run / "report.md").read_text()
    assert "Where the gradient says damage lives" in report and (run / "heatmap.png").is_file()


def test_check_ranks_a_sweeps_trials(swept, tmp_path, capsys):
    code, out, err = saliency(capsys, "--check", swept, "--output-dir", tmp_path)
    assert code == 0, err
    run = tmp_path / "saliency" / out.rsplit("/", 1)[1]
    check, corr = pl.read_parquet(run / "check.parquet"), pl.read_parquet(run / "correlations.parquet")
    assert len(check) == 12 and check["predicted"].is_not_nan().all()
    trial = corr.filter(pl.col("granularity") == "trial").row(0, named=True)
    assert trial["n"] == 12 and -1 <= trial["rho_predicted"] <= 1
    assert {"trial, field exponent_msb", "trial, field mantissa", "block"} <= set(corr["granularity"])
    assert "Predicted against measured" in (run / "report.md").read_text() and (run / "check.png").is_file()


def test_spearman_ranks_with_ties_and_infinities():
    import numpy as np

    from sensray.saliency.check import spearman

    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, np.inf])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 1, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(0.9486832980505138)
    assert np.isnan(spearman(np.array([1.0, np.nan]), np.array([1.0, 2])))


@pytest.mark.parametrize("args, flag, words", [
    (["--top-k", "0"], "--top-k", "at least 1"),
    (["--fisher-windows", "-1"], "--fisher-windows", "at least 0"),
    (["--seq-len", "100000"], "--seq-len", "longer than the context"),
    (["--corpus", "nowhere.txt"], "--corpus", "no such file"),
    (["--num-sequences", "0"], "--num-sequences", "greater than or equal to 1"),
    (["--model", "no/such-model-here"], "--model", "cannot load"),
    (["--check", "nowhere"], "--check", "not a sensray run directory"),
    (["--dtype", "int8"], "", "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, flag, words, tmp_path, capsys):
    code, _, err = saliency(capsys, *args, "--output-dir", tmp_path, "--dry-run")
    line = one_error(err)
    assert code == 2 and (f"{flag}:" in line if flag else True) and words in line, line
    assert list(tmp_path.iterdir()) == []


def test_check_keeps_the_runs_model_and_text(swept, tmp_path, capsys):
    for args, flag in ((["--model", "sensray-tiny"], "--model"), (["--corpus", "bundled"], "--corpus"),
                       (["--dtype", "bfloat16"], "--dtype")):
        code, _, err = saliency(capsys, "--check", swept, *args, "--output-dir", tmp_path, "--dry-run")
        assert code == 2 and one_error(err).startswith(f"error: {flag}:"), err
    code, out, _ = saliency(capsys, "--check", swept, "--output-dir", tmp_path, "--dry-run")
    assert code == 0 and "check:" in out and list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_no_directory(tiny, tmp_path, capsys, monkeypatch):
    import sensray.saliency.figures as figures

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(figures, "save", broken)
    model_dir, corpus = tiny
    with pytest.raises(OSError):
        main(["--model", str(model_dir), "--corpus", str(corpus), "--seq-len", "32", "--num-sequences", "2",
              "--fisher-windows", "0", "--output-dir", str(tmp_path)])
    assert list((tmp_path / "saliency").iterdir()) == []
