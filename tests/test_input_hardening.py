"""Bad input fails cleanly: one `error:` line naming the file, key or value, the right exit code,
nothing written (issue 10, part 4). One section per class of failure:

1. errors that must cross Ray      2. resource bombs          3. tracebacks on user mistakes
4. silent acceptance               5. what --dry-run checks
(6. code execution from a spec: test_untrusted_code.py)

Runs the sweep in-process on the shipped model (one torch thread); one test starts a local Ray.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import pkgutil
import shutil
from pathlib import Path

import pytest
from sweep_support import SMALL, fails, spec_writer, sweep

import sensray
from sensray.errors import SensrayError, SpecError
from sensray.models import BUNDLED_MODEL

NOISE = """\
name: noisy
data: {{seq_len: 32, num_sequences: 2, batch_size: 2}}
perturbation: noise
space:
  target: blocks.0.mlp.down
  sigma: {sigma}
output_dir: {out}
"""


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture
def results(tmp_path) -> Path:
    return tmp_path / "results"


@pytest.fixture
def spec(tmp_path, results):
    """Write a spec (SMALL by default, dedented) and return its path."""
    return spec_writer(tmp_path, results)


# -- 1. errors that must cross Ray -------------------------------------------------------------------


def every_error_type() -> list[type[SensrayError]]:
    """SensrayError and every subclass of it anywhere in the package."""
    for module in pkgutil.walk_packages(sensray.__path__, "sensray."):
        if not module.name.endswith("__main__"):  # entry points run on import
            importlib.import_module(module.name)
    found, todo = [], [SensrayError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def an_instance(cls: type[SensrayError]) -> SensrayError:
    """An instance built through the class's own constructor, every argument a distinct string."""
    try:
        params = [p for p in inspect.signature(cls).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except ValueError:  # no __init__ of its own: Exception's (*args)
        params = []
    if not params:
        return cls(f"{cls.__name__}: something to fix")
    return cls(*[f"<{p.name} of {cls.__name__}>" for p in params])


def test_every_error_type_round_trips_through_pickle():
    types = every_error_type()
    names = {cls.__name__ for cls in types}
    assert {"SensrayError", "SpecError", "RestoreError", "AnalysisError"} <= names, names
    import ray.cloudpickle  # what Ray itself serializes exceptions with

    for cls in types:
        err = an_instance(cls)
        for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)):
            copy = loads(dumps(err))
            assert type(copy) is cls
            assert str(copy) == str(err) and copy.args == err.args
            assert copy.exit_code == err.exit_code
            assert vars(copy) == vars(err)  # path, message, source and anything else a subclass keeps
    spec_error = pickle.loads(pickle.dumps(SpecError("data.corpus", "no such file", "s.yaml")))
    assert (spec_error.path, spec_error.source, spec_error.exit_code) == ("data.corpus", "s.yaml", 2)


def test_a_data_error_in_a_ray_replica_prints_what_the_local_one_prints(spec, results, capsys, monkeypatch):
    """The preflight would catch it on the driver; off, the replica raises it and Ray carries it back."""
    import sensray.preflight

    monkeypatch.setattr(sensray.preflight, "check_data", lambda spec: 0)
    path = spec(SMALL.replace("data: {{", "data: {{corpus: {out}/missing.txt, ") + "resources: {{replicas: 1}}\n")
    lines = {}
    for executor in ("local", "ray"):
        lines[executor] = fails(capsys, 2, path, "--executor", executor, words=(f"{path}: data.corpus: no such file",))
    assert lines["ray"] == lines["local"]
    assert not results.exists()


# -- 2. resource bombs ---------------------------------------------------------------------------------


def alias_bomb(levels: int = 9) -> str:
    """Nine lists of nine references each: 9**9 values once expanded, a few hundred bytes written."""
    anchors = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(anchors) + "]"


@pytest.mark.parametrize("where", ["description", "space"])
def test_an_alias_bomb_anywhere_is_refused(spec, results, capsys, where):
    if where == "description":
        path = spec(SMALL + f"description: {alias_bomb()}\n")
    else:
        path = spec(SMALL.replace("  count: 2\n", f"  count: 2\n  junk: {alias_bomb()}\n"))
    fails(capsys, 2, path, "--dry-run", words=(str(path), "aliases are expanded"))
    assert not results.exists()


