"""Everything an adversarial run can check before it loads a weight (what --dry-run runs, and every run first).

    plan = make_attack_plan(spec)      # tokenizer + meta model: cases built, lengths and tokens checked
    print(describe(plan))

The model's structure comes from its config on the meta device (no weights): its context length
bounds the longest input, and it must have an input embedding to take gradients through. The
cases are built and checked against the tokenizer (sensray.adversarial.cases), the weight files'
headers are read (sensray.models.check_weights) and the output directory must be creatable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sensray.adversarial.cases import Case, build_cases
from sensray.adversarial.spec import AdversarialSpec
from sensray.errors import SensrayError, SpecError


@dataclass(frozen=True)
class AttackPlan:
    spec: AdversarialSpec
    cases: list[Case]
    context: int | None  # the model's longest input (None: no limit)
    vocabulary: int  # rows of the input embedding: what a swap chooses among
    meta: object  # the model on the meta device (transfer checks trial parameters against it)


def make_attack_plan(spec: AdversarialSpec, meta=None, tokenizer=None, cases: list[Case] | None = None) -> AttackPlan:
    """Build and check the cases on the model's tokenizer and (meta) structure; SpecError for bad input.
    `cases`: those a resumed run recorded (attacked as they are, whatever the input files say now)."""
    from sensray.models import context_length, load_tokenizer, meta_model

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.model)
    try:
        meta = meta if meta is not None else meta_model(spec.model)
    except SensrayError as err:
        raise SpecError("model.name", str(err).removeprefix("model.name: ")) from None
    embedding = meta.get_input_embeddings()
    if embedding is None or getattr(embedding, "weight", None) is None:
        raise SpecError("model.name", f"{spec.model.name} has no input embedding table to take gradients through")
    limit = context_length(meta.config)
    cases = cases if cases is not None else build_cases(spec, tokenizer, limit[1] if limit else None)
    return AttackPlan(spec, cases, limit[1] if limit else None, embedding.weight.shape[0], meta)


def preflight(spec: AdversarialSpec, executor: str, resume: Path | None = None) -> None:
    """The checks that need no weights besides the plan's: weight files, device, output directory."""
    from sensray.models import check_weights, pick_device
    from sensray.preflight import RUN_ID_LENGTH, check_creatable, check_writable

    if executor == "local":
        pick_device(spec.model)
    check_weights(spec.model)
    if resume is None:
        check_creatable(Path(spec.output_dir) / spec.name, "output_dir", RUN_ID_LENGTH)
    else:
        check_writable(Path(resume))


def describe(plan: AttackPlan) -> str:
    """What a dry run prints: the attacks, their inputs and the work they will do."""
    spec, a = plan.spec, plan.spec.attack
    attacks = len(plan.cases) * len(a.budgets)
    longest = max(len(c.before) + len(c.after) + len(c.target) for c in plan.cases)
    suffix = a.budgets[-1] if a.edit == "suffix" else 0
    per_step = "1 gradient + " + (f"up to {a.candidates} candidates" if a.method == "gcg" else
                                  f"the {a.candidates} best-ranked swaps")
    context = f"{plan.context}" if plan.context else "unbounded"
    return (f"{spec.name}: {attacks} attacks ({len(plan.cases)} cases x budgets {a.budgets}) of {a.method} "
            f"({a.edit}, objective {a.objective}) on {spec.model.name} [{spec.model.dtype}]\n"
            f"  per step: {per_step}, up to {a.steps} steps (seed {a.seed})\n"
            f"  inputs: {plan.cases[0].source} ... {plan.cases[-1].source}; longest {longest + suffix} tokens "
            f"with the suffix (context {context}); vocabulary {plan.vocabulary} rows")
