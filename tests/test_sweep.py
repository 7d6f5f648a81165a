"""The sweep CLI end to end on the shipped model: table, baseline, errors, dry runs, resume, secrets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from sensray.replica import Replica
from sensray.sweep import main

REPO = Path(__file__).resolve().parents[1]

SMALL = """\
name: small
data: {{seq_len: 32, num_sequences: 4, batch_size: 4}}
perturbation: bitflip
space:
  target: {{each: "blocks.0-1"}}
  field: {{grid_search: [exponent_msb, mantissa]}}
  count: 2
num_samples: 2
output_dir: {out}
"""


def run_cli(*args, env=None, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "sensray.sweep", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture
def small_spec(write_spec, tmp_path):
    return write_spec(SMALL.format(out=tmp_path / "results"))


def test_sweep_writes_the_trial_table(small_spec, tmp_path, capsys):
    assert main([str(small_spec), "--executor", "local"]) == 0
    out = capsys.readouterr()
    run = Path(out.out.strip().splitlines()[-1])  # the last line is the run directory
    assert run.parent == tmp_path / "results" / "small"
    table = pl.read_parquet(run / "trials.parquet")
    assert table.height == 8 and table["trial_id"].n_unique() == 8
    for column in ("trial_id", "kind", "target", "field", "count", "seed", "ppl", "nll", "delta_ppl", "kl",
                   "top1_agreement", "nonfinite", "seconds", "replica", "error"):
        assert column in table.columns
    assert table["error"].is_null().all()
    assert set(table["target"]) == {"blocks.0", "blocks.1"} and set(table["seed"]) == {0, 1}
    mantissa = table.filter(pl.col("field") == "mantissa")
    assert (mantissa["delta_ppl"] - 1).abs().max() < 0.05  # low bits barely matter...
    assert table.filter(pl.col("field") == "exponent_msb")["delta_ppl"].max() > 1.5  # ...the exponent MSB does
    baseline = json.loads((run / "baseline.json").read_text())
    assert baseline["checksum_at_load"] == baseline["checksum_after_sweep"]
    assert baseline["parameters"] > 1_000_000 and baseline["tokens"] == 4 * 31 and baseline["ppl"] < 100
    assert {"torch", "transformers", "python"} <= set(baseline["versions"])
    assert not (run / "trials.jsonl").exists()
    assert "trials/s" in out.err and "ETA" in out.err


def test_trial_ids_are_the_same_for_the_same_spec(small_spec, capsys):
    ids = []
    for _ in range(2):
        main([str(small_spec), "--executor", "local"])
        run = Path(capsys.readouterr().out.strip().splitlines()[-1])
        ids.append(pl.read_parquet(run / "trials.parquet")["trial_id"].to_list())
    assert ids[0] == ids[1]


def test_dry_run_counts_and_writes_nothing(small_spec, tmp_path):
    result = run_cli(small_spec, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "8 trials of bitflip" in result.stdout and "blocks.0, blocks.1" in result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "override, words",
    [
        ("space.target=blocks.12", "space.target: 'blocks.12': layer 12 is past the model's depth (8 blocks"),
        ("space.count=-1", "space.count:"),
        ("model.dtype=float64", "model.dtype: 'float64' is not allowed"),
        ("space.bit=40", "space: give exactly one of 'bit'"),  # bit and field together
        ("space.targett=x", "space.targett: unknown parameter for bitflip"),
        ("space.target=blocks.0.mlp.nothing", "matches no tensor"),
    ],
)
def test_invalid_specs_exit_2_with_the_key_and_no_traceback(small_spec, tmp_path, override, words):
    result = run_cli(small_spec, "--set", override)
    assert result.returncode == 2
    assert words in result.stderr and str(small_spec) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def test_bit_past_the_dtype_width_is_rejected(write_spec, tmp_path):
    spec = write_spec(SMALL.format(out=tmp_path / "r").replace("field: {grid_search: [exponent_msb, mantissa]}",
                                                               "bit: {grid_search: [3, 32]}"))
    result = run_cli(spec, "--dry-run")
    assert result.returncode == 2 and "space.bit: bit 32 is past the width" in result.stderr


def test_resume_runs_only_what_is_missing(small_spec, monkeypatch, capsys):
    calls = []
    original = Replica.run_trial

    def crash_after_three(self, trial):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(trial.trial_id)
        return original(self, trial)

    monkeypatch.setattr(Replica, "run_trial", crash_after_three)
    assert main([str(small_spec), "--executor", "local"]) == 130
    run = next((small_spec.parent / "results" / "small").iterdir())
    journal = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert [r["trial_id"] for r in journal] == calls  # every finished trial was durable
    assert not (run / "trials.parquet").exists()

    monkeypatch.setattr(Replica, "run_trial", lambda self, t: calls.append(t.trial_id) or original(self, t))
    capsys.readouterr()
    assert main([str(small_spec), "--executor", "local", "--resume", str(run)]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == run
    table = pl.read_parquet(run / "trials.parquet")
    assert table.height == 8 and table["trial_id"].n_unique() == 8
    assert len(calls) == 8  # 3 before the crash + 5 on resume: nothing ran twice
    first = table.filter(pl.col("trial_id") == journal[0]["trial_id"])["seconds"].item()
    assert first == journal[0]["seconds"]


def test_resume_refuses_a_different_spec(small_spec, tmp_path, capsys):
    main([str(small_spec), "--executor", "local"])
    run = capsys.readouterr().out.strip().splitlines()[-1]
    result = run_cli(small_spec, "--executor", "local", "--resume", run, "--set", "seed=5")
    assert result.returncode == 2 and "differs" in result.stderr and "seed" in result.stderr


def test_hf_token_from_dotenv_is_never_written(small_spec, tmp_path):
    secret = "hf_DoNotLeakThisToken1234567890"
    (tmp_path / ".env").write_text(f"HF_TOKEN={secret}\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "sensray.sweep", str(small_spec), "--executor", "local"], capture_output=True, text=True,
                            cwd=tmp_path, env=env | {"PYTHONPATH": str(REPO)}, timeout=600)
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    for path in (tmp_path / "results").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_list_commands():
    models = run_cli("--list-models")
    assert models.returncode == 0 and "llama-2-7b  " in models.stdout and "mistralai/Mistral-7B-v0.1" in models.stdout
    for alias in ("gpt-neo-125m", "gpt-j-6b", "opt-350m", "bloom-560m", "pythia-70m", "falcon-rw-1b", "sensray-tiny"):
        assert alias in models.stdout
    kinds = run_cli("--list-perturbations")
    assert kinds.returncode == 0 and all(k in kinds.stdout for k in ("ablation", "bitflip", "noise"))
