"""The Ray executor on one machine: same answers as local, exactly-once rows through replica deaths,
failing trials, interrupted and killed drivers, the default command, loopback-only listeners.

Integration tests: they share one real local Ray (bound to 127.0.0.1; the `local_ray` fixture).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from ray_support import (assert_exactly_once, faulty_replica, is_loopback, listening_sockets, plan_of,
                         ray_descendants, run_executor, slow_replica, spec_text, stop_session)

from sensray.errors import RestoreError, SensrayError
from sensray.executors.ray import RayExecutor, replica_count
from sensray.results import Journal
from sensray.sweep import main

REPO = Path(__file__).resolve().parents[1]


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# -- unit: sizing the pool -------------------------------------------------------------------------


@pytest.mark.parametrize("cpus, gpus, replicas, free, expected", [
    (1, 0, "auto", {"CPU": 2.0}, 2),
    (0.5, 0, "auto", {"CPU": 2.0}, 4),
    (1, 1, "auto", {"CPU": 48.0, "GPU": 4.0}, 4),
    (1, 0.5, "auto", {"CPU": 8.0, "GPU": 1.0}, 2),
    (2, 2, "auto", {"CPU": 16.0, "GPU": 8.0}, 4),
    (1, 1, "auto", {"CPU": 8.0}, 1),  # no GPU yet (an autoscaler will add one): ask for one replica
    (1, 0, 3, {"CPU": 2.0}, 3),
])
def test_replica_count(cpus, gpus, replicas, free, expected):
    assert replica_count(cpus, gpus, replicas, free) == expected


def test_cli_options_belong_to_ray(tiny, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text(*tiny, tmp_path / "results"))
    assert main([str(spec), "--executor", "local", "--replicas", "2"]) == 1
    assert "--replicas: only for --executor ray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([str(spec), "--replicas", "0"])
    assert exit_.value.code == 2  # argparse's usage error
    assert "--replicas: expected a number >= 1 or 'auto', got '0'" in capsys.readouterr().err


# -- same answers ----------------------------------------------------------------------------------


def test_ray_and_local_give_the_same_trials_and_metrics(tiny, local_ray, tmp_path, capsys):
    """The local executor here runs torch on 2 threads, each Ray replica on 1: the metrics must not care."""
    import torch

    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text(*tiny, tmp_path / "results"))
    tables, baselines = {}, {}
    threads = torch.get_num_threads()
    for executor in ("local", "ray"):
        torch.set_num_threads(2 if executor == "local" else threads)
        try:
            assert main([str(spec), "--executor", executor]) == 0
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        run = Path(last_line(out.out))
        tables[executor] = pl.read_parquet(run / "trials.parquet")
        baselines[executor] = json.loads((run / "baseline.json").read_text())
    local, ray_ = tables["local"], tables["ray"]
    assert local["trial_id"].to_list() == ray_["trial_id"].to_list()  # same ids, same (plan) order
    assert local.height == 12 and ray_["error"].is_null().all()
    for metric in ("ppl", "nll", "delta_ppl", "top1_agreement", "nonfinite"):
        assert ray_[metric].to_list() == local[metric].to_list(), metric  # bit-identical
    assert ray_["kl"].to_list() == pytest.approx(local["kl"].to_list(), rel=1e-12, abs=0)
    assert ray_["changes"].to_list() == local["changes"].to_list()  # the same weights, bits and values
    assert set(ray_["replica"]) <= {"ray-0@127.0.0.1", "ray-1@127.0.0.1"}
    assert baselines["ray"]["checksum_at_load"] == baselines["local"]["checksum_at_load"]
    assert baselines["ray"]["checksum_after_sweep"] == baselines["ray"]["checksum_at_load"]
    assert baselines["ray"]["ppl"] == pytest.approx(baselines["local"]["ppl"], rel=1e-6)
    assert "replicas" in out.err and "ETA" in out.err and "failures 0" in out.err


def test_an_adaptive_search_runs_on_the_pool(tiny, local_ray, tmp_path, capsys):
    text = spec_text(*tiny, tmp_path / "results", num_samples=1).replace(
        "field: {grid_search: [exponent_msb, mantissa]}", "bit: {randint: [20, 32]}")
    spec = tmp_path / "s.yaml"
    spec.write_text(text + "search: {algorithm: worst-case, metric: kl, mode: max, num_trials: 30}\n")
    assert main([str(spec), "--executor", "ray"]) == 0
    out = capsys.readouterr()
    table = pl.read_parquet(Path(last_line(out.out)) / "trials.parquet")
    assert table.height == 30 and table["trial_id"].n_unique() == 30 and table["error"].is_null().all()
    assert sorted(table["sample"]) == list(range(30)) and all(r.startswith("ray-") for r in table["replica"])
    assert "30 trials (30 to run)" in out.err


def test_early_stopping_runs_on_the_pool(tiny, local_ray, tmp_path, capsys):
    text = spec_text(*tiny, tmp_path / "results", num_samples=4).replace("batch_size: 2", "batch_size: 1")
    spec = tmp_path / "s.yaml"
    spec.write_text(text + "early_stop: {top_k: 2, rungs: [0.5]}\n")
    assert main([str(spec), "--executor", "ray"]) == 0
    out = capsys.readouterr()
    table = pl.read_parquet(Path(last_line(out.out)) / "trials.parquet")
    assert table.height == 16 and table["error"].is_null().all()
    full = table.filter(pl.col("stopped_rung").is_null())
    stopped = table.filter(pl.col("stopped_rung").is_not_null())
    assert full.height >= 2 and (full["tokens"] == 2 * 31).all()
    assert stopped.height > 0 and (stopped["tokens"] == 31).all()  # trials did stop, at the rung, half way
    assert all(len(scores) == 1 for scores in table["rung_scores"])  # every trial reached the one rung
    # A trial stops only below the bound it was sent with: the lowest rung score of some two trials that
    # had run in full, which is at most the second highest rung score of all the trials run in full.
    bound = sorted(scores[0] for scores in full["rung_scores"])[-2]
    assert all(scores[0] < bound for scores in stopped["rung_scores"])
    assert "early stopping:" in out.err and "token evaluations" in out.err


# -- replicas that die, trials that fail -----------------------------------------------------------


def test_a_killed_replica_is_replaced_and_its_trials_rerun(tiny, local_ray, tmp_path):
    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=4))  # 16 trials
    killed = {}

    def kill_one_mid_trial(executor, rows):
        if len(rows) == 3 and not killed:
            victim = next(s for s in executor.slots if s.ready and s.inflight)
            _, running = local_ray.wait(list(victim.inflight), num_returns=len(victim.inflight), timeout=0)
            killed.update(replica=victim.replica_id, trials={executor.refs[r][1].trial_id for r in running})
            os.kill(victim.pid, signal.SIGKILL)  # it is sleeping inside run_trial: mid-trial

    rows, checksums, executor, logs = run_executor(plan, kill_one_mid_trial, replica_factory=slow_replica(0.2))
    assert_exactly_once(rows, plan)
    assert all(row["error"] is None for row in rows)
    rerun = [row for row in rows if row["trial_id"] in killed["trials"]]
    assert rerun and all(row["replica"] != killed["replica"] for row in rerun)
    assert executor.launched == 3 and any("died" in line and "requeued" in line for line in logs)
    assert set(checksums) == {executor.baseline["checksum_at_load"]}


@pytest.mark.slow  # three replicas start one after the other
def test_a_trial_that_kills_its_replica_every_time_becomes_an_error_row(tiny, local_ray, tmp_path):
    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=1))  # 4 trials
    poison = plan.trials[1].trial_id
    rows, _, executor, logs = run_executor(plan, replicas=1, max_attempts=2,
                                           replica_factory=faulty_replica(crash_on=poison))
    assert_exactly_once(rows, plan)
    [bad] = [row for row in rows if row["trial_id"] == poison]
    assert bad["error"].startswith("ReplicaDied: the replica died 2 times") and bad["ppl"] is None
    assert all(row["error"] is None for row in rows if row["trial_id"] != poison)
    assert executor.launched == 3  # the first, and one replacement per death


@pytest.mark.slow  # three replicas start one after the other
def test_a_reply_lost_with_its_replica_does_not_count_as_the_death(tiny, local_ray, tmp_path, monkeypatch):
    """The interleaving CI once hit: the first trial finished, but its reply died with the process that the
    poison trial killed at once, so the driver saw both fail. The poison trial was running, not the first;
    blaming the oldest unanswered one cost the poison trial one more death and replica (launched was 4)."""
    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=1))  # 4 trials
    first, poison = plan.trials[0].trial_id, plan.trials[1].trial_id
    rows, logs = [], []
    executor = RayExecutor(plan.spec, replicas=1, max_attempts=2, replica_factory=faulty_replica(crash_on=poison),
                           log=logs.append)
    real_wait = local_ray.wait

    def wait(refs, **options):  # the first replica's answer for `first` never reaches the driver
        def lost(ref):
            slot, trial = executor.refs[ref]
            return slot.index == 0 and trial is not None and trial.trial_id == first
        return real_wait([ref for ref in refs if not lost(ref)], **options)

    monkeypatch.setattr(local_ray, "wait", wait)
    try:
        executor.start()
        executor.run(plan.trials, rows.append)
    finally:
        executor.close()
    assert_exactly_once(rows, plan)
    assert [row["trial_id"] for row in rows if row["error"]] == [poison]
    assert executor.launched == 3  # the first, and one replacement per death of the poison trial
    assert any(f"died running trial {poison}" in line and "2 trial(s) requeued" in line for line in logs)


def test_a_trial_out_of_memory_is_a_row_and_the_sweep_goes_on(tiny, local_ray, tmp_path):
    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=1))
    oom = plan.trials[2].trial_id
    rows, _, executor, _ = run_executor(plan, replicas=1, replica_factory=faulty_replica(oom_on=oom))
    assert_exactly_once(rows, plan)
    [bad] = [row for row in rows if row["trial_id"] == oom]
    assert bad["error"].startswith("RuntimeError: CUDA out of memory") and bad["ppl"] is None
    assert sum(row["error"] is None for row in rows) == 3 and executor.launched == 1


def test_a_restore_that_fails_stops_the_sweep_with_its_error(tiny, local_ray, tmp_path):
    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=1))
    with pytest.raises(RestoreError, match="simulated"):
        run_executor(plan, replicas=1, replica_factory=faulty_replica(restore_fails=True))


def test_a_replica_that_cannot_load_stops_the_sweep_with_its_error(tiny, local_ray, tmp_path):
    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=1))
    with pytest.raises(SensrayError, match="cannot load 'nowhere'"):
        run_executor(plan, replicas=1, replica_factory=faulty_replica(load_fails=True))


def test_impossible_resources_fail_before_anything_runs(tiny, local_ray, tmp_path):
    plan = plan_of(spec_text(*tiny, tmp_path, extra="").replace("cpus: 1,", "gpus: 1, cpus: 1,"))
    with pytest.raises(SensrayError, match="needs 1 CPU and 1 GPU"):
        run_executor(plan)


# -- interrupted and killed drivers, the default command -------------------------------------------


def test_a_terminated_sweep_resumes_with_every_trial_once(tiny, local_ray, tmp_path, monkeypatch, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text(*tiny, tmp_path / "results", num_samples=4))  # 16 trials
    written, append = [], Journal.append

    def terminate_after_four(self, row):
        written.append(row)
        append(self, row)
        if len(written) == 4:  # `kill` (SIGTERM) the driver while other trials are in flight
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Journal, "append", terminate_after_four)
    # One replica (two trials in flight) is enough to be interrupted mid-flight, and starts in half the time.
    assert main([str(spec), "--executor", "ray", "--replicas", "1"]) == 130  # like Ctrl-C: replicas stopped
    monkeypatch.undo()
    run = next((tmp_path / "results" / "raysweep").iterdir())
    journal = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert journal == written and not (run / "trials.parquet").exists()
    capsys.readouterr()

    assert main([str(spec), "--resume", str(run), "--executor", "ray", "--replicas", "1"]) == 0
    out = capsys.readouterr()
    assert "16 trials (12 to run)" in out.err and Path(last_line(out.out)) == run
    table = pl.read_parquet(run / "trials.parquet")
    assert table.height == 16 and table["trial_id"].n_unique() == 16
    before = {row["trial_id"]: row["seconds"] for row in journal}
    kept = table.filter(pl.col("trial_id").is_in(list(before)))
    assert dict(zip(kept["trial_id"], kept["seconds"])) == before  # not run again


def _sweep_process(*args, cwd=REPO):
    return subprocess.Popen([sys.executable, "-m", "sensray.sweep", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow  # two real commands, each starting its own Ray and replicas
def test_the_default_command_killed_loses_only_trials_in_flight_and_resume_finishes(tiny, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text(*tiny, tmp_path / "results", num_samples=25))  # 100 trials
    driver = _sweep_process(spec)  # no --executor: Ray is the default
    sid = os.getsid(driver.pid)
    try:
        journal = _wait_for_rows(tmp_path / "results" / "raysweep", 10, driver)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        stop_session(sid, grace=5)  # Ray's own processes follow the driver; its agents may linger
    rows = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
    assert 10 <= len(rows) < 100 and not (journal.parent / "trials.parquet").exists()
    assert all(row["replica"].startswith("ray-") for row in rows)

    resume = _sweep_process("--resume", journal.parent)
    sid = os.getsid(resume.pid)
    out, err = resume.communicate(timeout=300)
    leftovers = stop_session(sid)
    assert resume.returncode == 0, err
    assert f"100 trials ({100 - len(rows)} to run)" in err and Path(last_line(out)) == journal.parent
    table = pl.read_parquet(journal.parent / "trials.parquet")
    assert table.height == 100 and table["trial_id"].n_unique() == 100 and table["error"].is_null().all()
    kept = table.filter(pl.col("trial_id").is_in([r["trial_id"] for r in rows]))
    assert sorted(kept["seconds"]) == sorted(r["seconds"] for r in rows)  # finished trials did not run again
    assert "[100/100]" in err and "trials/s" in err and "failures 0" in err and re.search(r"replicas [12] ", err)
    assert "Traceback" not in err and "Loading weights" not in err
    assert not leftovers, f"Ray processes outlived the driver: {leftovers}"


def _wait_for_rows(results: Path, count: int, driver, timeout: float = 180) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        journals = list(results.glob("*/trials.jsonl"))
        if journals and journals[0].read_text().count("\n") >= count:
            return journals[0]
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.02)
    raise AssertionError("the sweep wrote no rows in time")


# -- loopback --------------------------------------------------------------------------------------


def test_every_ray_listener_is_on_loopback(tiny, local_ray, tmp_path):
    """The module's Ray was started by the executor's own connect(); check it with two replicas up."""
    from sensray.executors.ray import RayExecutor

    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=1))
    executor = RayExecutor(plan.spec, log=lambda line: None)
    try:
        executor.start()
        executor.run(plan.trials, lambda row: None)
        procs = ray_descendants()
        names = {p.name() for p in procs}
        assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::ReplicaActor") for n in names), names
        sockets = listening_sockets(procs)
        assert sockets, "found no listening sockets at all"
        outside = [s for s in sockets if not is_loopback(s[2])]
        assert not outside, f"Ray listens beyond loopback: {outside}"
        assert {node["NodeManagerAddress"] for node in local_ray.nodes()} == {"127.0.0.1"}
    finally:
        executor.close()
