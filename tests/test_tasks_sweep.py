"""lm-eval tasks inside a sweep (spec `eval:`): which trials score them, the top-k phase and its resume.

In-process, local executor, the shipped model and task, 4 documents per evaluation; one Ray run (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from sweep_support import one_error, sweep

from sensray.results import Journal, read_journal

pytest.importorskip("lm_eval")

ACC = "sensray-pydoc-choice/acc"
# 3 trials: zeroing block 0's down projection damages the shipped model most, block 7's least.
SPEC = """\
name: tasks
data: {{seq_len: 32, num_sequences: 2, batch_size: 2}}
perturbation: ablation
space:
  target: {{grid_search: [blocks.7.mlp.down, blocks.0.mlp.down, blocks.3.attn.q]}}
  mode: zero
eval: {{tasks: [sensray-pydoc-choice], limit: {limit}, {select}}}
output_dir: {out}
"""


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def write(tmp_path: Path, select: str, limit: int = 4) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(select=select, limit=limit, out=tmp_path / "results"), encoding="utf-8")
    return path


def run_sweep(capsys, *args) -> tuple[Path, pl.DataFrame, dict, str]:
    code, out, err = sweep(capsys, *args, "--executor", "local")
    assert code == 0, err
    run = Path(out.strip().splitlines()[-1])
    return run, pl.read_parquet(run / "trials.parquet"), json.loads((run / "baseline.json").read_text()), err


@pytest.fixture(scope="module")
def top_run(tmp_path_factory):
    """A finished sweep with `top_k: 1` (shared by the top-k and resume tests)."""
    tmp = tmp_path_factory.mktemp("top")
    from sensray.sweep import main

    assert main([str(write(tmp, "top_k: 1")), "--executor", "local"]) == 0
    run = next((tmp / "results" / "tasks").iterdir())
    return run, pl.read_parquet(run / "trials.parquet")


def test_on_all_every_trial_scores_the_tasks_and_the_baseline_has_them(tmp_path, capsys):
    run, table, baseline, err = run_sweep(capsys, write(tmp_path, "on: all"))
    assert table[ACC].null_count() == 0 and table["task_seconds"].min() > 0
    assert table["sensray-pydoc-choice/n"].to_list() == [4, 4, 4]
    assert set(baseline["tasks"]) >= {ACC, f"{ACC}_stderr", "sensray-pydoc-choice/n"}
    assert baseline["checksum_after_sweep"] == baseline["checksum_at_load"]  # tasks ran before each restore


def test_every_n_th_trial_of_the_plan(tmp_path, capsys):
    _, table, _, _ = run_sweep(capsys, write(tmp_path, "every: 2"))
    assert table[ACC].is_null().to_list() == [False, True, False]  # plan positions 0 and 2


def test_top_k_scores_the_most_damaging_trials_after_the_sweep(top_run):
    run, table = top_run
    worst = table.sort("delta_ppl", descending=True)["trial_id"][0]
    scored = table.filter(pl.col(ACC).is_not_null())
    assert scored["trial_id"].to_list() == [worst] and table.height == 3  # each trial once in the table
    assert scored["target"].to_list() == ["blocks.0.mlp.down"]


@pytest.mark.parametrize("phase_two_done", [False, True])
def test_top_k_resumes_where_it_stopped(top_run, tmp_path, capsys, phase_two_done):
    """A crash after the sweep (journal: every trial, none scored) reruns only the top-k; a crash after the
    top-k phase (the scored row is in the journal too) runs nothing more. The result is the same table."""
    run, table = top_run
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("spec.yaml", "baseline.json"):
        (crashed / name).write_bytes((run / name).read_bytes())
    task_columns = [c for c in table.columns if "/" in c or c == "task_seconds"]
    with Journal(crashed / "trials.jsonl") as journal:
        for row in table.iter_rows(named=True):
            journal.append({k: v for k, v in row.items() if k not in task_columns})  # phase one
        if phase_two_done:
            journal.append(table.filter(pl.col(ACC).is_not_null()).row(0, named=True))
    assert len(read_journal(crashed / "trials.jsonl")) == 3 + phase_two_done
    code, out, err = sweep(capsys, "--resume", crashed, "--executor", "local")
    assert code == 0, err
    assert f"({0 if phase_two_done else 1} to run)" in err
    resumed = pl.read_parquet(crashed / "trials.parquet")
    assert resumed[ACC].to_list() == table[ACC].to_list()  # deterministic: the same scores as the first run
    assert resumed["trial_id"].to_list() == table["trial_id"].to_list()


def test_eval_section_errors_are_spec_errors(tmp_path, capsys):
    cases = [("on: all", 0, "eval.limit: Input should be greater than or equal to 1"),
             ("on: all, top_k: 2", 4, "give one of on: all, every: N, top_k: N"),
             ("top_k: 0", 4, "eval.top_k"), ("on: some", 4, "eval.on: 'some' is not allowed")]
    for select, limit, words in cases:
        code, _, err = sweep(capsys, write(tmp_path, select, limit), "--dry-run")
        assert code == 2 and words in one_error(err), err
    assert not (tmp_path / "results").exists()


def test_a_dry_run_says_which_trials_score_which_tasks(tmp_path, capsys):
    code, out, _ = sweep(capsys, write(tmp_path, "top_k: 2"), "--dry-run")
    assert code == 0 and "lm-eval tasks: sensray-pydoc-choice on the top 2 trials by delta_ppl" in out
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_tasks_run_on_ray_replicas(local_ray, tmp_path, capsys):
    spec = write(tmp_path, "on: all").read_text().replace(
        "blocks.7.mlp.down, blocks.0.mlp.down, blocks.3.attn.q", "blocks.7.mlp.down, blocks.0.mlp.down")
    (tmp_path / "ray.yaml").write_text(spec + "resources: {replicas: 1}\n")
    code, out, err = sweep(capsys, tmp_path / "ray.yaml", "--executor", "ray")
    assert code == 0, err
    table = pl.read_parquet(Path(out.strip().splitlines()[-1]) / "trials.parquet")
    assert table[ACC].null_count() == 0 and set(table["replica"]) == {"ray-0@127.0.0.1"}


def test_every_needs_a_fixed_plan_and_on_survives_yaml():
    from sensray.errors import SpecError
    from sensray.spec import parse_spec

    base = "name: x\nperturbation: noise\nspace: {target: blocks.0, sigma: 0.1}\n"
    with pytest.raises(SpecError, match="eval.every needs a fixed plan"):
        parse_spec(base + "search: {num_trials: 4}\neval: {tasks: [t], every: 2}\n")
    spec = parse_spec(base + "eval:\n  tasks: [t]\n  on: all\n")  # YAML 1.1 reads the key `on` as true
    assert spec.eval.on == "all" and spec.eval.selection == ("all", None)
    assert parse_spec(base + "eval: {tasks: [t]}\n").eval.selection == ("all", None)  # the default