def test_an_alias_bomb_in_a_set_value_is_refused(spec, capsys):
    fails(capsys, 2, spec(), "--dry-run", "--set", f"description={alias_bomb()}",
          words=("description: --set value", "aliases are expanded"))


@pytest.mark.parametrize("yaml_text, words", [
    ("space: {{x: &r [1, *r]}}\n", "recursive"),
    ("description: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 64"),
    ("description: [" + "0, " * 55_000 + "]\n", "line 3: more than 50,000 values"),
])
def test_recursive_deep_or_huge_yaml_is_refused(spec, capsys, yaml_text, words):
    fails(capsys, 2, spec("name: x\nperturbation: noise\n" + yaml_text), "--dry-run", words=(words,))


def test_a_spec_file_over_a_mebibyte_is_refused(spec, capsys):
    path = spec(SMALL + "# padding\n" * 120_000)
    fails(capsys, 2, path, "--dry-run", words=(str(path), "larger than 1024 KiB"))


@pytest.mark.parametrize("change, words", [
    ("num_samples=1000000000000", "expands to 4,000,000,000,000 trials (target 2 x field 2 x num_samples"),
    ("space.seed={grid_search: [" + ", ".join(map(str, range(1000))) + "]}", "expands to 8,000 trials"),
])
def test_an_astronomical_space_is_counted_not_built(spec, capsys, change, words):
    extra = ["--max-trials", "5000"] if "seed" in change else []
    fails(capsys, 2, spec(), "--dry-run", "--set", change, *extra, words=("space: " + words, "--max-trials"))


def test_max_trials_is_the_limit_and_can_be_raised(spec, capsys):
    fails(capsys, 2, spec(), "--dry-run", "--max-trials", "7", words=("expands to 8 trials", "limit of 7"))
    code, out, _ = sweep(capsys, spec(), "--dry-run", "--max-trials", "8")
    assert code == 0 and "8 trials of bitflip" in out
    search = "search: {{algorithm: worst-case, num_trials: 2000000}}\n"
    fails(capsys, 2, spec(SMALL.replace("num_samples: 2\n", "") + search), "--dry-run",
          words=("search.num_trials: 2,000,000 trials is more than the limit of 1,000,000",))


@pytest.mark.parametrize("target, words", [
    ("blocks.0-999999999", "'blocks.0-999999999': layer 8 is past the model's depth (8 blocks"),
    ("{each: blocks.3-999999999999.mlp.*}", "layer 8 is past"),
    ("blocks.5-2", "layer range 5-2 is empty"),
])
def test_a_huge_layer_range_is_checked_against_the_depth_not_enumerated(spec, capsys, target, words):
    fails(capsys, 2, spec(), "--dry-run", "--set", f"space.target={target}", words=(words,))


def test_a_huge_range_anywhere_in_a_pattern_is_never_enumerated():
    """Not under blocks.: no depth to check it against, and still only (low, high) pairs, never a list."""
    from sensray.models import meta_model
    from sensray.spec import ModelSpec
    from sensray.targets import TargetError, _compile, select

    assert _compile("**.0-999999999999.mlp.down").match("blocks.7.mlp.down")
    assert not _compile("**.8-999999999999.mlp.down").match("blocks.7.mlp.down")
    with pytest.raises(TargetError, match="matches no tensor"):
        select(meta_model(ModelSpec()), "model.layers.0-999999999999.mlp.down_proj.weight")


# -- 3. tracebacks on user mistakes --------------------------------------------------------------------


def test_a_spec_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(SMALL.format(out=tmp_path).encode() + "description: café\n".encode("latin-1"))
    fails(capsys, 2, path, "--dry-run", words=(f"{path}: not UTF-8 text: byte 0xe9 on line 10",))


