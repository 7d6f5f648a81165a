"""Adaptive studies: a Ray Tune Searcher proposes each trial from the rows so far.

    search: {algorithm: worst-case, metric: delta_ppl, mode: max, num_trials: 200}
    space:
      target: {each: "blocks.*.mlp.*"}
      field: {choice: [exponent_msb, exponent, mantissa]}
      seed: {randint: [0, 1000000]}             # which element: something the search can steer

A fixed space is expanded up front (sensray.space); a search instead asks the searcher for the
next config whenever a replica has room (`SearchFeed.poll`) and tells it each finished row
(`SearchFeed.tell`, called by the driver as the row is journaled). The searcher sees the space as
Tune domains (`space.to_tune`), with grids and `each` as categorical choices, since searchers do
not take grids. Trial ids stay content hashes: a config proposed twice runs once, and the searcher
is told the recorded result. `--resume` replays the journal into the searcher
(`add_evaluated_point`) and spends only the rest of `num_trials`.

Algorithms: `worst-case` (built in, below: no extra packages), `optuna` and `hyperopt` (Tune's
wrappers; `pip install optuna` / `hyperopt`), or any `module:Class` implementing Tune's Searcher.
With several replicas, results arrive in completion order, so an adaptive study is reproducible
in its rows (ids, metrics) but not in which configs it happens to propose.
"""

from __future__ import annotations

import importlib
import math
import sys
from typing import Any, Iterator

import numpy as np

from sensray.errors import SensrayError, SpecError
from sensray.perturbations import PERTURBATIONS, ParamError
from sensray.plan import canonical_params
from sensray.space import Trial, _plain, parse_space, to_tune, trial_id
from sensray.spec import ExperimentSpec
from sensray.targets import TargetError, each

ALGORITHMS = {
    "worst-case": "sensray.executors.search:WorstCaseSearch",
    "optuna": "ray.tune.search.optuna:OptunaSearch",
    "hyperopt": "ray.tune.search.hyperopt:HyperOptSearch",
}
MAX_REPEATS = 50  # proposals in a row that were already run before the search is called exhausted


