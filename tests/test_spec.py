"""Experiment specs: strict parsing, key paths in errors, overrides, every shipped spec parses."""

from pathlib import Path

import pytest

from sensray.errors import SpecError
from sensray.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
MINIMAL = "name: t\nperturbation: bitflip\nspace: {target: blocks.0, bit: 3}\n"


def error_of(text, overrides=()):
    with pytest.raises(SpecError) as err:
        parse_spec(text, list(overrides))
    return err.value


def test_minimal_spec_fills_defaults_and_is_frozen():
    spec = parse_spec(MINIMAL)
    assert spec.model.name == "sensray-tiny" and spec.model.dtype == "float32"
    assert spec.model.trust_remote_code is False and spec.data.corpus == "bundled"
    with pytest.raises(Exception):
        spec.name = "other"


@pytest.mark.parametrize(
    "text, path, words",
    [
        (MINIMAL + "modle: {}\n", "modle", "unknown key"),
        (MINIMAL + "model: {dtyp: float32}\n", "model.dtyp", "unknown key"),
        (MINIMAL + "model: {dtype: float8}\n", "model.dtype", "'float8' is not allowed"),
        (MINIMAL + "data: {seq_len: 1}\n", "data.seq_len", "greater than or equal to 2"),
        (MINIMAL + "data: {seq_len: many}\n", "data.seq_len", "integer"),
        (MINIMAL + "num_samples: 0\n", "num_samples", "greater than or equal to 1"),
        (MINIMAL + "data: {num_sequences: 4, num_tokens: 512}\n", "data", "not both"),
        ("name: t\nspace: {}\n", "perturbation", "required key is missing"),
        ("name: t\nperturbation: bitflop\nspace: {}\n", "perturbation", "did you mean 'bitflip'"),
        ("name: a/b\nperturbation: noise\nspace: {}\n", "name", "slug"),
        (MINIMAL + "model: {trust_remote_code: 3}\n", "model.trust_remote_code", "bool"),
    ],
)
def test_errors_name_the_key_path(text, path, words):
    err = error_of(text)
    assert err.path == path
    assert words in err.message


def test_not_a_mapping_and_bad_yaml():
    assert "mapping" in error_of("- a\n- b\n").message
    assert "line 2" in error_of("name: [unclosed\n").message


def test_overrides_go_through_the_same_validation():
    spec = parse_spec(MINIMAL, ["data.seq_len=64", "model.dtype=bfloat16", "space.bit=5"])
    assert spec.data.seq_len == 64 and spec.model.dtype == "bfloat16" and spec.space["bit"] == 5
    assert error_of(MINIMAL, ["data.seq_len=1"]).path == "data.seq_len"
    assert error_of(MINIMAL, ["nonsense"]).path == "--set"
    assert error_of(MINIMAL, ["name.x=1"]).path == "name"


def test_load_spec_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "extra: 1\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: extra: unknown key")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_parses(path):
    spec = load_spec(path)
    assert spec.name and spec.space