@pytest.mark.parametrize("domain, words", [
    ("{uniform: [0, .inf]}", "bounds must be finite"),
    ("{uniform: [.nan, 1]}", "bounds must be finite"),
    ("{loguniform: [1.0e-3, .inf]}", "bounds must be finite"),
    ("{uniform: [-1.0e+308, 1.0e+308]}", "too wide to draw from"),
    ("{randn: [0, .inf]}", "finite numbers with sd > 0"),
    ("{quniform: [0, 1, 0]}", "q (the step) must be above 0"),
    (".inf", "space.sigma: inf is not a usable number"),
])
def test_non_finite_numbers_are_refused(spec, capsys, domain, words):
    fails(capsys, 2, spec(NOISE, sigma=domain), "--dry-run", words=(words,))


@pytest.mark.parametrize("change, words", [
    ("space.seed={randint: [0, 1180591620717411303424]}", "space.seed.randint: bounds must fit in a 64-bit integer"),
    ("space.seed={randint: [0.5, 10]}", "whole numbers (an integer domain)"),
    ("space.seed=18446744073709551616", "space.seed: 18446744073709551616 is not a usable number"),
    ("seed=9223372036854775808", "seed: Input should be less than or equal to 9223372036854775807"),
    ("seed=9223372036854775807", "seed 9223372036854775807 + 2 trials passes"),
    ("seed=" + "9" * 5000, "line 1: an integer of 5000 characters; numbers in a spec fit in 64 bits"),
    ("space.sigma={uniform: [0, 1.0e+400]}", "bounds must be finite numbers, got [0, inf]"),
])
def test_seeds_and_integers_past_int64_are_refused(spec, capsys, change, words):
    fails(capsys, 2, spec(), "--dry-run", "--set", change, words=(words,))


def test_the_largest_seed_that_fits_is_accepted(spec, capsys):
    code, out, err = sweep(capsys, spec(), "--dry-run", "--set", f"seed={2**63 - 2}")  # seeds 2^63-2, 2^63-1
    assert code == 0, err


def test_a_name_longer_than_100_characters(spec, capsys):
    fails(capsys, 2, spec(SMALL.replace("name: small", "name: " + "n" * 101)), "--dry-run",
          words=("name: String should have at most 100 characters",))


@pytest.mark.parametrize("where", ["a file", "a long name", "a NUL byte"])
def test_an_impossible_output_dir_fails_before_anything_runs(spec, tmp_path, capsys, monkeypatch, where):
    from sensray.executors.local import LocalExecutor

    blocker = tmp_path / "plain-file"
    blocker.write_text("not a directory")
    out = {"a file": blocker / "results", "a long name": tmp_path / ("x" * 300), "a NUL byte": "res\\0ults"}[where]
    path = spec(SMALL.replace("output_dir: {out}", f'output_dir: "{out}"'))
    words = {"a file": "is a file, not a directory", "a long name": "is 300 bytes; this filesystem allows 255",
             "a NUL byte": "contains a NUL byte"}[where]
    fails(capsys, 2, path, "--dry-run", words=(f"{path}: output_dir: ", words))
    monkeypatch.setattr(LocalExecutor, "start", lambda self: pytest.fail("the model loaded before the check"))
    fails(capsys, 2, path, "--executor", "local", words=(words,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain-file", "spec.yaml"]


def test_a_corpus_that_is_not_utf8(spec, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"line one\nline two \xff\xfe\n")
    path = spec(SMALL.replace("data: {{", f"data: {{{{corpus: {corpus}, "))
    fails(capsys, 2, path, "--dry-run", words=(f"data.corpus: {corpus}:2: not UTF-8 text (byte 0xff)",))


def truncated_model(tmp_path: Path, keep: float | int) -> Path:
    model = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL, model)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as file:
        file.truncate(int(size * keep) if isinstance(keep, float) else keep)
    return model


@pytest.mark.parametrize("keep, words", [(0.5, "file not fully covered"), (4, "header too small")])
def test_a_truncated_safetensors_file_fails_the_dry_run_and_the_run(spec, tmp_path, results, capsys, keep, words):
    model = truncated_model(tmp_path, keep)
    path = spec(SMALL + f"model: {{{{name: {model}}}}}\n")
    for args in (["--dry-run"], ["--executor", "local"]):
        fails(capsys, 1, path, *args, words=(f"model.name: {model}/model.safetensors: not a readable safetensors",
                                             words))
    assert not results.exists()


def test_loading_a_corrupt_safetensors_is_one_error_not_a_traceback(tmp_path):
    from sensray.models import load_model
    from sensray.spec import ModelSpec

    with pytest.raises(SensrayError, match="cannot load .*header too small"):
        load_model(ModelSpec(name=str(truncated_model(tmp_path, 4))))


# -- 4. silent acceptance ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, words", [
    (SMALL + "num_samples: 3\n", "line 10: duplicate key 'num_samples' (first given on line 8)"),
    (SMALL.replace("  count: 2\n", "  count: 2\n  count: 3\n"),
     "line 8: duplicate key 'count' (first given on line 7)"),
])
def test_duplicate_keys_are_refused_with_their_lines(spec, capsys, text, words):
    path = spec(text)
    fails(capsys, 2, path, "--dry-run", words=(f"{path}: {words}",))


