"""--resume at its edges (issue 17, point 3): a journal cut by a crash, a corrupt journal or
spec.yaml, a run that already finished, the early-stopping board rebuilt from the journal,
--resume --dry-run, and --set on a resumed run. In-process, local executor, shipped model.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import polars as pl
import pytest
from sweep_support import SMALL, one_error, sweep

from sensray.replica import Replica
from sensray.results import Journal, read_journal

@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SMALL.format(out=tmp_path / "results"), encoding="utf-8")
    return path


def spy(monkeypatch, stop_after: int | None = None) -> list:
    """Record every trial a replica runs (id, bounds); with stop_after, Ctrl-C after that many."""
    ran, original = [], Replica.run_trial

    def run_trial(self, trial):
        if stop_after is not None and len(ran) == stop_after:
            raise KeyboardInterrupt
        ran.append((trial.trial_id, trial.bounds))
        return original(self, trial)

    monkeypatch.setattr(Replica, "run_trial", run_trial)
    return ran


def interrupted(spec: Path, capsys, monkeypatch, after: int = 3) -> Path:
    """A run stopped (as by Ctrl-C) after `after` trials: a journal and no table."""
    spy(monkeypatch, stop_after=after)
    code, _, err = sweep(capsys, spec, "--executor", "local")
    monkeypatch.undo()
    run = next((spec.parent / "results" / "small").iterdir())
    assert code == 130 and f"finish with --resume {run}" in err  # the message names the run directory
    assert not (run / "trials.parquet").exists() and len(read_journal(run / "trials.jsonl")) == after
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


def test_a_journal_whose_last_line_was_cut_resumes_and_reruns_that_trial(spec, capsys, monkeypatch):
    run = interrupted(spec, capsys, monkeypatch)
    journal = run / "trials.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # the crash cut row 3 mid-write
    cut = json.loads(lines[2])["trial_id"]
    ran = spy(monkeypatch)
    code, out, err = sweep(capsys, spec, "--executor", "local", "--resume", run)
    assert code == 0, err
    assert "its last line was cut short" in err and "8 trials (6 to run)" in err
    assert len(ran) == 6 and cut in [tid for tid, _ in ran]  # the cut trial ran again, the other two did not
    table = pl.read_parquet(run / "trials.parquet")
    assert table.height == 8 and table["trial_id"].n_unique() == 8 and table["error"].is_null().all()
    assert out.strip().splitlines()[-1] == str(run)


@pytest.mark.parametrize("bad, words", [
    (b"{not json\n", "trials.jsonl:2: corrupt journal line (JSONDecodeError"),
    (b'{"ppl": 3.0}\n', "trials.jsonl:2: a journal line that is not a trial row (no trial_id)"),
    (b"[1, 2]\n", "trials.jsonl:2: a journal line that is not a trial row"),
    (b'{"trial_id": "\xff"}\n', "trials.jsonl:2: corrupt journal line (UnicodeDecodeError"),
])
def test_a_corrupt_line_in_the_middle_is_an_error_naming_file_and_line(spec, capsys, monkeypatch, bad, words):
    run = interrupted(spec, capsys, monkeypatch)
    journal = run / "trials.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + bad + lines[2])
    before = snapshot(run)
    ran = spy(monkeypatch)
    for args in (["--dry-run"], ["--executor", "local"]):
        code, _, err = sweep(capsys, spec, "--resume", run, *args)
        assert code == 1 and f"{journal}:2: " in one_error(err) and words in one_error(err)
    assert ran == [] and snapshot(run) == before


def test_resuming_a_finished_run_runs_nothing_and_changes_nothing(spec, capsys, monkeypatch):
    code, out, _ = sweep(capsys, spec, "--executor", "local")
    run = Path(out.strip().splitlines()[-1])
    before = snapshot(run)
    monkeypatch.setattr(Replica, "__init__", lambda *a, **k: pytest.fail("a finished run loaded a replica"))
    for args in ([], ["--dry-run"]):
        code, out, err = sweep(capsys, spec, "--executor", "local", "--resume", run, *args)
        assert code == 0 and out.strip().splitlines()[-1] == str(run)
        assert f"resume: {run} is finished (8 trials in its trials.parquet); nothing to run" in err
    assert snapshot(run) == before


def test_resume_dry_run_counts_what_is_left_and_writes_nothing(spec, capsys, monkeypatch):
    run = interrupted(spec, capsys, monkeypatch, after=5)
    journal = run / "trials.jsonl"
    journal.write_bytes(journal.read_bytes()[:-10])  # and a cut last line, which a real resume would drop
    before = snapshot(run)
    code, out, err = sweep(capsys, "--resume", run, "--dry-run")
    assert code == 0, err
    assert "8 trials of bitflip" in out and "resume: 4 done, 4 to run" in out
    assert snapshot(run) == before


@pytest.mark.parametrize("text, words", [
    (b"name: [unclosed\n", "not valid YAML: line 2"),
    (b"name: small\nname: again\n", "line 2: duplicate key 'name'"),
    (b"name: caf\xe9\n", "not UTF-8 text: byte 0xe9 on line 1"),
    (b"- a list\n", "must be a mapping"),
    (b"name: small\nperturbation: bitflip\nspace: {}\nnum_samples: '2'\n",
     "num_samples: Input should be a valid integer"),
])
def test_a_corrupt_spec_yaml_on_resume_names_the_file(spec, capsys, monkeypatch, text, words):
    run = interrupted(spec, capsys, monkeypatch)
    (run / "spec.yaml").write_bytes(text)
    code, _, err = sweep(capsys, "--resume", run, "--executor", "local")
    assert code == 2 and f"{run / 'spec.yaml'}: " in one_error(err) and words in one_error(err)


def test_resume_applies_set_and_refuses_any_change_but_resources(spec, capsys, monkeypatch):
    import sensray.executors

    run = interrupted(spec, capsys, monkeypatch)
    for change in ("seed=5", "space.count=3", "data.seq_len=16"):
        code, _, err = sweep(capsys, "--resume", run, "--set", change, "--executor", "local")
        key = change.split(".")[0].split("=")[0]
        assert code == 2 and f"--set differs from {run / 'spec.yaml'} in {key}" in one_error(err)
    specs, real = [], sensray.executors.executor_for
    monkeypatch.setattr(sensray.executors, "executor_for", lambda name, s, **o: specs.append(s) or real(name, s, **o))
    code, _, err = sweep(capsys, "--resume", run, "--set", "resources.cpus=2", "--executor", "local")
    assert code == 0, err
    assert specs[0].resources.cpus == 2  # the override is used, not silently dropped
    assert pl.read_parquet(run / "trials.parquet").height == 8


def test_the_early_stopping_board_is_rebuilt_from_the_journal(tmp_path, capsys, monkeypatch):
    """Resumed trials are dispatched with exactly the bounds they would have had uninterrupted."""
    text = (SMALL.format(out=tmp_path / "results").replace("batch_size: 2", "batch_size: 1")
            + "early_stop: {top_k: 2, rungs: [0.5]}\n")
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    ran = spy(monkeypatch)
    assert sweep(capsys, path, "--executor", "local")[0] == 0
    uninterrupted = dict(ran)
    monkeypatch.undo()
    for run in (tmp_path / "results" / "small").iterdir():
        run.rename(tmp_path / "finished")

    run = interrupted(path, capsys, monkeypatch, after=4)
    ran = spy(monkeypatch)
    assert sweep(capsys, path, "--executor", "local", "--resume", run)[0] == 0
    resumed = dict(ran)
    assert len(resumed) == 4 and any(b != (None,) and b is not None for b in resumed.values())  # bounds were set
    assert resumed == {tid: uninterrupted[tid] for tid in resumed}


def test_the_journal_drops_only_a_cut_last_line(tmp_path):
    path = tmp_path / "trials.jsonl"
    path.write_bytes(b'{"trial_id": "a"}\n{"trial_id": "b"}\n{"trial_id": "c", "pp')
    assert [row["trial_id"] for row in read_journal(path)] == ["a", "b"]
    with Journal(path) as journal:
        assert journal.dropped == len(b'{"trial_id": "c", "pp')
        journal.append({"trial_id": "c"})
    assert [row["trial_id"] for row in read_journal(path)] == ["a", "b", "c"]
    path.write_bytes(b'{"trial_id": "only", "cut')  # a single line, cut: nothing survives, nothing is an error
    assert read_journal(path) == []
    with Journal(path) as journal:
        assert journal.dropped == len(b'{"trial_id": "only", "cut') and path.read_bytes() == b""
