"""Ctrl-C and SIGTERM end a sweep the same way on both executors: exit 130, one `interrupted:`
line naming the run directory to resume (or saying nothing was written), no traceback.

One real process per executor: `ray.init` installs its own SIGTERM handler (exit 15 with a stack
dump), which only shows in a process that started its own Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_support import build_tiny_model, spec_text, stop_session

from sensray.executors.local import LocalExecutor
from sensray.sweep import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("interrupt-model"))


def _wait_for_rows(results: Path, count: int, driver: subprocess.Popen, timeout: float = 180) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        journals = list(results.glob("*/trials.jsonl"))
        if journals and journals[0].read_text().count("\n") >= count:
            return journals[0].parent
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.05)
    raise AssertionError("the sweep wrote no rows in time")


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigterm_stops_the_sweep_and_names_the_run_to_resume(tiny, tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text(*tiny, tmp_path / "results", num_samples=100))  # 400 trials: still running at SIGTERM
    driver = subprocess.Popen([sys.executable, "-m", "sensray.sweep", str(spec), "--executor", executor], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sid = os.getsid(driver.pid)
    try:
        run = _wait_for_rows(tmp_path / "results" / "raysweep", 3, driver)
        os.kill(driver.pid, signal.SIGTERM)
        out, err = driver.communicate(timeout=120)
    finally:
        leftovers = stop_session(sid)
    assert driver.returncode == 130, err
    assert f"interrupted: finished trials are in {run / 'trials.jsonl'}; finish with --resume {run}" in err
    assert "Traceback" not in err and not (run / "trials.parquet").exists()
    assert not leftovers, f"processes outlived the driver: {leftovers}"


def test_an_interrupt_before_the_run_directory_exists_says_nothing_was_written(tiny, tmp_path, capsys, monkeypatch):
    def interrupted_while_loading(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalExecutor, "start", interrupted_while_loading)
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text(*tiny, tmp_path / "results"))
    assert main([str(spec), "--executor", "local"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: nothing was written (the sweep stopped before its run directory existed)" in err
    assert not (tmp_path / "results").exists()
