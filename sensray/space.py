"""Search spaces in Ray Tune's vocabulary, written as YAML, expanded without Ray.

    space:
      target: {each: "blocks.*"}              # sensray: one grid value per component matched
      bit: {grid_search: [30, 31]}
      sigma: {loguniform: [0.001, 1.0]}
      seed: {randint: [0, 1000]}

Expansion follows Tune's BasicVariantGenerator: the grid axes form a cartesian product,
the whole grid is repeated `num_samples` times, and every random domain is drawn once per
trial. The expansion lives here, not in Ray, because the local executor runs where Ray is
not installed (the GPU machine); `to_tune()` gives the same space in Tune's objects.

Random draws use an RNG keyed by (spec seed, sample, grid index), so a trial's values do not
depend on the order in which trials are generated or on the machine.

The number of trials is computed from the axes' lengths before any trial is built, and a space
larger than `max_trials` is an error, not a hang: a grid is a product, and products grow fast.
Domain bounds must be finite numbers a generator can draw from (int64 for integer domains).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sensray.errors import SpecError, shorten
from sensray.registry import Registry

INT64 = (-(2**63), 2**63 - 1)  # what numpy's integer draws (and torch's seeds) can hold


class Domain:
    """A value source for one parameter. `grid` domains expand; the others are sampled."""

    grid = False

    def sample(self, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def extremes(self) -> list[Any]:
        """Values that bound what this domain can produce, to validate before running."""
        raise NotImplementedError


DOMAINS: Registry[Callable[[Any, str], Domain]] = Registry("search-space domain")


@dataclass(frozen=True)
class Constant(Domain):
    value: Any

    def sample(self, rng):
        return self.value

    def extremes(self):
        return [self.value]


@dataclass(frozen=True)
class GridSearch(Domain):
    values: tuple
    grid = True

    def extremes(self):
        return list(self.values)


@dataclass(frozen=True)
class Each(Domain):
    """sensray's extension: a grid over the model components a pattern matches (needs a model)."""

    pattern: str
    grid = True

    def extremes(self):
        return []


@dataclass(frozen=True)
class Choice(Domain):
    values: tuple

    def sample(self, rng):
        return self.values[int(rng.integers(len(self.values)))]

    def extremes(self):
        return list(self.values)


@dataclass(frozen=True)
class Numeric(Domain):
    low: float
    high: float
    q: float | None = None
    log: bool = False
    integer: bool = False

    def sample(self, rng):
        if self.integer and not self.log:
            # Tune's randint excludes the upper bound.
            value = int(rng.integers(self.low, self.high))
        elif self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = float(rng.uniform(self.low, self.high))
        if self.q is not None:
            value = round(value / self.q) * self.q
        if self.integer:
            return int(min(max(round(value), self.low), self.high - (0 if self.log else 1)))
        return float(value)

    def extremes(self):
        top = self.high - 1 if self.integer and not self.log else self.high
        return [int(self.low), int(top)] if self.integer else [float(self.low), float(top)]


@dataclass(frozen=True)
class Normal(Domain):
    mean: float
    sd: float

    def sample(self, rng):
        return float(rng.normal(self.mean, self.sd))

    def extremes(self):
        return []


def _bounds(arity: int, integer=False, log=False, quantized=False):
    def build(args: Any, path: str) -> Domain:
        shape = "[low, high, q]" if quantized else "[low, high]"
        if not isinstance(args, list) or len(args) != arity or not all(_is_number(a) for a in args):
            raise SpecError(path, f"expects a list {shape} of numbers, got {shorten(args)}")
        if integer and not all(isinstance(a, int) for a in args):
            raise SpecError(path, f"expects a list {shape} of whole numbers (an integer domain), got {shorten(args)}")
        if not all(_finite(a) for a in args):
            raise SpecError(path, f"bounds must be finite numbers, got {shorten(args)}")
        low, high = args[0], args[1]
        if not low < high:
            raise SpecError(path, f"low must be below high, got {shorten(args)}")
        if integer and not (INT64[0] <= low and high <= INT64[1]):
            raise SpecError(path, f"bounds must fit in a 64-bit integer ({INT64[0]} .. {INT64[1]}), got {shorten(args)}")
        if not integer and not _finite(high - low):
            raise SpecError(path, f"the range {shorten(args)} is too wide to draw from (high - low overflows)")
        if log and low <= 0:
            raise SpecError(path, f"log domains need low > 0, got {low!r}")
        q = args[2] if quantized else None
        if q is not None and q <= 0:
            raise SpecError(path, f"q (the step) must be above 0, got {q!r}")
        return Numeric(low, high, q=q, log=log, integer=integer)

    return build


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: int | float) -> bool:
    """Not NaN or infinite, and within float range (YAML ints are unbounded: 10**400 is one)."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False



def _values(cls):
    def build(args: Any, path: str) -> Domain:
        if not isinstance(args, list) or not args:
            raise SpecError(path, f"expects a non-empty list of values, got {shorten(args)}")
        return cls(tuple(args))

    return build


def _each(args: Any, path: str) -> Domain:
    if not isinstance(args, str) or not args:
        raise SpecError(path, f"expects a target pattern such as 'blocks.*', got {shorten(args)}")
    return Each(args)


def _randn(args: Any, path: str) -> Domain:
    if (not isinstance(args, list) or len(args) != 2 or not all(_is_number(a) and _finite(a) for a in args)
            or args[1] <= 0):
        raise SpecError(path, f"expects [mean, sd], finite numbers with sd > 0, got {shorten(args)}")
    return Normal(*args)


for _name, _build in {
    "grid_search": _values(GridSearch),
    "choice": _values(Choice),
    "each": _each,
    "uniform": _bounds(2),
    "quniform": _bounds(3, quantized=True),
    "loguniform": _bounds(2, log=True),
    "qloguniform": _bounds(3, log=True, quantized=True),
    "randint": _bounds(2, integer=True),
    "qrandint": _bounds(3, integer=True, quantized=True),
    "lograndint": _bounds(2, integer=True, log=True),
    "randn": _randn,
}.items():
    DOMAINS.register(_name)(_build)


def parse_space(space: dict[str, Any]) -> dict[str, Domain]:
    """YAML mapping -> {param: Domain}. A one-key mapping naming a domain is a domain; anything else a constant."""
    domains = {}
    for name, value in space.items():
        path = f"space.{name}"
        if isinstance(value, dict) and len(value) == 1:
            (key, args), = value.items()
            if key not in DOMAINS:
                raise SpecError(path, DOMAINS.unknown(key))
            domains[name] = DOMAINS.get(key)(args, f"{path}.{key}")
        else:
            domains[name] = Constant(value)
    return domains


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: a perturbation kind and its parameters."""

    trial_id: str
    kind: str
    params: dict[str, Any]
    sample: int
    # Early stopping only (sensray.early_stop): per rung, the score below which this trial stops
    # (None: no bound yet). Not part of the trial's identity or its row's config.
    bounds: tuple[float | None, ...] | None = field(default=None, compare=False)
    # lm-eval tasks (sensray.tasks.selection): the driver marks the trials that score them.
    tasks: bool = field(default=False, compare=False)

    def config(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "kind": self.kind, "sample": self.sample, **self.params}