def test_a_merge_key_may_still_be_overridden():
    from sensray.spec import parse_spec

    spec = parse_spec("name: t\nperturbation: noise\nspace: {<<: {target: blocks.0, sigma: 0.1}, sigma: 0.2}\n")
    assert spec.space == {"target": "blocks.0", "sigma": 0.2}


@pytest.mark.parametrize("change, words", [
    ("data.seq_len='32'", "data.seq_len: Input should be a valid integer, got the string '32'"),
    ("num_samples='2'", "num_samples: Input should be a valid integer"),
    ("resources.cpus='1'", "resources.cpus: Input should be a valid number"),
    ("model.trust_remote_code='false'", "model.trust_remote_code: Input should be a valid boolean"),
    ("data.seq_len=32.0", "data.seq_len: Input should be a valid integer"),
    ("space.count='1'", "space.count: Input should be a valid integer, got the string '1' (write numbers"),
    ("space.count=1.0", "space.count: Input should be a valid integer"),
])
def test_quoted_numbers_are_refused_not_coerced(spec, capsys, change, words):
    fails(capsys, 2, spec(), "--dry-run", "--set", change, words=(words,))


def test_a_quoted_sigma_is_refused(spec, capsys):
    fails(capsys, 2, spec(NOISE, sigma="{grid_search: [0.1, '0.3']}"), "--dry-run",
          words=("space.sigma: Input should be a valid number, got the string '0.3'",))


def test_sigma_1_and_1_0_are_the_same_trial():
    from sensray.plan import make_plan
    from sensray.spec import parse_spec

    def ids(sigma):
        return [t.trial_id for t in make_plan(parse_spec(NOISE.format(sigma=sigma, out="r"))).trials]

    assert ids("1") == ids("1.0") == ids("{grid_search: [1]}")
    with pytest.raises(SpecError, match="are identical"):
        ids("{grid_search: [1, 1.0]}")
    plan = make_plan(parse_spec(NOISE.format(sigma="1", out="r")))
    assert plan.trials[0].params == {"target": "blocks.0.mlp.down", "sigma": 1.0, "seed": 0}
    assert isinstance(plan.trials[0].params["sigma"], float)


def test_a_search_proposes_the_ids_a_plan_would():
    """The adaptive feed canonicalises too: Tune's choice of the int 1 is the trial sigma 1.0."""
    pytest.importorskip("ray")
    from sensray.executors.search import SearchFeed
    from sensray.plan import make_plan
    from sensray.spec import parse_spec

    searched = parse_spec(NOISE.format(sigma="{choice: [1]}", out="r") + "search: {num_trials: 1}\n")
    trial = SearchFeed(searched, log=lambda line: None).poll()
    planned = make_plan(parse_spec(NOISE.format(sigma="1.0", out="r"))).trials[0]
    assert trial.params == planned.params and trial.trial_id == planned.trial_id


