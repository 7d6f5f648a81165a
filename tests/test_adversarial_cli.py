"""`sensray adversarial` from the command line: a run end to end, bad input at --dry-run, the shipped specs."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from adversarial_support import build, spec_text
from sensray.cli import main
from sweep_support import one_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("adv-cli"), drop_control=True)


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["adversarial", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_a_run_end_to_end_from_the_command_line(tiny, tmp_path, capsys):
    out = tmp_path / "results"
    spec = write(tmp_path, spec_text(*tiny, out, {"steps": 30}))  # > 100 journal rows, `stop` set on the last
    code, stdout, stderr = run(capsys, spec)
    assert code == 0, stderr
    path = Path(stdout.strip().splitlines()[-1])
    assert path.parent == out / "adv-test"
    for name in ("spec.yaml", "baseline.json", "cases.json", "steps.parquet", "attacks.parquet", "budgets.parquet",
                 "summary.json", "loss.png", "success.png", "continuations.md"):
        assert (path / name).is_file(), name
    assert not (path / "steps.jsonl").exists()  # the table replaced the journal
    attacks = pl.read_parquet(path / "attacks.parquet")
    assert attacks.height == 4 and set(attacks["budget"]) == {1, 3}
    assert all(len(ids) == b for ids, b in zip(attacks["ids"], attacks["budget"]))
    assert (attacks["nll"] >= attacks["start_nll"]).all()  # the search never ends below where it started
    steps = pl.read_parquet(path / "steps.parquet")
    assert steps.height == 4 * 31 and steps.filter(pl.col("step") == 30)["stop"].to_list() == ["steps"] * 4
    summary = json.loads((path / "summary.json").read_text())
    assert [b["budget"] for b in summary["budgets"]] == [1, 3] and "budget" in stderr and "continuations" in stderr
    assert (path / "continuations.md").read_text().count("adversarial input") == 4

    assert main(["generate", "--adversarial", str(path), "--max-new-tokens", "5"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("adversarial input") == 4 and "case 1" in shown

    code, stdout, stderr = run(capsys, "--resume", path)  # finished: nothing runs, nothing changes
    assert code == 0 and stdout.strip() == str(path)
    code, stdout, stderr = run(capsys, "--resume", path, "--transfer", tiny[0])  # the same weights, as an export
    assert code == 0 and stdout.strip() == str(path) and "baseline (undamaged)" in stderr
    table = pl.read_parquet(path / "transfer.parquet")
    assert table.height == 8 and (table["delta_ppl"] == 1.0).all() and set(table["source_kind"]) == {"baseline",
                                                                                                       "model"}


def assert_fails(capsys, tmp_path, *args, key: str, words: tuple[str, ...] = ()) -> None:
    code, _, stderr = run(capsys, *args, "--dry-run")
    line = one_error(stderr)
    assert code == 2, stderr
    assert key in line and all(w in line for w in words), line
    assert not (tmp_path / "results").exists()


def test_dry_run_prints_the_attacks_and_writes_nothing(tiny, tmp_path, capsys):
    code, stdout, _ = run(capsys, write(tmp_path, spec_text(*tiny, tmp_path / "results")), "--dry-run")
    assert code == 0 and stdout.startswith("adv-test: 4 attacks (2 cases x budgets [1, 3]) of gcg")
    assert not (tmp_path / "results").exists()


def targeted(tiny, tmp_path, prompts: bytes | None, target: str | None = None, **attack) -> Path:
    inputs = {"target": target or "x * 7"}
    if prompts is not None:
        (tmp_path / "prompts.txt").write_bytes(prompts)
        inputs |= {"prompts": str(tmp_path / "prompts.txt"), "cases": None}  # every line
    return write(tmp_path, spec_text(*tiny, tmp_path / "results", {"objective": "target"} | attack, inputs))


@pytest.mark.parametrize("prompts, key, words", [
    (b"\n  \n\n", "inputs.prompts", ("is empty",)),
    (b"def f(x):\n  return \xff\n", "inputs.prompts", ("prompts.txt:2", "not UTF-8", "0xff")),
    (b"short\n" + b"y" * 130 + b"\n", "inputs.prompts", ("prompts.txt:2", "more than the model's context of 128",
                                                         "130 prompt tokens")),
])
def test_bad_prompts_files_fail_at_dry_run(tiny, tmp_path, capsys, prompts, key, words):
    assert_fails(capsys, tmp_path, targeted(tiny, tmp_path, prompts), key=key, words=words)


def test_a_suffix_longer_than_the_context_fails(tiny, tmp_path, capsys):
    spec = write(tmp_path, spec_text(*tiny, tmp_path / "results", {"budgets": [1, 200]}))
    assert_fails(capsys, tmp_path, spec, key="attack.budgets", words=("200-token suffix", "context of 128"))


def test_a_target_that_tokenizes_to_nothing_fails(tiny, tmp_path, capsys):
    assert_fails(capsys, tmp_path, targeted(tiny, tmp_path, None, target="\x7f\x7f"), key="inputs.target",
                 words=("tokenizes to no tokens",))
    (tmp_path / "targets.txt").write_text("x * 7\n\x7f\n", encoding="utf-8")
    spec = write(tmp_path, spec_text(*tiny, tmp_path / "results", {"objective": "target"},
                                     {"targets": str(tmp_path / "targets.txt"), "cases": 2}))
    assert_fails(capsys, tmp_path, spec, key="inputs.targets", words=("targets.txt:2", "tokenizes to no tokens"))


@pytest.mark.parametrize("attack, inputs, key, words", [
    ({"objective": "target"}, {}, "", ("needs inputs.target",)),
    ({}, {"target": "x"}, "", ("is for objective 'target'",)),
    ({"budgets": [5, 1]}, {}, "attack.budgets", ("increasing",)),
    ({"method": "beam"}, {}, "attack.method", ("'gcg' or 'hotflip'",)),
    ({"steps": "10"}, {}, "attack.steps", ("without quotes",)),
    ({"init": " x"}, {}, "attack.init", ("2 tokens",)),
    ({}, {"cases": 2000}, "inputs.cases", ("the corpus has",)),
    ({"edit": "substitute"}, {"chat_template": True}, "", ("works with attack.edit 'suffix'",)),
    ({"edit": "substitute", "budgets": [13]}, {}, "attack.budgets", ("substituting up to 13", "it has 12")),
])
def test_spec_errors_name_the_key(tiny, tmp_path, capsys, attack, inputs, key, words):
    spec = write(tmp_path, spec_text(*tiny, tmp_path / "results", attack, inputs))
    assert_fails(capsys, tmp_path, spec, key=key, words=words)


def test_a_chat_template_needs_the_tokenizer_to_have_one(tiny, tmp_path, capsys):
    spec = targeted(tiny, tmp_path, b"hello\n")
    text = yaml.safe_load(spec.read_text())
    text["inputs"]["chat_template"] = True
    spec.write_text(yaml.safe_dump(text))
    assert_fails(capsys, tmp_path, spec, key="inputs.chat_template", words=("has no chat template",))


def test_resume_refuses_a_changed_spec(tiny, tmp_path, capsys):
    from sensray.adversarial.spec import load_adversarial_spec
    from sensray.adversarial.store import AttackRun

    spec = write(tmp_path, spec_text(*tiny, tmp_path / "results"))
    run_dir = AttackRun.create(load_adversarial_spec(spec)).path
    code, _, stderr = run(capsys, "--resume", run_dir, "--set", "attack.steps=9", "--dry-run")
    assert code == 2 and "differs from" in one_error(stderr) and "attack" in one_error(stderr)


def test_sensray_run_adversarial_is_the_preset(tiny, capsys):
    model, corpus = tiny
    assert main(["run", "adversarial", "--model", str(model), "--set", "attack.init=x", "--set",
                 f"inputs.corpus={corpus}", "--set", f"data.corpus={corpus}", "--set", "data.seq_len=32",
                 "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"adversarial: 12 attacks (4 cases x budgets [1, 5, 20]) of gcg")


def test_the_shipped_experiment_plans_on_the_shipped_model(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, stdout, stderr = run(capsys, "experiments/adversarial.yaml", "--dry-run")
    assert code == 0, stderr
    assert "12 attacks (4 cases x budgets [1, 5, 20])" in stdout and "context 256" in stdout


SEVEN_B = {"llama-2-7b-chat": ("llama", dict(num_key_value_heads=32)),
           "mistral-7b": ("mistral", dict(num_key_value_heads=8, sliding_window=4096))}


@pytest.mark.parametrize("name", ["adversarial-llama2-chat-7b.yaml", "adversarial-mistral-7b.yaml"])
def test_the_7b_experiments_plan_against_a_stand_in(name, monkeypatch, tiny):
    """Their configs and tokenizers are on the Hub: plan on a 7B-shaped meta model and the shipped tokenizer
    (with Llama-2's chat template), the corpus replaced by the shipped text."""
    import torch
    from transformers import AutoModelForCausalLM

    import sensray.data
    from sensray.adversarial.plan import make_attack_plan
    from sensray.adversarial.spec import load_adversarial_spec
    from sensray.models import load_tokenizer
    from sensray.spec import ModelSpec
    from sensray.testing import tiny_config

    monkeypatch.chdir(REPO)
    spec = load_adversarial_spec(REPO / "experiments" / name, ["attack.init=' x'"])
    family, shape = SEVEN_B[spec.model.name]
    config = tiny_config(family, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, vocab_size=32000, max_position_embeddings=4096, **shape)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(ModelSpec())
    tokenizer.chat_template = "<s>[INST] {{ messages[0]['content'] }} [/INST]"
    bundled = sensray.data.BUNDLED_CORPUS.read_text(encoding="utf-8")
    monkeypatch.setattr(sensray.data, "load_text", lambda spec: bundled)
    plan = make_attack_plan(spec, meta=meta, tokenizer=tokenizer)
    assert plan.context == 4096 and plan.vocabulary == 32000
    assert spec.model.dtype == "bfloat16" and spec.resources.gpus == 1
    if spec.targeted:
        assert len(plan.cases) == 10 and spec.inputs.chat_template and plan.cases[0].after
        assert (spec.attack.budgets, spec.attack.steps, spec.attack.top_k, spec.attack.candidates) == (
            [20], 250, 256, 512)  # nanoGCG's defaults
    else:
        assert len(plan.cases) == 8 and len(plan.cases[0].target) == 32


def test_every_shipped_adversarial_spec_parses_and_is_listed(capsys, monkeypatch):
    from sensray.adversarial.spec import load_adversarial_spec

    monkeypatch.chdir(REPO)
    paths = sorted(REPO.glob("experiments/adversarial*.yaml"))
    assert len(paths) == 3
    for path in paths:
        assert load_adversarial_spec(path).name == path.stem
    assert main(["list", "experiments"]) == 0
    assert "experiments/adversarial.yaml" in capsys.readouterr().out
