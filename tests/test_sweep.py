"""The sweep CLI end to end on the shipped model: table, baseline, errors, dry runs, resume, secrets.

Everything runs `main()` in this process (a tenth of a second instead of a Python start, ~5 s) except
one smoke test of `python -m sensray.sweep` itself."""

import json
import re
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


def run_main(capsys, *args) -> tuple[int, str, str]:
    """main(args) in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


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
        assert main([str(small_spec), "--executor", "local"]) == 0
        run = Path(capsys.readouterr().out.strip().splitlines()[-1])
        ids.append(pl.read_parquet(run / "trials.parquet")["trial_id"].to_list())
    assert ids[0] == ids[1] and len(set(ids[0])) == 8


def test_dry_run_counts_and_writes_nothing(small_spec, tmp_path, capsys):
    code, out, err = run_main(capsys, small_spec, "--dry-run")
    assert code == 0, err
    assert "8 trials of bitflip" in out and "blocks.0, blocks.1" in out
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
def test_invalid_specs_exit_2_with_the_key_and_no_traceback(small_spec, tmp_path, capsys, override, words):
    code, out, err = run_main(capsys, small_spec, "--set", override)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {small_spec}: ") and len(err.strip().splitlines()) == 1, err
    assert words in err
    assert not (tmp_path / "results").exists()


def test_the_command_line_exits_2_on_a_bad_spec_with_one_line(small_spec, tmp_path):
    """The one subprocess of this file: `python -m sensray.sweep` itself, exit status and stderr as a shell sees them."""
    result = subprocess.run([sys.executable, "-m", "sensray.sweep", str(small_spec), "--set", "space.target=blocks.12"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {small_spec}: space.target: 'blocks.12': layer 12 is past the model's depth")
    assert not (tmp_path / "results").exists()


def test_bit_past_the_dtype_width_is_rejected(write_spec, tmp_path, capsys):
    spec = write_spec(SMALL.format(out=tmp_path / "r").replace("field: {grid_search: [exponent_msb, mantissa]}",
                                                               "bit: {grid_search: [3, 32]}"))
    code, _, err = run_main(capsys, spec, "--dry-run")
    assert code == 2 and "space.bit: bit 32 is past the width" in err
    code, out, err = run_main(capsys, spec, "--dry-run", "--set", "model.dtype=bfloat16",
                              "--set", "space.bit={grid_search: [3, 15]}")
    assert code == 0 and "8 trials of bitflip" in out, err  # bfloat16 has bits 0-15...
    code, _, err = run_main(capsys, spec, "--dry-run", "--set", "model.dtype=bfloat16",
                            "--set", "space.bit={grid_search: [3, 16]}")
    assert code == 2 and "space.bit: bit 16 is past the width" in err  # ...and no 16th


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
    assert main([str(small_spec), "--executor", "local"]) == 0
    run = capsys.readouterr().out.strip().splitlines()[-1]
    code, _, err = run_main(capsys, small_spec, "--executor", "local", "--resume", run, "--set", "seed=5")
    assert code == 2 and "differs" in err and "seed" in err and len(err.strip().splitlines()) == 1


HUB_NAME = "sensray-test/tiny-llama"  # a Hub-style id, not a directory: the loaders are handed a token


@pytest.fixture
def hub_loaders(monkeypatch):
    """Loading HUB_NAME records the keyword arguments each transformers loader was given and reads the
    shipped model instead (no network); returns the list of (loader, kwargs)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sensray.models import BUNDLED_MODEL

    calls = []

    def spy(cls, name):
        real = getattr(cls, name)

        def load(source, *args, **kwargs):
            if source != HUB_NAME:
                return real(source, *args, **kwargs)
            calls.append((cls.__name__, kwargs))
            kwargs = {k: v for k, v in kwargs.items() if k != "token"} | {"local_files_only": True}
            return real(BUNDLED_MODEL, *args, **kwargs)

        monkeypatch.setattr(cls, name, load)

    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        spy(cls, "from_pretrained")
    return calls


def test_hf_token_from_dotenv_is_handed_to_the_hub_and_never_written(small_spec, tmp_path, monkeypatch, capsys,
                                                                     hub_loaders):
    secret = "hf_DoNotLeakThisToken1234567890"
    (tmp_path / ".env").write_text(f"HF_TOKEN={secret}\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # the .env is read from the working directory
    code, out, err = run_main(capsys, small_spec, "--executor", "local", "--set", f"model.name={HUB_NAME}")
    assert code == 0, err
    # The token was read and handed to every loader (config for the plan, model and tokenizer for the replica)...
    assert {loader for loader, _ in hub_loaders} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kwargs.get("token") == secret for _, kwargs in hub_loaders), hub_loaders
    # ...and appears nowhere the sweep writes or prints.
    assert secret not in out + err
    files = [path for path in (tmp_path / "results").rglob("*") if path.is_file()]
    assert {p.name for p in files} >= {"trials.parquet", "spec.yaml", "baseline.json"}
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    assert json.loads(next(p for p in files if p.name == "baseline.json").read_text())["source"] == HUB_NAME


def test_list_commands(capsys):
    code, models, _ = run_main(capsys, "--list-models")
    assert code == 0 and "llama-2-7b  " in models and "mistralai/Mistral-7B-v0.1" in models
    for alias in ("gpt-neo-125m", "gpt-j-6b", "opt-350m", "bloom-560m", "pythia-70m", "falcon-rw-1b", "sensray-tiny"):
        assert alias in models
    code, kinds, _ = run_main(capsys, "--list-perturbations")
    assert code == 0
    for kind in ("ablation", "bitflip", "noise", "prune", "zero"):
        assert re.search(rf"^{kind} +\S", kinds, re.M), kind
