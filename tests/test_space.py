"""Search-space parsing and expansion (Ray Tune vocabulary, no Ray)."""

import numpy as np
import pytest

from sensray.errors import SpecError
from sensray.space import Constant, Each, GridSearch, Normal, Numeric, expand, parse_space, trial_id


def no_each(pattern, path):
    raise AssertionError("no each domain expected")


def test_parse_domains():
    domains = parse_space({"bit": {"grid_search": [1, 2]}, "sigma": {"loguniform": [0.01, 1]}, "mode": "zero",
                           "target": {"each": "blocks.*"}})
    assert isinstance(domains["bit"], GridSearch)
    assert isinstance(domains["sigma"], Numeric) and domains["sigma"].log
    assert domains["mode"] == Constant("zero")
    assert domains["target"] == Each("blocks.*")


@pytest.mark.parametrize(
    "space, path, words",
    [
        ({"bit": {"grid_serch": [1]}}, "space.bit", "did you mean 'grid_search'"),
        ({"sigma": {"uniform": [1]}}, "space.sigma.uniform", "[low, high]"),
        ({"sigma": {"uniform": [2, 1]}}, "space.sigma.uniform", "low must be below high"),
        ({"sigma": {"loguniform": [0, 1]}}, "space.sigma.loguniform", "low > 0"),
        ({"bit": {"grid_search": []}}, "space.bit.grid_search", "non-empty"),
        ({"target": {"each": 3}}, "space.target.each", "pattern"),
    ],
)
def test_bad_domains_name_their_path(space, path, words):
    with pytest.raises(SpecError) as err:
        parse_space(space)
    assert err.value.path == path and words in err.value.message


def test_grid_is_cartesian_and_repeats_per_sample():
    domains = parse_space({"a": {"grid_search": [1, 2, 3]}, "b": {"grid_search": ["x", "y"]}, "s": {"randint": [0, 10**6]}})
    trials = expand(domains, "noise", num_samples=2, seed=0, each=no_each, auto_seed=False)
    assert len(trials) == 12
    assert {(t.params["a"], t.params["b"]) for t in trials} == {(a, b) for a in (1, 2, 3) for b in "xy"}
    assert [t.sample for t in trials] == [0] * 6 + [1] * 6


def test_expansion_is_deterministic_and_seed_sensitive():
    domains = parse_space({"sigma": {"uniform": [0, 1]}, "k": {"choice": [1, 2, 3]}})
    one = expand(domains, "noise", 5, 7, no_each, False)
    two = expand(domains, "noise", 5, 7, no_each, False)
    other = expand(domains, "noise", 5, 8, no_each, False)
    assert [t.params for t in one] == [t.params for t in two]
    assert [t.trial_id for t in one] == [t.trial_id for t in two]
    assert [t.params for t in one] != [t.params for t in other]


def test_numeric_domains_stay_in_bounds():
    domains = parse_space({
        "u": {"uniform": [2, 3]}, "q": {"quniform": [0, 1, 0.25]}, "r": {"randint": [0, 3]},
        "lr": {"lograndint": [1, 100]}, "l": {"loguniform": [1e-4, 1e-1]},
    })
    trials = expand(domains, "noise", 200, 0, no_each, False)
    for t in trials:
        p = t.params
        assert 2 <= p["u"] <= 3 and p["q"] in (0, 0.25, 0.5, 0.75, 1.0)
        assert p["r"] in (0, 1, 2) and isinstance(p["r"], int)  # randint excludes its upper bound, like Tune
        assert 1 <= p["lr"] <= 100 and 1e-4 <= p["l"] <= 1e-1
    assert {t.params["r"] for t in trials} == {0, 1, 2}


def test_randn_draws_normal_values_with_its_mean_and_sd():
    domains = parse_space({"shift": {"randn": [2.0, 0.5]}})
    assert isinstance(domains["shift"], Normal) and (domains["shift"].mean, domains["shift"].sd) == (2.0, 0.5)
    draws = np.array([t.params["shift"] for t in expand(domains, "noise", 2000, 0, no_each, False)])
    assert draws.dtype == np.float64 and len(set(draws)) == 2000
    assert abs(draws.mean() - 2.0) < 0.05 and abs(draws.std() - 0.5) < 0.05  # 2000 draws: a few standard errors
    assert (draws < 2.0 - 1.0).any() and (draws > 2.0 + 1.0).any()  # unbounded: tails beyond 2 sd occur
    again = [t.params["shift"] for t in expand(domains, "noise", 2000, 0, no_each, False)]
    assert again == draws.tolist()  # seeded


@pytest.mark.parametrize("args", [[0.0], [0.0, 0.0], [0.0, -1.0], ["a", 1.0], 3])
def test_randn_needs_a_mean_and_a_positive_sd(args):
    with pytest.raises(SpecError) as err:
        parse_space({"shift": {"randn": args}})
    assert err.value.path == "space.shift.randn" and "expects [mean, sd], finite numbers with sd > 0" in err.value.message


def test_auto_seed_gives_each_sample_its_own_seed():
    domains = parse_space({"target": "blocks.0"})
    trials = expand(domains, "bitflip", 3, 10, no_each, auto_seed=True)
    assert [t.params["seed"] for t in trials] == [10, 11, 12]
    assert len({t.trial_id for t in trials}) == 3


def test_identical_trials_are_an_error():
    domains = parse_space({"target": "blocks.0"})
    with pytest.raises(SpecError, match="identical"):
        expand(domains, "ablation", 2, 0, no_each, auto_seed=False)


def test_each_expands_through_the_callback():
    domains = parse_space({"target": {"each": "blocks.*"}, "bit": 3})
    trials = expand(domains, "bitflip", 1, 0, lambda p, path: ["blocks.0", "blocks.1"], False)
    assert [t.params["target"] for t in trials] == ["blocks.0", "blocks.1"]


def test_trial_id_ignores_key_order_but_not_values():
    assert trial_id("k", {"a": 1, "b": 2}) == trial_id("k", {"b": 2, "a": 1})
    assert trial_id("k", {"a": 1}) != trial_id("k", {"a": 2}) != trial_id("j", {"a": 1})


def test_to_tune_builds_tune_domains():
    from ray import tune  # a dependency of sensray: a missing Ray must fail here, not skip

    from sensray.space import to_tune

    space = to_tune(parse_space({"a": {"grid_search": [1, 2]}, "b": {"loguniform": [0.1, 1]}, "c": 5,
                                 "t": {"each": "x"}, "n": {"randn": [1.0, 0.1]}}), lambda p, path: ["x0", "x1"])
    assert space["a"] == {"grid_search": [1, 2]} and space["c"] == 5
    assert space["t"] == {"grid_search": ["x0", "x1"]}
    assert isinstance(space["b"], tune.search.sample.Float) and (space["b"].lower, space["b"].upper) == (0.1, 1)
    sampler = space["n"].get_sampler()
    assert isinstance(sampler, tune.search.sample.Normal) and (sampler.mean, sampler.sd) == (1.0, 0.1)
