"""Experiment specs: strict parsing, key paths in errors, overrides, resources, every shipped spec plans."""

from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

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
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "other"
    with pytest.raises(ValidationError, match="frozen"):
        spec.model.dtype = "bfloat16"


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


@pytest.mark.parametrize("resources, cpus, gpus, replicas", [
    ("{}", 1, 0, "auto"),
    ("{cpus: 0.5, gpus: 0.5, replicas: 3}", 0.5, 0.5, 3),  # two replicas share a GPU
    ("{gpus: 2, replicas: auto}", 1, 2, "auto"),  # one model sharded over two GPUs
])
def test_resources_as_documented(resources, cpus, gpus, replicas):
    res = parse_spec(MINIMAL + f"resources: {resources}\n").resources
    assert (res.cpus, res.gpus, res.replicas) == (cpus, gpus, replicas)


@pytest.mark.parametrize("resources, path, words", [
    ("{gpus: 1.5}", "resources.gpus", "above 1 must be a whole number of GPUs"),
    ("{gpus: -1}", "resources.gpus", "greater than or equal to 0"),
    ("{cpus: 0}", "resources.cpus", "greater than 0"),
    ("{replicas: 0}", "resources.replicas", "must be 'auto' or a whole number >= 1, got 0"),
    ("{replicas: 2.5}", "resources.replicas", "got 2.5"),
    ("{replicas: true}", "resources.replicas", "got True"),
    ("{replicas: many}", "resources.replicas", "got 'many'"),
    ("{gpu: 1}", "resources.gpu", "unknown key"),
])
def test_bad_resources_name_the_key(resources, path, words):
    err = error_of(MINIMAL + f"resources: {resources}\n")
    assert err.path == path and words in err.message


# adversarial*.yaml are `sensray adversarial` specs (tests/test_adversarial_cli.py), attack-*.yaml are
# AttackSpecs (tests/test_attack_spec.py); study specs (a list of stages) are checked in test_study.py.
EXPERIMENTS = sorted(p for p in (REPO / "experiments").glob("*.yaml")
                     if not p.name.startswith(("adversarial", "attack-")) and "\nstages:" not in p.read_text())
# Every experiment on the shipped model, and its trial count when planned against the model's structure.
# The 7B ones are planned in test_cluster_yaml.py and test_superweights.py (their configs are on the Hub).
TINY_TRIALS = {"ablation-blocks.yaml": 8, "ablation.yaml": 8 * 7 * 2, "bitflip-random.yaml": 40,
               "bitflip.yaml": 8 * 4 * 8, "noise.yaml": 7 * 5 * 3, "worst-noise.yaml": 8 * 7 * 3,
               "prune.yaml": 40, "prune-nm.yaml": 6, "prune-layers.yaml": 8 * 7, "prune-sensitivity.yaml": 12,
               "ablation-tasks.yaml": 8 * 7 * 2, "evaluate.yaml": 1,
               "bitflip-int8.yaml": 8 * 4 * 8, "bitflip-nf4.yaml": 8 * 4 * 8,
               "bitflip-formats.yaml": 3 * 2 * 48 + 2 * 3 * 48}  # a format study: no scale role in float formats


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_parses(path):
    spec = load_spec(path)
    assert spec.name == path.stem and spec.space
    assert (spec.model.name == "sensray-tiny") == (path.name in TINY_TRIALS), "plan it below, or in a 7B test"


@pytest.mark.parametrize("name", TINY_TRIALS)
def test_every_shipped_tiny_experiment_plans(name, tmp_path):
    from sensray.plan import make_plan

    overrides = []
    if name == "prune-sensitivity.yaml":  # it reads per-layer results of prune-layers.yaml: give it some
        run = tmp_path / "prune-layers" / "20260101-000000-abcdef"
        run.mkdir(parents=True)
        pl.DataFrame({"target": [f"blocks.{i}" for i in range(8)], "delta_ppl": [1 + i / 10 for i in range(8)],
                      "error": [None] * 8}, schema_overrides={"error": pl.String}).write_parquet(run / "trials.parquet")
        overrides = [f"space.run={run}"]
    spec = load_spec(REPO / "experiments" / name, overrides)
    if spec.formats is not None:  # a format study: one plan per format, the same trial ids in each
        from sensray.formats import plans

        planned = list(plans(spec, 10_000).values())
    else:
        planned = [make_plan(spec)]  # against the meta model: no weights
    assert sum(len(plan.trials) for plan in planned) == TINY_TRIALS[name]
    assert all(len({t.trial_id for t in plan.trials}) == len(plan.trials) for plan in planned)


@pytest.mark.parametrize("spec, command", [
    ("adversarial.yaml", "sensray adversarial"),
    ("attack-bitflip.yaml", "sensray attack"),
    ("integrated.yaml", "sensray study"),
])
def test_another_commands_spec_given_to_a_sweep_names_that_command(spec, command):
    with pytest.raises(SpecError) as err:
        load_spec(REPO / "experiments" / spec)
    assert err.value.message.endswith(command) or f"`{command}`" in err.value.message
