"""Adaptive studies: a Tune Searcher proposes the trials. The built-in worst-case search on a known
objective, its steps inside every domain, and searches run end to end (local executor, so that
the order of results, hence the proposals, is deterministic): budget, repeats, resume, errors.
The same search on the Ray pool is in test_ray.py."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean

import numpy as np
import polars as pl
import pytest
from sensray.results import Journal
from sensray.sweep import main

SEARCH = """\
name: worst
model: {{name: "{model}"}}
data: {{corpus: "{corpus}", seq_len: 32, num_sequences: 2, batch_size: 2}}
perturbation: bitflip
space:
  target: {{each: "blocks.*.mlp.*"}}
  bit: {{randint: [20, 32]}}
  count: 1
  seed: {{randint: [0, 1000000]}}
search: {{algorithm: worst-case, metric: kl, mode: max, num_trials: {n}, options: {{initial: 8}}}}
output_dir: "{out}"
"""


def write(tmp_path, tiny, n=24, **replace):
    text = SEARCH.format(model=tiny[0], corpus=tiny[1], out=tmp_path / "results", n=n)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "search.yaml"
    path.write_text(text)
    return path


def run_dir(out: str) -> Path:
    return Path(out.strip().splitlines()[-1])


# -- fixed spaces: sensray's expansion is Tune's ---------------------------------------------------


def test_the_expansion_matches_tunes_variant_generator():
    """sensray expands spaces without Ray (the local executor runs where Ray is absent); the trials it
    makes are the grid Tune's BasicVariantGenerator makes from the same space, num_samples times."""
    from ray.tune.search.variant_generator import generate_variants

    from sensray.space import expand, parse_space, to_tune

    blocks = ["blocks.0", "blocks.1", "blocks.2"]
    domains = parse_space({"target": {"each": "blocks.*"}, "mode": {"grid_search": ["zero", "mean"]},
                           "sigma": {"loguniform": [0.001, 1.0]}, "seed": {"randint": [0, 10]}, "relative": True})
    ours = expand(domains, "noise", num_samples=3, seed=0, each=lambda pattern, path: blocks, auto_seed=False)
    tune_space = to_tune(domains, lambda pattern, path: blocks)
    rng = np.random.default_rng(0)
    theirs = [config for _ in range(3) for _, config in generate_variants(tune_space, random_state=rng)]
    assert len(ours) == len(theirs) == 3 * 3 * 2
    grid = lambda configs: sorted((c["target"], c["mode"]) for c in configs)  # noqa: E731
    assert grid([t.params for t in ours]) == grid(theirs)
    for config in [t.params for t in ours] + theirs:
        assert 0.001 <= config["sigma"] <= 1.0 and 0 <= config["seed"] < 10 and config["relative"] is True


# -- the built-in searcher -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["max", "min"])
def test_worst_case_search_climbs_a_known_objective(mode):
    from ray import tune

    from sensray.executors.search import WorstCaseSearch

    def score(c):  # best (max) at x = 0.3, k = b, n = 9: 2.0
        value = -(c["x"] - 0.3) ** 2 + (c["k"] == "b") + c["n"] / 9
        return value if mode == "max" else -value

    searcher = WorstCaseSearch(seed=0, initial=10)
    assert searcher.set_search_properties("score", mode, {
        "x": tune.uniform(0, 1), "k": tune.choice(["a", "b", "c"]), "n": tune.randint(0, 10), "fixed": 5})
    scores = []
    for i in range(150):
        config = searcher.suggest(str(i))
        assert 0 <= config["x"] <= 1 and config["k"] in "abc" and 0 <= config["n"] <= 9 and config["fixed"] == 5
        searcher.on_trial_complete(str(i), {"score": score(config)})
        scores.append(score(config) if mode == "max" else -score(config))
    assert mean(scores[-50:]) > mean(scores[:10]) + 0.5  # it learned
    assert max(scores) > 1.9


@pytest.mark.parametrize("domain", ["loguniform", "qloguniform", "lograndint", "randint", "qrandint", "randn",
                                    "quniform"])
def test_worst_case_steps_stay_inside_the_domain(domain):
    from ray import tune

    from sensray.executors.search import _neighbour

    d = {"loguniform": tune.loguniform(1e-4, 1.0), "qloguniform": tune.qloguniform(1e-3, 1.0, 1e-3),
         "lograndint": tune.lograndint(1, 1000), "randint": tune.randint(0, 4), "qrandint": tune.qrandint(0, 20, 5),
         "randn": tune.randn(0.0, 2.0), "quniform": tune.quniform(0.0, 1.0, 0.25)}[domain]
    rng = np.random.default_rng(0)
    value = d.sample(random_state=rng)
    for _ in range(300):
        new = _neighbour(d, value, rng)
        if domain == "randn":
            assert isinstance(new, float) and math.isfinite(new) and new != value  # unbounded, but a step
        else:
            top = d.upper - 1 if domain in ("randint", "lograndint") else d.upper  # as Tune samples them
            assert d.lower <= new <= top, (domain, new)
        if domain.startswith("q"):
            q = d.get_sampler().q
            assert abs(new / q - round(new / q)) < 1e-6
        if domain in ("randint", "qrandint", "lograndint"):
            assert isinstance(new, int)
        value = new