def trial_id(kind: str, params: dict[str, Any]) -> str:
    """A stable id: the hash of the resolved config, so the same spec always yields the same ids."""
    blob = json.dumps({"kind": kind, "params": params}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand(
    domains: dict[str, Domain],
    kind: str,
    num_samples: int,
    seed: int,
    each: Callable[[str, str], list[str]],
    auto_seed: bool,
    canonical: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    max_trials: int | None = None,
) -> list[Trial]:
    """Every trial of the space, in a stable order.

    `each(pattern, path)` lists the components a pattern matches (it needs the model).
    `auto_seed`: the kind takes a `seed` the space leaves open, so each sample gets its own.
    `canonical(params)`: the params as the kind reads them (`sigma: 1` and `sigma: 1.0` are one
    trial), applied before hashing. `max_trials`: a larger space is a SpecError, raised before
    any trial is built.
    """
    axes = grid_axes(domains, each)
    if max_trials is not None:
        check_size(axes, num_samples, max_trials)
    trials, seen = [], {}
    for sample in range(num_samples):
        for index, point in enumerate(itertools.product(*axes.values())):
            rng = np.random.default_rng([seed, sample, index])
            chosen = dict(zip(axes, point))
            params = {
                name: chosen[name] if name in chosen else _plain(domain.sample(rng))
                for name, domain in domains.items()
            }
            if auto_seed:
                params["seed"] = seed + sample
            if canonical is not None:
                params = canonical(params)
            tid = trial_id(kind, params)
            if tid in seen:
                raise SpecError(
                    "space",
                    f"trials {seen[tid]} and {len(trials)} are identical ({shorten(params, 300)}); "
                    "num_samples > 1 needs a random domain or a seed that varies",
                )
            seen[tid] = len(trials)
            trials.append(Trial(tid, kind, params, sample))
    return trials


def grid_axes(domains: dict[str, Domain], each: Callable[[str, str], list[str]]) -> dict[str, list]:
    """The grid's axes: each grid domain's values (`each`: the components its pattern matches)."""
    axes = {}
    for name, domain in domains.items():
        if isinstance(domain, Each):
            axes[name] = each(domain.pattern, f"space.{name}.each")
        elif domain.grid:
            axes[name] = list(domain.values)
    return axes


def check_size(axes: dict[str, list], repeats: int, max_trials: int) -> int:
    """The number of trials (grid points x repeats), computed without building any; at most max_trials."""
    count = math.prod(len(values) for values in axes.values()) * repeats
    if count > max_trials:
        factors = " x ".join([f"{name} {len(values)}" for name, values in axes.items()] + [f"num_samples {repeats}"])
        raise SpecError("space", f"expands to {count:,} trials ({factors}), more than the limit of {max_trials:,}; "
                                 "make the grid smaller, or raise the limit with --max-trials")
    return count


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so configs hash and serialize the same everywhere."""
    return value.item() if isinstance(value, np.generic) else value


def to_tune(domains: dict[str, Domain], each: Callable[[str, str], list[str]]) -> dict[str, Any]:
    """The same space as Ray Tune objects (for Tune's searchers); imports Ray lazily."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, d in domains.items():
        if isinstance(d, Each):
            out[name] = tune.grid_search(each(d.pattern, f"space.{name}.each"))
        elif isinstance(d, GridSearch):
            out[name] = tune.grid_search(list(d.values))
        elif isinstance(d, Choice):
            out[name] = tune.choice(list(d.values))
        elif isinstance(d, Normal):
            out[name] = tune.randn(d.mean, d.sd)
        elif isinstance(d, Numeric):
            out[name] = _tune_numeric(tune, d)
        else:
            out[name] = d.value
    return out


def _tune_numeric(tune, d: Numeric):
    if d.integer:
        if d.log:
            return tune.lograndint(int(d.low), int(d.high))
        return tune.qrandint(int(d.low), int(d.high), int(d.q)) if d.q else tune.randint(int(d.low), int(d.high))
    if d.log:
        return tune.qloguniform(d.low, d.high, d.q) if d.q else tune.loguniform(d.low, d.high)
    return tune.quniform(d.low, d.high, d.q) if d.q else tune.uniform(d.low, d.high)
