"""sensray study: a small study on the shipped model runs every stage kind end to end, resumes skipping what is
done, runs again what an edit changed (and everything after it), continues an interrupted stage, runs one
stage alone, and refuses at --dry-run a stage that reads what no earlier stage makes."""

from __future__ import annotations

import json
import shutil
import textwrap

import polars as pl
import pytest

from sensray.study.cli import main

# Magnitude pruning (no calibration), 2 windows of 32 tokens everywhere: the whole study takes seconds.
STUDY = """\
name: small-study
model: {{name: sensray-tiny}}
eval: {{corpus: bundled, seq_len: 32, num_sequences: 2, batch_size: 2}}
output_dir: {out}
executor: {executor}
stages:
  - name: sensitivity
    kind: sweep
    experiment:
      name: layers
      data: {{corpus: bundled-train, seq_len: 32, num_sequences: 2, batch_size: 2}}
      perturbation: prune
      space: {{target: {{each: "blocks.*"}}, method: magnitude, sparsity: 0.8}}
  - {{name: allocation, kind: allocate, sweep: sensitivity, sparsity: 0.5}}
  - {{name: pruned-allocated, kind: prune, method: sensitivity, allocation: allocation}}
  - {{name: pruned-uniform, kind: prune, method: magnitude, sparsity: 0.5}}
  - name: healed
    kind: heal
    model: pruned-uniform
    method: lora
    steps: 2
    lr: 0.001
    train: {{corpus: bundled-train, seq_len: 32, batch_size: 2}}
  - {{name: evaluation, kind: evaluate, models: [dense, pruned-allocated, pruned-uniform, healed]}}
  - {{name: report, kind: report, evaluation: evaluation}}
"""
STAGES = ["sensitivity", "allocation", "pruned-allocated", "pruned-uniform", "healed", "evaluation", "report"]


def write(path, text=STUDY, executor="local", **fields):
    path.write_text(textwrap.dedent(text).format(out=path.parent / "results", executor=executor, **fields))
    return path