# -- searches end to end -------------------------------------------------------------------------------


def test_a_search_runs_its_budget_reproducibly(tiny, tmp_path, capsys):
    spec = write(tmp_path, tiny, n=16)
    tables = []
    for _ in range(2):
        assert main([str(spec), "--executor", "local"]) == 0
        out = capsys.readouterr()
        tables.append(pl.read_parquet(run_dir(out.out) / "trials.parquet"))
    table = tables[0]
    assert table.height == 16 and table["trial_id"].n_unique() == 16 and table["error"].is_null().all()
    assert table["sample"].to_list() == list(range(16))  # in the order proposed
    assert tables[1]["trial_id"].to_list() == table["trial_id"].to_list()  # same spec, same trials
    assert set(table["bit"]) <= set(range(20, 32)) and table["kl"].max() > 0
    assert "16 trials (16 to run)" in out.err and "[16/16]" in out.err


def test_a_search_that_only_repeats_itself_stops(tiny, tmp_path, capsys):
    # 2 bits x 2 targets: the fifth distinct config does not exist; repeats are answered from the table
    spec = write(tmp_path, tiny, n=10, **{'{each: "blocks.*.mlp.*"}': "{choice: [blocks.0.mlp.up, blocks.1.mlp.up]}",
                                          "{randint: [20, 32]}": "{choice: [30, 31]}",
                                          "{randint: [0, 1000000]}": "0"})
    assert main([str(spec), "--executor", "local"]) == 0
    out = capsys.readouterr()
    table = pl.read_parquet(run_dir(out.out) / "trials.parquet")
    assert table.height == 4 and table["trial_id"].n_unique() == 4
    assert "configs in a row that had run already; stopping after 4 of 10" in out.err


def test_an_interrupted_search_resumes_with_the_rest_of_its_budget(tiny, tmp_path, monkeypatch, capsys):
    spec = write(tmp_path, tiny, n=20)
    written, append = [], Journal.append

    def interrupt_after_six(self, row):
        if len(written) == 6:
            raise KeyboardInterrupt
        written.append(row)
        append(self, row)

    monkeypatch.setattr(Journal, "append", interrupt_after_six)
    assert main([str(spec), "--executor", "local"]) == 130
    monkeypatch.undo()
    run = next((tmp_path / "results" / "worst").iterdir())
    capsys.readouterr()
    assert main([str(spec), "--executor", "local", "--resume", str(run)]) == 0
    out = capsys.readouterr()
    assert "20 trials (14 to run)" in out.err and "cannot be told" not in out.err
    table = pl.read_parquet(run / "trials.parquet")
    assert table.height == 20 and table["trial_id"].n_unique() == 20
    assert table["trial_id"].to_list()[:6] == [row["trial_id"] for row in written]
    assert sorted(table["sample"]) == list(range(20))


@pytest.mark.parametrize("algorithm, path, words", [
    ("wrost-case", "search.algorithm", "expected worst-case, optuna, hyperopt, or module:Class"),
    ("optuna", "search.algorithm", "pip install optuna"),
    ("json:JSONDecoder", "search.algorithm", "is not a ray.tune.search.Searcher"),
])
def test_search_errors_exit_2_before_anything_runs(tiny, tmp_path, capsys, algorithm, path, words):
    if algorithm == "optuna":
        try:
            import optuna  # noqa: F401

            pytest.skip("optuna is installed")
        except ImportError:
            pass
    spec = write(tmp_path, tiny, **{"algorithm: worst-case": f"algorithm: {algorithm}", "{initial: 8}": "{}"})
    assert main([str(spec), "--executor", "local", "--allow-searcher-import"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and words in err
    assert not (tmp_path / "results").exists()


def test_search_and_num_samples_do_not_mix(tiny, tmp_path, capsys):
    spec = write(tmp_path, tiny)
    spec.write_text(spec.read_text() + "num_samples: 3\n")
    assert main([str(spec), "--dry-run"]) == 2
    assert "give search.num_trials or num_samples, not both" in capsys.readouterr().err


def test_dry_run_of_a_search(tiny, tmp_path, capsys):
    assert main([str(write(tmp_path, tiny)), "--dry-run"]) == 0
    assert "up to 24 trials, proposed by worst-case (max kl)" in capsys.readouterr().out
