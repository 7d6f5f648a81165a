"""python -m sensray.generate on a tiny in-process Llama: greedy, perturbed, restored, reproducible."""

from __future__ import annotations

import re

import pytest
import yaml

from sensray.checksum import weights_checksum
from sensray.generate import compare_texts, find_trial, greedy, main, parse_params, perturbed, trial_perturbation
from sensray.models import load_model, load_tokenizer
from sensray.perturbations import PERTURBATIONS
from sensray.results import to_frame
from sensray.space import trial_id
from sensray.spec import ModelSpec
from sensray.testing import tiny_model

FLIP = {"target": "blocks.0", "field": "exponent_msb", "count": 1, "seed": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, char_tokenizer):
    """A tiny random Llama and a character tokenizer, saved as a local HF model directory."""
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama", vocab_size=len(char_tokenizer)).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    spec = ModelSpec(name=str(model_dir), device="cpu")
    return load_model(spec), load_tokenizer(spec)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_dir):
    """A finished run with one bitflip trial, as the sweep writes it."""
    path = tmp_path_factory.mktemp("run") / "bitflip" / "20260101-000000-abcdef"
    path.mkdir(parents=True)
    spec = {"name": "bitflip", "model": {"name": str(model_dir), "dtype": "float32"}, "perturbation": "bitflip",
            "space": {"target": {"each": "blocks.*"}, "field": "exponent_msb", "count": 1}}
    (path / "spec.yaml").write_text(yaml.safe_dump(spec))
    row = {"trial_id": trial_id("bitflip", FLIP), "kind": "bitflip", "sample": 0, **FLIP, "ppl": 80.0, "nll": 4.38,
           "delta_ppl": 4.0, "kl": 0.5, "top1_agreement": 0.6, "nonfinite": False, "seconds": 0.1,
           "replica": "local-0", "error": None}
    to_frame([row]).write_parquet(path / "trials.parquet")
    return path