class SearchFeed:
    """Trials proposed one at a time by a Tune Searcher, for any executor (see sensray.executors.feed)."""

    def __init__(self, spec: ExperimentSpec, done: list[dict] = (), model=None, log=None):
        from sensray.models import meta_model

        self.spec, self.search = spec, spec.search
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.model = model if model is not None else meta_model(spec.model)
        self.kind = PERTURBATIONS.get(spec.perturbation)
        domains = parse_space(spec.space)
        self.names = list(domains)
        self.auto_seed = "seed" in self.kind.Params.model_fields and "seed" not in domains
        self.searcher = make_searcher(spec, searcher_space(domains, self._components))
        self.tune_ids: dict[str, str] = {}  # sensray trial id -> the searcher's id for it
        self.results: dict[str, float | None] = {}  # sensray trial id -> metric (None: failed)
        self.count, self.exhausted = 0, False
        self._replay(done)

    # -- the feed protocol ---------------------------------------------------------------------

    def poll(self) -> Trial | None:
        """The searcher's next trial; None while it waits for results, or when the search is over."""
        for _ in range(MAX_REPEATS):
            if self.finished():
                return None
            tune_id = f"{self.count:06d}-{len(self.tune_ids) + len(self.results)}"
            config = self.searcher.suggest(tune_id)
            if config is None:
                return None
            if config == "FINISHED":  # Searcher.FINISHED
                self.exhausted = True
                return None
            proposed = {name: _plain(config[name]) for name in self.names}
            if self.auto_seed:
                proposed["seed"] = self.spec.seed + self.count
            params = self._canonical(proposed)
            if params is None:
                self._complete(tune_id, proposed, None)
                continue
            trial = Trial(trial_id(self.kind_name, params), self.kind_name, params, self.count)
            if trial.trial_id in self.tune_ids:  # proposed before: run once, answer from the table
                self._complete(tune_id, params, self.results.get(trial.trial_id))
                continue
            if not self._valid(params):
                self._complete(tune_id, params, None)
                continue
            self.tune_ids[trial.trial_id] = tune_id
            self.count += 1
            return trial
        self.log(f"search: the searcher proposed {MAX_REPEATS} configs in a row that had run already; stopping "
                 f"after {self.count} of {self.search.num_trials} trials")
        self.exhausted = True
        return None

    def finished(self) -> bool:
        return self.exhausted or self.count >= self.search.num_trials

    def __len__(self) -> int:
        """Trials left in the budget."""
        return 0 if self.exhausted else max(0, self.search.num_trials - self.count)

    def tell(self, row: dict) -> None:
        """A finished row, as the driver journals it: the searcher learns its metric."""
        tid = row["trial_id"]
        value = _metric(row, self.search.metric)
        self.results[tid] = value
        if tid in self.tune_ids:
            self._complete(self.tune_ids[tid], {n: row.get(n) for n in self.names}, value)

    def __iter__(self) -> Iterator[Trial]:
        """One trial at a time, each told before the next is asked for (the local executor)."""
        while not self.finished():
            trial = self.poll()
            if trial is None:
                if self.finished():
                    return
                raise SensrayError(f"search: {self.search.algorithm} proposed nothing with no trial in flight")
            yield trial

    # -- helpers -------------------------------------------------------------------------------

    @property
    def kind_name(self) -> str:
        return self.spec.perturbation

    def _components(self, pattern: str, path: str) -> list[str]:
        try:
            return each(self.model, pattern)
        except TargetError as err:
            raise SpecError(path, str(err)) from None

    def _canonical(self, params: dict) -> dict | None:
        """The params as the kind reads them (what the trial id hashes, as in a plan); None if it rejects them."""
        try:
            return canonical_params(self.kind, params)
        except ParamError as err:
            self.log(f"search: skipping a proposal the kind cannot take ({err}): {params}")
            return None

    def _valid(self, params: dict) -> bool:
        try:
            self.kind.check(self.model, self.kind.parse(params))
            return True
        except ParamError as err:
            self.log(f"search: skipping a proposal the model cannot take ({err}): {params}")
            return False

    def _complete(self, tune_id: str, params: dict, value: float | None) -> None:
        result = None if value is None else {self.search.metric: value, **params}
        self.searcher.on_trial_complete(tune_id, result=result, error=value is None)

    def _replay(self, done: list[dict]) -> None:
        """Rows of an earlier run of this study: they count toward num_trials and inform the searcher."""
        told = True
        for row in sorted(done, key=lambda r: r.get("sample") or 0):
            value = _metric(row, self.search.metric)
            self.tune_ids[row["trial_id"]] = f"earlier-{row['trial_id']}"
            self.results[row["trial_id"]] = value
            self.count += 1
            if told:
                try:
                    params = {n: row.get(n) for n in self.names}
                    self.searcher.add_evaluated_point(params, value if value is not None else 0.0,
                                                      error=value is None)
                except NotImplementedError:
                    told = False
                    self.log(f"search: {type(self.searcher).__name__} cannot be told earlier results; "
                             "it continues without them")


def _metric(row: dict, metric: str) -> float | None:
    value = row.get(metric)
    if row.get("error") is not None or value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def searcher_space(domains, components) -> dict[str, Any]:
    """The spec's space as Tune domains, grids (and `each`) as categorical choices."""
    from ray import tune

    space = to_tune(domains, components)
    return {name: tune.choice(list(value["grid_search"])) if isinstance(value, dict) and "grid_search" in value
            else value for name, value in space.items()}


