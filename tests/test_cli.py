"""The `sensray` command: dispatch to every command under its own name, `run` by analysis name,
`list`, and the --output-dir / --model options, in-process on the shipped model."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sensray import presets
from sensray.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "sensray" / "assets" / "tiny-llama"
# A few trials on little text: enough to write a real run directory in seconds.
SMALL = ["--set", "data.seq_len=32", "--set", "data.num_sequences=2", "--set", "data.batch_size=2"]


def last_line(out: str) -> str:
    return out.strip().splitlines()[-1]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_runs_under_its_sensray_name(name, capsys):
    module = importlib.import_module(COMMANDS.get(name).module)
    own = module.build_parser
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: sensray {name} ")
    assert module.build_parser is own  # `python -m sensray.<module>` keeps its own name


def test_python_m_sensray_is_the_same_command(capsys):
    with pytest.raises(SystemExit):
        main(["list", "--help"], prog="python -m sensray")
    assert capsys.readouterr().out.startswith("usage: python -m sensray list ")


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: sensray ")
    for name, command in COMMANDS.items():
        assert f"  {name}  " in out and command.summary in out


def test_no_command_shows_the_commands_and_exits_2(capsys):
    assert main([]) == 2
    assert "superweights" in capsys.readouterr().err


def test_an_unknown_command_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as done:
        main(["swep", "x.yaml"])
    assert done.value.code == 2
    assert "unknown command 'swep'; did you mean 'sweep'?" in capsys.readouterr().err


def test_python_m_sensray_help_imports_no_command():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "sensray", "--help"], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m sensray ")
    # -X importtime: one line per module imported, "import time: self | cumulative | package.module"
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "sensray.cli" in imported
    heavy = {"torch", "ray", "polars", "pydantic", "transformers", "sensray.sweep", "sensray.analyze"}
    assert not heavy & imported


def test_the_console_script(tmp_path):
    """The installed `sensray` when it belongs to this interpreter; else exactly what pip's wrapper runs."""
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1]  # (no tomllib on Python 3.10)
    target = re.search(r'^sensray = "(.+)"$', scripts, re.M).group(1)
    assert target == "sensray.cli:main"
    installed = shutil.which("sensray")
    if installed and Path(installed).parent == Path(sys.executable).parent:
        command = [installed]
    else:  # the editable install predates the script (it is only created by reinstalling)
        module, func = target.split(":")
        command = [sys.executable, "-c", f"import sys; from {module} import {func}; sys.argv[0] = 'sensray'; "
                                         f"sys.exit({func}())"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([*command, "list", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: sensray list "), result.stderr


@pytest.mark.parametrize("analysis, preset, trials", [
    ("sensitivity", "ablation", "112 trials of ablation"),
    ("robustness", "noise", "105 trials of noise"),
    ("bit-level", "bitflip", "256 trials of bitflip"),
    ("pruning", "prune", "40 trials of prune"),
])
def test_run_is_the_preset_with_sweep_options(analysis, preset, trials, capsys):
    assert main(["run", analysis, "--model", str(TINY), "--dry-run", "--executor", "local"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{preset}: {trials} on {TINY} ")


def test_run_of_an_unknown_analysis_suggests_and_exits_2(capsys):
    assert main(["run", "sensitivty"]) == 2
    assert "did you mean 'sensitivity'?" in capsys.readouterr().err


def test_run_without_the_checkout_experiments_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(presets, "EXPERIMENTS", tmp_path / "experiments")
    assert main(["run", "sensitivity", "--dry-run"]) == 1
    assert f"no experiments/ directory at {tmp_path / 'experiments'}" in capsys.readouterr().err


def test_run_help_forwards_to_the_sweep_under_the_analysis_name(capsys):
    with pytest.raises(SystemExit):
        main(["run", "bit-level", "--help"])
    assert capsys.readouterr().out.startswith("usage: sensray run bit-level ")


def test_list_models_and_perturbations(capsys):
    assert main(["list", "models"]) == 0
    models = capsys.readouterr().out
    assert "gpt-neo-125m     EleutherAI/gpt-neo-125m" in models and "sensray-tiny" in models
    assert main(["list", "perturbations"]) == 0
    kinds = capsys.readouterr().out
    assert all(f"\n{kind} " in "\n" + kinds for kind in ("ablation", "bitflip", "noise", "prune", "zero"))


def test_list_analyses(capsys):
    assert main(["list", "analyses"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert list(lines) == list(presets.ANALYSES)
    assert "experiments/ablation.yaml" in lines["sensitivity"] and "experiments/prune.yaml" in lines["pruning"]
    assert "experiments/adversarial.yaml" in lines["adversarial"] and "experiments/evaluate.yaml" in lines["evaluate"]
    assert "experiments/integrated.yaml" in lines["integrated"] and "experiments/fine-tuning.yaml" in lines["fine-tuning"]
    assert len({line.index(presets.ANALYSES.get(name).summary) for name, line in lines.items()}) == 1  # one column


def test_list_experiments_shows_each_with_its_description(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["list", "experiments"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert list(lines) == [f"experiments/{p.name}" for p in sorted(REPO.glob("experiments/*.yaml"))]
    bitflip = yaml.safe_load((REPO / "experiments/bitflip.yaml").read_text())["description"]
    assert lines["experiments/bitflip.yaml"].endswith(f"  {bitflip}")


def test_an_experiment_without_a_description_is_described_by_its_opening_comment(write_spec):
    commented = write_spec("#\n# Skip each block.\n#\n#   sensray sweep x.yaml\nname: x\n")
    assert presets.description(commented) == "Skip each block."
    assert presets.description(write_spec("# a comment\ndescription: the key wins\n")) == "the key wins"
    assert presets.description(write_spec("name: [unclosed\n")) == ""


def test_sweep_output_dir_and_analyze_output_dir(write_spec, tmp_path, one_torch_thread, capsys):
    spec = write_spec(f"""\
        name: tiny
        perturbation: ablation
        space: {{target: {{each: "blocks.0-1"}}, mode: zero}}
        output_dir: {tmp_path / 'from-spec'}
    """)
    assert main(["sweep", str(spec), "--executor", "local", "--output-dir", str(tmp_path / "runs"), *SMALL]) == 0
    run = Path(last_line(capsys.readouterr().out))
    assert run.parent == tmp_path / "runs" / "tiny" and (run / "trials.parquet").is_file()
    assert yaml.safe_load((run / "spec.yaml").read_text())["output_dir"] == str(tmp_path / "runs")
    assert not (tmp_path / "from-spec").exists()

    assert main(["analyze", str(run), "--output-dir", str(tmp_path / "report"), "--top", "2"]) == 0
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "summary.json").is_file()
    assert not (run / "analysis").exists()


def test_run_writes_to_output_dir(tmp_path, one_torch_thread, capsys):
    assert main(["run", "sensitivity", "--executor", "local", "--output-dir", str(tmp_path), *SMALL,
                 "--set", "space.target={each: blocks.0.mlp.*}"]) == 0
    run = Path(last_line(capsys.readouterr().out))
    assert run.parent == tmp_path / "ablation"
    assert json.loads((run / "baseline.json").read_text())["model"]  # a finished run
    assert (run / "trials.parquet").is_file()


def test_prune_output_dir(tmp_path, one_torch_thread, capsys):
    out = tmp_path / "tiny-50"
    assert main(["prune", "--model", "sensray-tiny", "--sparsity", "0.5", "--output-dir", str(out)]) == 0
    assert Path(last_line(capsys.readouterr().out)) == out
    assert (out / "config.json").is_file() and (out / "sensray-prune.json").is_file()
    assert main(["prune", "--model", "sensray-tiny", "--sparsity", "0.5", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --output-dir: ")


def test_sweep_model_is_a_set_of_model_name(capsys):
    spec = REPO / "experiments" / "bitflip.yaml"
    assert main(["sweep", str(spec), "--set", "model.name=other", "--model", str(TINY), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"bitflip: 256 trials of bitflip on {TINY} ")
    assert main(["sweep", str(spec), "--model", "other", "--set", f"model.name={TINY}", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"bitflip: 256 trials of bitflip on {TINY} ")  # the last one wins
    # quoted, not parsed as YAML: a directory named 2024 stays a string (YAML would make it an int)
    assert main(["sweep", str(spec), "--output-dir", "2024", "--dry-run"]) == 0
    capsys.readouterr()
    missing = str(REPO / "no-such-model")
    assert main(["sweep", str(spec), "--model", missing, "--dry-run"]) != 0
    by_model = capsys.readouterr()
    assert main(["sweep", str(spec), "--set", f"model.name={missing}", "--dry-run"]) != 0
    assert capsys.readouterr() == by_model and "model.name" in by_model.err and missing in by_model.err
