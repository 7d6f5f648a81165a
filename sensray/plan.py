"""From a validated spec to the list of trials, checked against the model before anything runs.

Targets are resolved on a meta-device model built from the config alone (no weights), so a
typo in a 7B study fails in a second on a laptop instead of after a cluster has loaded it.
The config also bounds the eval windows (`data.seq_len` within the model's context) and the
space is counted before it is expanded (`max_trials`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from sensray.adapters import UnsupportedArchitecture, adapter_for
from sensray.errors import SpecError, shorten
from sensray.models import context_length, meta_model
from sensray.perturbations import PERTURBATIONS, ParamError
from sensray.perturbations.base import NotApplicable
from sensray.space import Trial, expand, parse_space
from sensray.spec import ExperimentSpec
from sensray.targets import TargetError, each

MAX_TRIALS = 1_000_000  # the default limit on a sweep's size (sweep --max-trials)


@dataclass(frozen=True)
class Plan:
    spec: ExperimentSpec
    trials: list[Trial]
    left_out: tuple[str, ...] = ()  # why each trial the model's format cannot express was left out


def make_plan(spec: ExperimentSpec, model: nn.Module | None = None, max_trials: int = MAX_TRIALS,
              skip_not_applicable: bool = False) -> Plan:
    """Expand the space and validate every trial against `model` (default: the spec's meta model).
    A trial this model's storage format cannot express (`NotApplicable`) is an error, or, for one
    format of a format study (`skip_not_applicable`), left out of the plan."""
    model = model if model is not None else meta_model(spec.model)
    try:
        adapter_for(model.config)
    except UnsupportedArchitecture as err:
        raise SpecError("model.name", str(err)) from None
    check_context(spec, model.config)
    kind = PERTURBATIONS.get(spec.perturbation)
    domains = parse_space(spec.space)

    def components(pattern: str, path: str) -> list[str]:
        try:
            return each(model, pattern)
        except TargetError as err:
            raise SpecError(path, str(err)) from None

    if spec.search is not None and spec.search.num_trials > max_trials:
        raise SpecError("search.num_trials", f"{spec.search.num_trials:,} trials is more than the limit of "
                                             f"{max_trials:,}; raise the limit with --max-trials")

    def canonical(params: dict[str, Any]) -> dict[str, Any]:
        try:
            return canonical_params(kind, params)
        except ParamError as err:
            raise _param_error(err, params) from None

    auto_seed = "seed" in kind.Params.model_fields and "seed" not in domains
    trials = expand(domains, spec.perturbation, spec.num_samples, spec.seed, components, auto_seed, canonical,
                    max_trials)
    checked: dict[str, str | None] = {}  # params -> why not applicable (None: fine)
    kept, left_out = [], []
    for trial in trials:
        try:
            params = kind.parse(trial.params)
            key = params.model_dump_json()
            if key not in checked:  # many trials differ only in seed: check each distinct shape once
                checked[key] = _not_applicable(kind, model, params, skip_not_applicable)
        except ParamError as err:
            raise _param_error(err, trial.params) from None
        if checked[key] is None:
            kept.append(trial)
        else:
            left_out.append(checked[key])
    return Plan(spec, kept if left_out else trials, tuple(left_out))


def _not_applicable(kind, model: nn.Module, params, skip: bool) -> str | None:
    """Check one trial's parameters; why the format cannot express it when that is to be skipped."""
    try:
        kind.check(model, params)
    except NotApplicable as err:
        if skip:
            return str(err)
        raise
    return None


def canonical_params(kind, params: dict[str, Any]) -> dict[str, Any]:
    """`params` as the kind reads them (`sigma: 1` -> 1.0), in the order given: what a trial id hashes."""
    parsed = kind.parse(params).model_dump()
    return {name: parsed[name] for name in params}


def check_context(spec: ExperimentSpec, config) -> None:
    """The eval windows must fit the model's context (a longer window fails, or measures nonsense)."""
    limit = context_length(config)
    if limit is not None and spec.data.seq_len > limit[1]:
        raise SpecError("data.seq_len", f"{spec.data.seq_len} tokens is longer than the context of "
                                        f"{spec.model.name!r} ({limit[0]} = {limit[1]}); use at most {limit[1]}")


def _param_error(err: ParamError, params: dict[str, Any]) -> SpecError:
    return SpecError(f"space.{err.param}" if err.param else "space", f"{err} (in trial {shorten(params, 300)})")
