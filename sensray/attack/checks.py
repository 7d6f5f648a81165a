"""Everything `sensray attack` checks before it loads a weight (what --dry-run runs, and a real run first).

    meta = check_attack(spec, replicas_here=True)      # SpecError naming the spec key, exit 2

Beyond the spec's own validation (a budget of 0, a ppl target at or below the clean model's, a top-1
level that can never be crossed): the weights must have gradients (floats, or bitsandbytes' quantized
storage, differentiated through its dequantized weight: sensray.quantized.gradients), the target must
resolve on the model's structure (a meta model: no weights), the field or bit must exist in some
selected tensor's storage (else there is no candidate bit), the random baseline's
largest count must be drawable, every text must fit the context and, with replicas on this machine,
tokenize into enough windows; the output directory must be creatable (sensray.preflight).
"""

from __future__ import annotations

from pathlib import Path

from sensray.attack.spec import AttackSpec
from sensray.errors import SensrayError, SpecError

KEYS = {"space.target": "attack.target", "space.bit": "attack.bit", "space.field": "attack.field",
        "space": "attack", "model.name": "model.name"}


def check_attack(spec: AttackSpec, replicas_here: bool, run: Path | None = None):
    """The meta model, after every check; raises the first problem as a SpecError."""
    from sensray.models import meta_model
    from sensray.plan import make_plan
    from sensray.preflight import preflight
    from sensray.saliency.gradients import require_gradients

    trials = spec.trials()
    try:
        meta = meta_model(spec.model)
    except SensrayError as err:
        raise SpecError("model.name", str(err).removeprefix("model.name: ")) from None
    require_gradients(meta, spec.model)
    try:
        make_plan(trials, meta)  # the target resolves; the field or bit exists in these weights
    except SpecError as err:
        raise SpecError(KEYS.get(err.path, err.path), _no_bits(err.message)) from None
    _check_random(spec, meta)
    preflight(trials, replicas_here, run=run)
    for key, data in (("attack.gradient_data", spec.attack.gradient_data),
                      ("utility.data", spec.utility and spec.utility.data)):
        if data is not None:
            _check_text(trials.model_copy(update={"data": data}), meta, key, replicas_here)
    return meta


def _no_bits(message: str) -> str:
    message = message.split(" (in trial ")[0]  # one trial stands for all: the spec key says where
    return f"no candidate bits: {message}" if "past the width" in message else message


def _check_random(spec: AttackSpec, meta) -> None:
    from sensray.perturbations import PERTURBATIONS, ParamError

    if not spec.random.seeds:
        return
    kind = PERTURBATIONS.get("bitflip")
    params = {"target": spec.attack.target, **spec.attack.restriction, "count": max(spec.random_counts())}
    try:
        kind.check(meta, kind.parse(params))
    except ParamError as err:
        raise SpecError("random.counts", str(err)) from None


def _check_text(trials, meta, key: str, replicas_here: bool) -> None:
    from sensray.plan import check_context
    from sensray.preflight import check_data

    try:
        check_context(trials, meta.config)
        if replicas_here:
            check_data(trials)
    except SpecError as err:
        raise SpecError(err.path.replace("data", key, 1), err.message) from None


def describe(spec: AttackSpec, meta) -> str:
    """What a dry run prints: the search, its stop rules, the random baseline."""
    from sensray.targets import select

    tensors = select(meta, spec.attack.target).tensors
    stop = spec.stop
    rules = [f"up to {stop.max_flips} flips"] + ([f"ppl x{stop.ppl_ratio:g}"] if stop.ppl_ratio else []) + (
        [f"top-1 agreement < {stop.top1_below:g}"] if stop.top1_below else [])
    utility = (f"\n  utility: ppl on {spec.utility.data.corpus} within +{spec.utility.max_increase:.1%}"
               if spec.utility else "")
    counts = spec.random_counts()
    return (f"{spec.name}: progressive bit search on {spec.model.name} [{spec.model.storage}]\n"
            f"  flips: {spec.attack.restriction} in {spec.attack.target!r} ({len(tensors)} tensors); "
            f"{spec.attack.per_tensor} per tensor ranked, {spec.attack.evaluate} evaluated exactly per step\n"
            f"  stop: {', '.join(rules)}{utility}\n"
            f"  random baseline: {len(counts) * spec.random.seeds} trials "
            f"({len(counts)} flip counts {counts} x {spec.random.seeds} seeds)")