def make_searcher(spec: ExperimentSpec, space: dict[str, Any]):
    """The spec's searcher, constructed with search.options and given the metric, mode and space."""
    search = spec.search
    path = ALGORITHMS.get(search.algorithm, search.algorithm)
    if ":" not in path:
        raise SpecError("search.algorithm", f"unknown searcher {search.algorithm!r}; use {', '.join(ALGORITHMS)} "
                                            "or module:Class (a ray.tune.search.Searcher)")
    module, _, name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise SpecError("search.algorithm", f"cannot import {path}: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, _searcher_base())):
        raise SpecError("search.algorithm", f"{path} is not a ray.tune.search.Searcher")
    options = dict(search.options)
    if cls is WorstCaseSearch:
        options.setdefault("seed", spec.seed)
    try:
        searcher = cls(**options)
    except (AssertionError, ImportError) as err:  # Tune's wrappers assert that their package is installed
        raise SpecError("search.algorithm", f"{search.algorithm}: {err}") from None
    except (TypeError, ValueError) as err:
        raise SpecError("search.options", f"{search.algorithm}: {err}") from None
    if not searcher.set_search_properties(search.metric, search.mode, space):
        raise SpecError("search.algorithm", f"{search.algorithm} did not accept the space (was it given one already?)")
    return searcher


def _searcher_base():
    from ray.tune.search import Searcher

    return Searcher


class WorstCaseSearch(_searcher_base()):
    """Evolutionary local search for the configs that push `metric` furthest (mode max: most damaging).

    The first `initial` proposals are random points of the space. After that, each is either a
    random point (probability `explore`) or one of the `top` best results so far with one
    parameter changed: another category, or a nearby number (a step of about 1/8 of its range,
    on a log scale for log domains). No packages beyond Ray.
    """

    def __init__(self, metric: str | None = None, mode: str | None = None, seed: int = 0, initial: int = 16,
                 top: int = 8, explore: float = 0.2):
        super().__init__(metric=metric, mode=mode)
        self.rng = np.random.default_rng(seed)
        self.initial, self.top, self.explore = initial, top, explore
        self.space: dict[str, Any] = {}
        self.suggested = 0
        self.pending: dict[str, dict] = {}
        self.scored: list[tuple[float, dict]] = []

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        if self.space:
            return False
        self._metric, self._mode, self.space = metric or self._metric, mode or self._mode, dict(config)
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if self.suggested < self.initial or not self.scored or self.rng.random() < self.explore:
            config = self._random()
        else:
            config = self._mutate(self._parent())
        self.suggested += 1
        self.pending[trial_id] = config
        return dict(config)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        config = self.pending.pop(trial_id, None)
        if config is not None and not error and result and result.get(self._metric) is not None:
            self._record(config, float(result[self._metric]))

    def add_evaluated_point(self, parameters: dict, value: float, error: bool = False, pruned: bool = False,
                            intermediate_values=None) -> None:
        if not error:
            self._record(dict(parameters), float(value))

    def _record(self, config: dict, value: float) -> None:
        if not math.isnan(value):
            self.scored.append((value if self._mode == "max" else -value, config))

    def _parent(self) -> dict:
        best = sorted(self.scored, key=lambda item: item[0], reverse=True)[: self.top]
        return best[int(self.rng.integers(len(best)))][1]

    def _random(self) -> dict:
        from ray.tune.search.sample import Domain

        return {name: _plain(d.sample(random_state=self.rng)) if isinstance(d, Domain) else d
                for name, d in self.space.items()}

    def _mutate(self, parent: dict) -> dict:
        from ray.tune.search.sample import Domain

        names = [name for name, d in self.space.items() if isinstance(d, Domain)]
        if not names:
            return dict(parent)
        name = names[int(self.rng.integers(len(names)))]
        return {**parent, name: _plain(_neighbour(self.space[name], parent[name], self.rng))}


def _neighbour(domain, value, rng: np.random.Generator):
    """A value of `domain` near `value`: another category, or a step of ~1/8 of the range."""
    from ray.tune.search.sample import Categorical, Integer, LogUniform, Normal, Quantized

    if isinstance(domain, Categorical):
        others = [c for c in domain.categories if c != value]
        return others[int(rng.integers(len(others)))] if others else value
    sampler = domain.get_sampler()
    q = sampler.q if isinstance(sampler, Quantized) else None
    base = sampler.get_sampler() if isinstance(sampler, Quantized) else sampler
    low, high = domain.lower, domain.upper
    if isinstance(base, Normal):
        new = value + rng.normal(0.0, base.sd / 2)
    elif isinstance(base, LogUniform):
        new = math.exp(math.log(value) + rng.normal(0.0, math.log(high / low) / 8))
    else:
        new = value + rng.normal(0.0, (high - low) / 8)
    if isinstance(domain, Integer):
        step = int(q or 1)
        top = high if q else high - 1  # Tune: randint/lograndint exclude the upper bound, q-variants include it
        new = int(min(max(round(new / step) * step, low), top))
        if new == value:  # a step too small to move: move by one quantum
            new = value + step if value + step <= top else max(low, value - step)
        return new
    if q:
        new = round(new / q) * q
    return float(min(max(new, low), high)) if math.isfinite(low) and math.isfinite(high) else float(new)
