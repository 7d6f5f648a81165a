"""Attack specs: strict parsing, the shipped ones, and the bad inputs --dry-run must refuse with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sensray.attack.checks import check_attack
from sensray.attack.cli import main
from sensray.attack.spec import load_attack_spec, parse_attack_spec
from sensray.errors import SpecError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = "name: a\nstop: {max_flips: 3}\n"


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as caught:
        parse_attack_spec(text)
    return caught.value


@pytest.mark.parametrize("text, path, words", [
    ("name: a\nstop: {max_flips: 0}\n", "stop.max_flips", "can never flip"),
    ("name: a\nstop: {max_flips: 3, ppl_ratio: 1.0}\n", "stop.ppl_ratio", "met before any flip"),
    ("name: a\nstop: {max_flips: 3, ppl_ratio: 0.5}\n", "stop.ppl_ratio", "at or below"),
    ("name: a\nstop: {max_flips: 3, top1_below: 0}\n", "stop.top1_below", "never fall below"),
    ("name: a\nstop: {max_flips: 3, top1_below: 1.5}\n", "stop.top1_below", "before any flip"),
    ("name: a\n", "stop", "required key is missing"),
    (MINIMAL + "attack: {field: mantissa, bit: 3}\n", "attack", "not both"),
    (MINIMAL + "attack: {field: mantisa}\n", "attack.field", "not allowed"),
    (MINIMAL + "attack: {evaluate: 0}\n", "attack.evaluate", "greater than or equal to 1"),
    (MINIMAL + "attack: {per_tensor: '2'}\n", "attack.per_tensor", "string"),
    (MINIMAL + "utility: {data: {corpus: bundled}, max_increase: 0}\n", "utility.max_increase", "greater than 0"),
    (MINIMAL + "random: {counts: []}\n", "random.counts", "non-empty"),
    (MINIMAL + "atack: {}\n", "atack", "unknown key"),
    ("name: a\nperturbation: bitflip\nspace: {target: blocks.0}\n", "perturbation", "sensray sweep"),
])
def test_bad_specs_name_the_key(text, path, words):
    err = error_of(text)
    assert err.path == path and words in err.message, err


def test_a_sweep_refuses_an_attack_spec_and_says_which_command_runs_it():
    from sensray.spec import parse_spec

    with pytest.raises(SpecError) as caught:
        parse_spec(MINIMAL.replace("stop:", "attack: {}\nstop:"))
    assert caught.value.path == "attack" and "sensray attack" in caught.value.message


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("attack-*.yaml")), ids=lambda p: p.name)
def test_every_shipped_attack_spec_parses(path):
    spec = load_attack_spec(path)
    assert spec.name == path.stem and spec.stop.max_flips >= 1
    assert spec.trials().perturbation == "bitflip"


@pytest.mark.parametrize("name", ["attack-bitflip.yaml", "attack-bitflip-nf4.yaml"])
def test_the_shipped_attack_checks_out_against_the_shipped_model(tmp_path, name):
    spec = load_attack_spec(REPO / "experiments" / name, [f"output_dir={tmp_path}"])
    check_attack(spec, replicas_here=True)
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_the_7b_attack_checks_out_on_the_models_structure(monkeypatch):
    """The dry run needs Llama-2-7B's config from the Hub; build the same structure offline (meta device)."""
    from transformers import AutoModelForCausalLM

    import sensray.models
    from sensray.testing import tiny_config

    config = tiny_config("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    monkeypatch.setattr(sensray.models, "meta_model", lambda spec: model)
    spec = load_attack_spec(REPO / "experiments" / "attack-llama2-7b.yaml")
    assert check_attack(spec, replicas_here=False) is model
    assert sum(p.numel() for p in model.parameters()) > 6.5e9


@pytest.mark.parametrize("overrides, key, words", [
    (["model.dtype=bfloat16", "attack.field=null", "attack.bit=20"], "attack.bit", "no candidate bits"),
    (["model.quantization=int8", "attack.target=blocks.*.*.*.weight", "attack.field=mantissa"], "attack.field",
     "has no 'mantissa' bits"),  # int8 codes: sign and magnitude only
    (["model.quantization=nf4", "attack.target=blocks.*.*.*.weight", "attack.field=null", "attack.bit=5"],
     "attack.bit", "nf4: bits 0-3"),
    (["attack.target=blocks.99"], "attack.target", "past the model's depth"),
    (["attack.target=blocks.*.mlp.nothing"], "attack.target", "matches no tensor"),
    (["data.seq_len=4096"], "data.seq_len", "longer than the context"),
    (["utility={data: {corpus: nowhere.txt}, max_increase: 0.1}"], "utility.data.corpus", "no such file"),
    (["attack.gradient_data={corpus: bundled, num_sequences: 100000}"], "attack.gradient_data.num_sequences",
     "asked for"),
    (["random.counts=[100000000]"], "random.counts", "at most"),
])
def test_dry_run_refuses_what_no_search_could_run(overrides, key, words, capsys, tmp_path):
    sets = [arg for o in overrides + [f"output_dir={tmp_path}"] for arg in ("--set", o)]
    code = main([str(REPO / "experiments" / "attack-bitflip.yaml"), "--dry-run", "--executor", "local", *sets])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{key}:" in lines[0] and words in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_integer_weights_sensray_cannot_differentiate_are_a_clear_error():
    from sensray.saliency.gradients import require_gradients
    from sensray.spec import ModelSpec

    class Quantized(torch.nn.Module):  # integer storage that is not bitsandbytes' (no dequantized weight known)
        def __init__(self):
            super().__init__()
            self.codes = torch.nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False)

    with pytest.raises(SpecError) as caught:
        require_gradients(Quantized(), ModelSpec())
    assert caught.value.path == "model.name" and "codes as int8" in caught.value.message
    require_gradients(torch.nn.Linear(2, 2), ModelSpec())  # float weights: nothing to say


def test_dry_run_prints_the_search(capsys, tmp_path):
    code = main([str(REPO / "experiments" / "attack-bitflip.yaml"), "--dry-run", "--executor", "local",
                 "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "progressive bit search on sensray-tiny" in out and "random baseline" in out