def test_seq_len_past_the_models_context(spec, capsys):
    fails(capsys, 2, spec(), "--dry-run", "--set", "data.seq_len=257",
          words=("data.seq_len: 257 tokens is longer than the context of 'sensray-tiny' "
                 "(max_position_embeddings = 256)",))
    assert sweep(capsys, spec(), "--dry-run", "--set", "data.seq_len=256", "--set", "data.num_sequences=1")[0] == 0


def test_more_replicas_than_a_local_ray_fits(spec, results, capsys):
    pytest.importorskip("ray")
    fails(capsys, 2, spec(SMALL + "resources: {{cpus: 1}}\n"), "--replicas", "64", "--executor", "ray",
          words=("resources.replicas: 64 replicas need 64 CPU; this machine's Ray has", "--replicas"))
    assert not results.exists()


def test_more_replicas_than_a_cluster_has_free_is_a_note():
    from sensray.executors.ray import RayExecutor
    from sensray.spec import parse_spec

    logs = []
    executor = RayExecutor(parse_spec(SMALL.format(out="r")), address="auto", replicas=4, log=logs.append)
    executor.target = 4
    executor._check_replicas_fit({"CPU": 64.0}, {"CPU": 2.0})
    assert logs == ["note: 4 replicas need 4 CPU; the cluster has room for 2 now, the other 2 wait for "
                    "resources (an autoscaler may add nodes)"]


# -- 5. what --dry-run checks (and the real run, before it writes) -------------------------------------


@pytest.mark.parametrize("change, words", [
    ("data.corpus={dir}/empty.txt", "data.corpus: {dir}/empty.txt is empty"),
    ("data.num_sequences=100000", "data.num_sequences: asked for 100000 windows of 32 tokens, the corpus has"),
    ("data.corpus={dir}/bad.jsonl", "data.corpus: {dir}/bad.jsonl:2: not valid JSON"),
    ("data.corpus={dir}/nowhere.txt", "data.corpus: no such file"),
])
def test_the_dry_run_reads_and_tokenizes_the_corpus(spec, tmp_path, capsys, change, words):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    path = spec()
    fails(capsys, 2, path, "--dry-run", "--set", change.format(dir=tmp_path),
          words=(f"{path}: " + words.format(dir=tmp_path),))


def test_a_cluster_driver_leaves_the_corpus_to_the_replicas_nodes(spec, tmp_path):
    """With --address the corpus (an hf: dataset in the workers' cache, say) need not be on the driver."""
    from sensray.preflight import preflight
    from sensray.spec import load_spec

    missing = load_spec(spec(), [f"data.corpus={tmp_path}/only-on-the-workers.txt"])
    preflight(missing, replicas_here=False)
    with pytest.raises(SpecError, match="data.corpus: no such file"):
        preflight(missing, replicas_here=True)


def test_the_dry_run_checks_the_rungs_against_the_batches(spec, capsys):
    fails(capsys, 2, spec(SMALL + "early_stop: {{top_k: 2, rungs: [0.5]}}\n"), "--dry-run",
          words=("early_stop.rungs: rungs [0.5] need distinct batch boundaries before the last of the 1",))


def test_the_dry_run_checks_the_device(spec, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    fails(capsys, 1, spec(), "--dry-run", "--set", "model.device=cuda",
          words=("model.device: 'cuda' was asked for but no CUDA device is available",))


def test_the_dry_run_checks_that_the_weights_are_there(spec, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL, model)
    (model / "model.safetensors").unlink()
    fails(capsys, 1, spec(SMALL + f"model: {{{{name: {model}}}}}\n"), "--dry-run",
          words=(f"model.name: {model} has no weights",))
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(capsys, 1, spec(SMALL + f"model: {{{{name: {model}}}}}\n"), "--dry-run",
          words=("is missing model-00001-of-00002.safetensors",))


def test_a_sweep_that_fails_at_startup_writes_nothing(spec, results, capsys, monkeypatch):
    from sensray.replica import Replica

    def cannot_load(self, *args, **kwargs):
        raise SensrayError("model.name: cannot load (simulated)")

    monkeypatch.setattr(Replica, "__init__", cannot_load)
    fails(capsys, 1, spec(), "--executor", "local", words=("cannot load (simulated)",))
    assert not results.exists()