def test_greedy_is_deterministic(model_dir, capsys):
    args = ["--model", str(model_dir), "--prompt", "def f", "--max-new-tokens", "8"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and "def f" in first


def test_perturbation_changes_the_text_and_is_restored(loaded):
    model, tokenizer = loaded
    before = weights_checksum(model)
    clean = greedy(model, tokenizer, "abc", 6)
    kind = PERTURBATIONS.get("ablation")
    with perturbed(model, kind, kind.parse({"target": "lm_head", "mode": "zero"})) as report:
        assert weights_checksum(model) != before
        damaged = greedy(model, tokenizer, "abc", 6)
    assert damaged.strip() == ""  # every logit 0: argmax picks token 0, the space
    assert damaged != clean
    assert weights_checksum(model) == before and "verified bit-exact" in report["restored"]


def test_inline_perturbation_prints_both_texts(model_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # side by side
    assert main(["--model", str(model_dir), "--prompt", "abc", "--max-new-tokens", "5", "--perturb", "ablation",
                 "--param", "target=lm_head", "--param", "mode=zero"]) == 0
    out = capsys.readouterr().out
    assert "perturbation: ablation target=lm_head mode=zero" in out
    assert re.search(r"^unperturbed +│ perturbed$", out, re.M), out  # both titles, each over its column
    [texts] = [line for line in out.splitlines() if "(nothing visible:" in line]  # lm_head zeroed: only spaces
    assert texts.split("│")[0].strip()  # the unperturbed continuation has visible text
    assert re.search(r"verified bit-exact \(model checksum [0-9a-f]{32} before and after\)", out)


def test_ignore_eos_generates_every_token(loaded):
    """With lm_head zeroed every logit ties and greedy picks token 0 (the space); made end-of-text, it
    ends the text at once, unless --ignore-eos forbids it and the next tie-breaker, "!", follows."""
    model, tokenizer = loaded
    kind, eos = PERTURBATIONS.get("ablation"), model.config.eos_token_id
    with perturbed(model, kind, kind.parse({"target": "lm_head", "mode": "zero"})):
        model.config.eos_token_id = 0
        try:
            assert greedy(model, tokenizer, "abc", 4).strip() == ""  # one token, the end-of-text
            assert greedy(model, tokenizer, "abc", 4, ignore_eos=True) == "! ! ! !"
        finally:
            model.config.eos_token_id = eos


def test_trial_params_read_back_exactly(run_dir, model_dir, capsys):
    tid = trial_id("bitflip", FLIP)
    row, params = find_trial(run_dir / "trials.parquet", tid[:6])  # a unique prefix will do
    assert row["trial_id"] == tid and params == FLIP
    assert "warning" not in capsys.readouterr().err  # the params hash back to the trial id
    spec, kind, raw, about = trial_perturbation(str(run_dir), tid)
    assert (spec.name, kind, raw) == (str(model_dir), "bitflip", FLIP)  # the run's model, the trial's params
    assert tid in about and "×4" in about


def test_trial_flips_the_same_bits_as_the_sweep(loaded, run_dir):
    model, _ = loaded
    kind = PERTURBATIONS.get("bitflip")
    undo = kind.apply(model, kind.parse(FLIP))  # what the sweep did
    during_sweep = weights_checksum(model)
    undo.restore()
    _, _, raw, _ = trial_perturbation(str(run_dir), trial_id("bitflip", FLIP))
    with perturbed(model, kind, kind.parse(raw)):
        assert weights_checksum(model) == during_sweep


def test_trial_from_the_cli(run_dir, capsys):
    assert main(["--run", str(run_dir), "--trial", trial_id("bitflip", FLIP)[:8], "--prompt", "x",
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert trial_id("bitflip", FLIP) in out and "verified bit-exact" in out


@pytest.mark.parametrize("args, message", [
    (["--trial", "abc"], "--trial: needs --run"),
    (["--perturb", "bitflp"], "did you mean 'bitflip'?"),
    (["--perturb", "noise", "--param", "sigma"], "expected KEY=VALUE"),
    (["--perturb", "noise", "--param", "target=blocks.0", "--param", "sgma=1"], "--param sgma: not a parameter of noise; did you mean 'sigma'?"),
    (["--perturb", "bitflip", "--param", "target=blocks.0"], "give exactly one of 'bit'"),
    (["--param", "seed=1"], "--param: needs --perturb"),
])
def test_argument_errors_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_run_errors_exit_2(run_dir, tmp_path, capsys):
    assert main(["--run", str(run_dir), "--trial", "zzzz"]) == 2
    assert "is not a trial of this run" in capsys.readouterr().err
    assert main(["--run", str(run_dir), "--model", "x", "--trial", "0"]) == 2
    assert "drop --model" in capsys.readouterr().err
    assert main(["--run", str(tmp_path), "--trial", "0"]) == 2
    assert "not a sensray run directory" in capsys.readouterr().err


def test_target_errors_are_found_on_the_model(model_dir, capsys):
    assert main(["--model", str(model_dir), "--perturb", "bitflip", "--param", "target=blocks.9",
                 "--param", "field=sign", "--max-new-tokens", "2"]) == 2
    assert "--param target: 'blocks.9': layer 9 is past the model's depth" in capsys.readouterr().err


def test_params_are_yaml():
    assert parse_params(["target=blocks.*", "seed=1", "relative=false", "coords=[[0, 3]]", "sigma=0.01", "t=*"]) == {
        "target": "blocks.*", "seed": 1, "relative": False, "coords": [[0, 3]], "sigma": 0.01, "t": "*"}


def test_side_by_side_or_one_after_the_other():
    wide = compare_texts("unperturbed", "hello world", "perturbed", "   ", width=100)
    assert wide.splitlines()[0].startswith("unperturbed") and "│ perturbed" in wide.splitlines()[0]
    assert "(nothing visible: 3 whitespace characters)" in wide
    narrow = compare_texts("unperturbed", "a", "perturbed", "b", width=60)
    assert narrow == "--- unperturbed ---\na\n\n--- perturbed ---\nb"


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "--run results/bitflip/<run id> --trial <trial_id>" in capsys.readouterr().out
