"""`sensray evaluate`: a model's ppl and lm-eval task scores as a run directory that analysis and comparison read.

In-process through `sensray.cli.main`; one task, 4 documents. A pruned export is the second model.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from sensray.cli import main

pytest.importorskip("lm_eval")

ACC = "sensray-pydoc-choice/acc"


def cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """The shipped model pruned to 50% by magnitude, exported."""
    path = tmp_path_factory.mktemp("export") / "tiny-mag50"
    assert main(["prune", "--model", "sensray-tiny", "--method", "magnitude", "--sparsity", "0.5",
                 "--output-dir", str(path)]) == 0
    return path


def evaluate(out: Path, *args) -> Path:
    before = set((out / "evaluate").iterdir()) if (out / "evaluate").is_dir() else set()
    assert main(["evaluate", *map(str, args), "--tasks", "sensray-pydoc-choice", "--limit", "4",
                 "--set", "data.num_sequences=4", "--output-dir", str(out)]) == 0
    (new,) = set((out / "evaluate").iterdir()) - before  # not the newest by name: two runs can share a second
    return new


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pruned):
    """(dense run, pruned run): the shipped model and its pruned export, each evaluated alone."""
    out = tmp_path_factory.mktemp("results")
    return evaluate(out, "--model", "sensray-tiny"), evaluate(out, "--model", pruned)


def test_an_evaluation_is_a_run_directory_of_one_unperturbed_trial(runs):
    dense = runs[0]
    table = pl.read_parquet(dense / "trials.parquet")
    baseline = json.loads((dense / "baseline.json").read_text())
    assert table.height == 1 and table["kind"].to_list() == ["none"] and table["target"].to_list() == ["model"]
    row = table.row(0, named=True)
    assert row["delta_ppl"] == 1.0 and row["kl"] == 0.0 and row["top1_agreement"] == 1.0
    assert row["ppl"] == baseline["ppl"] and row[ACC] == baseline["tasks"][ACC]
    assert row["sensray-pydoc-choice/n"] == 4 and row[f"{ACC}_stderr"] is not None
    assert baseline["checksum_after_sweep"] == baseline["checksum_at_load"]


def test_analyze_reads_it_and_the_comparison_puts_task_metrics_side_by_side(runs, capsys, tmp_path):
    dense, pruned = runs
    code, out, err = cli(capsys, "analyze", dense)
    assert code == 0, err
    assert "lm-eval tasks, unperturbed model" in out and (dense / "analysis" / "tasks.md").is_file()
    code, out, err = cli(capsys, "analyze", dense, pruned, "--output-dir", tmp_path / "cmp")
    assert code == 0, err
    assert "lm-eval tasks side by side" in out and "sensray-tiny" in out and "tiny-mag50" in out, out
    text = (tmp_path / "cmp" / "compare-tasks.md").read_text()
    assert ACC in text and "baseline" in text


@pytest.mark.parametrize("args, words", [
    (("--limit", "0"), ("--limit", "expected a whole number >= 1")),
    (("--tasks", "sensray-pydoc-choice,,x"), ("--tasks", "separated by commas")),
    # These three read lm-eval's index of its own ~15,000 task files: seconds, once per process.
    pytest.param(("--tasks", "sensray-pydoc-chioce"),
                 ("--tasks: unknown lm-eval task", "did you mean 'sensray-pydoc-choice'"), marks=pytest.mark.slow),
    pytest.param(("--tasks", "gsm8k"), ("--tasks: task 'gsm8k' is a generate_until task",), marks=pytest.mark.slow),
    pytest.param(("--tasks", "arc_easy"), ("--tasks: task 'arc_easy' needs the dataset 'allenai/ai2_arc/ARC-Easy'",
                                           "HF_HUB_OFFLINE"), marks=pytest.mark.slow),
])
def test_bad_input_fails_at_dry_run_in_one_line_writing_nothing(capsys, tmp_path, args, words):
    code, out, err = cli(capsys, "evaluate", *args, "--dry-run", "--output-dir", tmp_path / "results")
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    for word in words:
        assert word in line, line
    assert not (tmp_path / "results").exists()


def test_a_dry_run_and_sensray_run_evaluate(capsys):
    code, out, err = cli(capsys, "evaluate", "--dry-run")
    assert code == 0, err
    assert "1 trials of none on sensray-tiny" in out and "sensray-pydoc-choice" in out
    code, out, err = cli(capsys, "run", "evaluate", "--executor", "local", "--dry-run")
    assert code == 0, err
    assert "evaluate: 1 trials of none" in out and "sensray-data-ppl" in out


def test_list_tasks(capsys):
    code, out, _ = cli(capsys, "evaluate", "--list-tasks")
    assert code == 0 and out.split() == ["sensray-data-ppl", "sensray-pydoc-choice", "sensray-pydoc-ppl",
                                         "sensray-pydoc-swap"]


def test_against_a_reference_the_row_has_kl_top1_and_both_models_task_scores(pruned, tmp_path, capsys):
    run = evaluate(tmp_path, "--model", pruned, "--reference", "sensray-tiny")
    row = pl.read_parquet(run / "trials.parquet").row(0, named=True)
    baseline = json.loads((run / "baseline.json").read_text())
    assert row["kind"] == "checkpoint" and row["checkpoint"] == str(pruned) and baseline["model"] == "sensray-tiny"
    assert row["delta_ppl"] > 1 and row["kl"] > 0 and row["top1_agreement"] < 1
    assert row["elements_changed"] > 0 and all(t["sparsity"] >= 0.5 for t in row["tensors"])
    assert ACC in row and ACC in baseline["tasks"]
    assert baseline["checksum_after_sweep"] == baseline["checksum_at_load"]  # the reference is back, bit for bit
    assert "against sensray-tiny" in capsys.readouterr().err
    code, out, err = cli(capsys, "analyze", run)
    assert code == 0 and f"{ACC}: most damaged trials first (of 1 scored)" in out, err


def test_a_checkpoint_of_another_architecture_is_refused_at_dry_run(tiny, capsys, tmp_path):
    model_dir, _ = tiny  # a random tiny Llama of other shapes
    code, _, err = cli(capsys, "evaluate", "--model", model_dir, "--reference", "sensray-tiny", "--dry-run",
                       "--tasks", "sensray-pydoc-choice", "--output-dir", tmp_path / "results")
    assert code == 2 and "--model:" in err and "in the model" in err, err
