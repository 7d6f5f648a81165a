"""From a validated spec to the list of trials, checked against the model before anything runs.

Targets are resolved on a meta-device model built from the config alone (no weights), so a
typo in a 7B study fails in a second on a laptop instead of after a cluster has loaded it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sensray.architectures import UnsupportedArchitecture, adapter_for
from sensray.errors import SpecError
from sensray.models import meta_model
from sensray.perturbations import PERTURBATIONS, ParamError
from sensray.space import Trial, expand, parse_space
from sensray.spec import ExperimentSpec
from sensray.targets import TargetError, each


@dataclass(frozen=True)
class Plan:
    spec: ExperimentSpec
    trials: list[Trial]


def make_plan(spec: ExperimentSpec, model: nn.Module | None = None) -> Plan:
    """Expand the space and validate every trial against `model` (default: the spec's meta model)."""
    model = model if model is not None else meta_model(spec.model)
    try:
        adapter_for(model.config)
    except UnsupportedArchitecture as err:
        raise SpecError("model.name", str(err)) from None
    kind = PERTURBATIONS.get(spec.perturbation)
    domains = parse_space(spec.space)

    def components(pattern: str, path: str) -> list[str]:
        try:
            return each(model, pattern)
        except TargetError as err:
            raise SpecError(path, str(err)) from None

    auto_seed = "seed" in kind.Params.model_fields and "seed" not in domains
    trials = expand(domains, spec.perturbation, spec.num_samples, spec.seed, components, auto_seed)
    checked: dict[str, None] = {}
    for trial in trials:
        try:
            params = kind.parse(trial.params)
            key = params.model_dump_json()
            if key not in checked:  # many trials differ only in seed: check each distinct shape once
                kind.check(model, params)
                checked[key] = None
        except ParamError as err:
            raise SpecError(f"space.{err.param}" if err.param else "space", f"{err} (in trial {trial.params})") from None
    return Plan(spec, trials)