def study(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def journal(root):
    return [json.loads(line)["record"] for line in (root / "journal.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The small study, run once: (spec file, study directory)."""
    directory = tmp_path_factory.mktemp("study")
    spec = write(directory / "study.yaml")
    code = main([str(spec)])
    assert code == 0
    return spec, next((directory / "results" / "small-study").iterdir())


def copy_of(finished, tmp_path):
    spec, root = finished
    return spec, shutil.copytree(root, tmp_path / root.name)


def test_every_stage_ran_once_and_the_journal_lists_it_with_its_input_hash(finished):
    _, root = finished
    lines = journal(root)
    assert [line["stage"] for line in lines] == STAGES
    assert all(len(line["input_hash"]) == 16 and line["seconds"] > 0 for line in lines)
    assert len({line["input_hash"] for line in lines}) == len(STAGES)
    for line in lines:
        assert (root / line["output"]).exists() and (root / line["stage"] / "stage.json").is_file()
    assert journal(root)[4]["command"].startswith("sensray heal --model ")


def test_the_allocation_is_what_the_pruned_export_was_given_and_healing_kept_its_zeros(finished):
    _, root = finished
    allocation = json.loads((root / "allocation" / "allocation.json").read_text())
    pruned = json.loads((root / "pruned-allocated" / "model" / "sensray-prune.json").read_text())
    given = {name: entry["allotted"] for name, entry in pruned["achieved"]["tensors"].items()}
    assert given == {name: entry["sparsity"] for name, entry in allocation["tensors"].items()}
    assert len(set(given.values())) > 1 and allocation["overall"] == pytest.approx(0.5, abs=1e-9)
    healed = json.loads((root / "healed" / "model" / "sensray-heal.json").read_text())
    uniform = json.loads((root / "pruned-uniform" / "model" / "sensray-prune.json").read_text())
    assert {n: t["zeros"] for n, t in healed["achieved"]["tensors"].items()} == \
        {n: t["zeros"] for n, t in uniform["achieved"]["tensors"].items()}


def test_the_evaluation_is_a_run_directory_with_one_row_per_model(finished):
    _, root = finished
    rows = pl.read_parquet(root / "evaluation" / "trials.parquet")
    assert rows["target"].to_list() == ["dense", "pruned-allocated", "pruned-uniform", "healed"]
    dense = rows.row(0, named=True)
    assert dense["kl"] == 0 and dense["top1_agreement"] == 1 and dense["delta_ppl"] == 1 and dense["sparsity"] == 0
    assert all(0.49 < s < 0.51 for s in rows["sparsity"][1:]) and rows["error"].null_count() == 4
    baseline = json.loads((root / "evaluation" / "baseline.json").read_text())
    assert baseline["ppl"] == dense["ppl"] and baseline["tokens"] == 62
    healed = json.loads((root / "healed" / "model" / "sensray-heal.json").read_text())
    # One protocol, the same number (the evaluation's NLL goes through the KL identity: rounding differs at 1e-9).
    assert rows.row(3, named=True)["ppl"] == pytest.approx(healed["eval"]["ppl_after"], rel=1e-8)


def test_the_report_compares_every_model_with_figures(finished):
    _, root = finished
    report = (root / "report" / "report.md").read_text()
    for needle in ("## Reading", "## Models", "## Healing", "## Stages", "ppl-by-stage.png", "healing.png",
                   "allocation.png", "| healed | pruned-uniform | lora |", "sensray prune --model sensray-tiny"):
        assert needle in report, needle
    assert all((root / "report" / f).stat().st_size > 1000 for f in ("ppl-by-stage.png", "healing.png",
                                                                       "report.html"))
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert summary["models"]["healed"]["arm"] == "pruned-uniform" and summary["models"]["healed"]["healing"] == "lora"
    assert [s["stage"] for s in summary["stages"]] == STAGES[:-1]


def test_resume_skips_every_stage_that_is_done(finished, tmp_path, capsys):
    spec, root = copy_of(finished, tmp_path)
    before = (root / "journal.jsonl").read_text()
    code, out, err = study(capsys, spec, "--resume", root)
    assert code == 0 and out.strip().splitlines()[-1] == str(root)
    assert err.count("done, inputs unchanged: skipped") == len(STAGES)
    assert (root / "journal.jsonl").read_text() == before


def test_resume_alone_reads_the_study_yaml_saved_in_the_directory(finished, tmp_path, capsys):
    _, root = copy_of(finished, tmp_path)
    code, out, _ = study(capsys, "--resume", root, "--dry-run")
    assert code == 0 and out.count(" done ") == len(STAGES) and f"study directory: {root} (7 done)" in out


def test_an_edited_stage_runs_again_with_everything_after_it(finished, tmp_path, capsys):
    spec, root = copy_of(finished, tmp_path)
    code, _, err = study(capsys, spec, "--resume", root, "--set", "healed.steps=3")
    assert code == 0, err
    again = [line.split("] ")[1].split(" ")[0] for line in err.splitlines() if "inputs changed: running again" in line]
    assert again == ["healed", "evaluation", "report"]
    assert err.count("skipped") == 4
    assert json.loads((root / "healed" / "model" / "sensray-heal.json").read_text())["steps"] == 3
    assert [line["stage"] for line in journal(root)] == STAGES + ["healed", "evaluation", "report"]


def test_an_interrupted_stage_continues_where_it_stopped(finished, tmp_path, capsys, monkeypatch):
    from sensray.heal import data

    spec, root = copy_of(finished, tmp_path)
    real = data.batch_rows

    def crash_at_step_3(windows, batch_size, seed, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(windows, batch_size, seed, step)

    monkeypatch.setattr(data, "batch_rows", crash_at_step_3)
    code, _, err = study(capsys, spec, "--resume", root, "--set", "healed.steps=5")
    assert code == 130 and f"--resume {root}" in err
    monkeypatch.setattr(data, "batch_rows", real)
    code, _, err = study(capsys, spec, "--resume", root, "--set", "healed.steps=5")
    assert code == 0, err
    assert "healed (heal): interrupted before: continuing it" in err and "at step 3 of 5" in err


def test_one_stage_alone(finished, tmp_path, capsys):
    spec, root = copy_of(finished, tmp_path)
    shutil.rmtree(root / "report")
    code, _, err = study(capsys, spec, "--resume", root, "--stage", "report", "--set", "report.title=Again")
    assert code == 0, err
    assert "report (report): inputs changed: running again" in err and "skipped" not in err
    assert (root / "report" / "report.md").read_text().startswith("# Again")
    code, _, err = study(capsys, spec, "--resume", root, "--stage", "report", "--set", "healed.steps=9")
    assert code == 2 and "reads healed" in err and "not done with the current inputs" in err


@pytest.mark.parametrize("edit, path, words", [
    (("model: pruned-uniform", "model: allocation"), "stages[4].model", "makes an allocation, not a model"),
    (("model: pruned-uniform", "model: evaluation"), "stages[4].model", "it comes later"),
    (("model: pruned-uniform", "model: pruned-unifrm"), "stages[4].model", "did you mean 'pruned-uniform'?"),
    (("models: [dense, pruned-allocated", "models: [dense, report"), "stages[5].models[1]", "it comes later"),
    (("sweep: sensitivity", "sweep: allocation"), "stages[1].sweep", "not an earlier stage"),
    (("kind: evaluate", "kind: evaluat"), "stages[5].kind", "did you mean 'evaluate'?"),
    (("name: pruned-uniform", "name: pruned-allocated"), "stages[3].name", "already the name of stages[2]"),
    (("name: healed", "name: dense"), "stages[4].name", "the study's own model"),
    (("allocation: allocation}", "}"), "stages[2]", "allocation"),
    (("steps: 2", "steps: 0"), "stages[4].steps", "would train nothing"),
    (("corpus: bundled-train, seq_len: 32, batch_size: 2", "corpus: bundled, seq_len: 32, batch_size: 2"),
     "stages[4].train.corpus", "also the eval text"),
    (("data: {{corpus: bundled-train", "data: {{corpus: bundled"), "stages[1].sweep", "measures sensitivity on the eval"),
    (("method: magnitude, sparsity: 0.8", "method: magnitude, sparsity: 1.8"), "stages[0].experiment.space",
     "less than or equal to 1"),
])
def test_a_study_that_could_not_run_fails_at_dry_run_naming_the_key(tmp_path, capsys, edit, path, words):
    spec = write(tmp_path / "bad.yaml", STUDY.replace(*edit))
    code, out, err = study(capsys, spec, "--dry-run")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {spec}: {path}") and words in lines[0], lines[0]
    assert not (tmp_path / "results").exists()


def test_the_shipped_studies_pass_their_dry_run_and_write_nothing(tmp_path, capsys, monkeypatch):
    from sensray.cli import main as sensray

    monkeypatch.chdir(tmp_path)
    for name, stages in (("integrated", 11), ("fine-tuning", 5)):
        assert sensray(["run", name, "--dry-run", "--output-dir", str(tmp_path / "out")]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{name}: {stages} stages on sensray-tiny [float32]") and f"({stages} to run)" in out
    assert list(tmp_path.iterdir()) == []


def test_the_7b_study_plans_against_llama_2_7b_structure_offline(monkeypatch, capsys):
    """Its config is on the Hub: the same structure is built offline, and every stage checks against it."""
    from test_cluster_yaml import REPO, SEVEN_B

    from sensray import models
    from sensray.testing import tiny_config

    shape = dict(SEVEN_B["llama-2-7b"])
    config = tiny_config(shape.pop("family"), **shape, max_position_embeddings=4096)
    real = models.load_config
    monkeypatch.setattr(models, "load_config", lambda spec: config if spec.name == "llama-2-7b" else real(spec))
    code, out, err = study(capsys, REPO / "experiments" / "integrated-llama2-7b.yaml", "--dry-run")
    assert code == 0, err
    assert out.startswith("integrated-llama2-7b: 8 stages on llama-2-7b [bfloat16]")
    from sensray.study.spec import load_study

    heal = load_study(REPO / "experiments" / "integrated-llama2-7b.yaml").stage("uniform-lora").params
    assert (heal.steps * heal.train.batch_size, heal.lr, heal.workers) == (234 * 128, 1e-4, 4)  # Wanda's recipe


def test_the_evaluation_run_reads_like_any_run(finished, capsys):
    from sensray.analyze.__main__ import main as analyze

    _, root = finished
    assert analyze([str(root / "evaluation"), "--no-write"]) == 0
    assert "4 trials of evaluate on sensray-tiny" in capsys.readouterr().out


@pytest.mark.slow
def test_with_the_ray_executor_prune_and_evaluate_run_as_ray_tasks(local_ray, tmp_path, capsys):
    text = STUDY.split("stages:")[0] + textwrap.dedent("""\
        stages:
          - {{name: pruned, kind: prune, method: magnitude, sparsity: 0.5}}
          - {{name: evaluation, kind: evaluate, models: [dense, pruned]}}
        """)
    code, out, err = study(capsys, write(tmp_path / "ray.yaml", text, executor="ray"))
    assert code == 0, err
    root = next((tmp_path / "results" / "small-study").iterdir())
    rows = pl.read_parquet(root / "evaluation" / "trials.parquet")
    assert rows["target"].to_list() == ["dense", "pruned"] and rows["sparsity"][1] == 0.5


def test_a_study_spec_given_to_sweep_says_to_run_it_with_study(capsys):
    from test_cluster_yaml import REPO

    from sensray.sweep import main as sweep

    assert sweep([str(REPO / "experiments" / "integrated.yaml"), "--dry-run"]) == 2
    assert "this is a study spec (a list of stages), not an experiment: run it with sensray study" in \
        capsys.readouterr().err


def test_an_unknown_task_fails_the_dry_run_naming_the_stage(tmp_path, capsys):
    spec = write(tmp_path / "tasks.yaml", STUDY.replace("models: [dense, pruned-allocated, pruned-uniform, healed]",
                                                        "models: [dense, healed], tasks: [sensray-pydoc-choise]"))
    code, _, err = study(capsys, spec, "--dry-run")
    assert code == 2 and "stages[5].tasks" in err and "sensray-pydoc-choice" in err  # lm-eval's suggestion
    assert not (tmp_path / "results").exists()


@pytest.mark.slow  # lm-eval scores two models
def test_the_evaluation_scores_the_tasks_on_every_model_and_the_report_shows_them(tmp_path, capsys):
    text = STUDY.split("stages:")[0] + textwrap.dedent("""\
        stages:
          - {{name: pruned, kind: prune, method: magnitude, sparsity: 0.9}}
          - {{name: evaluation, kind: evaluate, models: [dense, pruned], tasks: [sensray-pydoc-choice], limit: 12}}
          - {{name: report, kind: report, evaluation: evaluation}}
        """)
    code, _, err = study(capsys, write(tmp_path / "tasks.yaml", text))
    assert code == 0, err
    root = next((tmp_path / "results" / "small-study").iterdir())
    rows = pl.read_parquet(root / "evaluation" / "trials.parquet").to_dicts()
    assert [r["sensray-pydoc-choice/n"] for r in rows] == [12, 12]
    dense, pruned = (r["sensray-pydoc-choice/acc"] for r in rows)
    assert 0 <= pruned < dense <= 1  # 90% magnitude pruning costs the shipped model accuracy
    models = json.loads((root / "report" / "summary.json").read_text())["models"]
    assert models["pruned"]["sensray-pydoc-choice/acc"] == pruned
    assert "## Tasks" in (root / "report" / "report.md").read_text()


def test_the_closing_note_gives_each_models_ppl_and_sparsity_and_each_stage_time(finished, tmp_path, capsys):
    spec, root = copy_of(finished, tmp_path)
    code, _, err = study(capsys, spec, "--resume", root)
    models = json.loads((root / "report" / "summary.json").read_text())["models"]
    assert code == 0
    lines = {line.split()[0]: line for line in err.splitlines() if line.startswith("  ") and "  ppl " in line}
    assert list(lines) == list(models)
    for name, model in models.items():
        assert f"ppl {model['ppl']:8.4f}  sparsity {model['sparsity']:7.2%}" in lines[name]
    assert "(lora heal of pruned-uniform)" in lines["healed"] and "heal of" not in lines["dense"]
    assert all(f"{stage} " in err.split("stage times: ")[1].splitlines()[0] for stage in STAGES)
