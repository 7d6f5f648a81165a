"""The search loop: every attack (a case at one budget) advanced one step per round, on a pool.

    attacks = start_attacks(cases, spec, tokenizer)
    search(pool, attacks, spec, tokenizer, on_step=journal.append)      # until each one stops

A round takes, for every attack still running, one gradient (one work item each), proposes its
candidates on the driver (GCG or HotFlip, sensray.adversarial.search), and evaluates all of them
exactly, in chunks spread over the pool's replicas. An attack keeps its best candidate only when
that lowers its loss, so its loss never rises from step to step. Each step's draws come from
`keyed_rng(seed, method, case, budget, step)`, and every step is journaled (`on_step`) before the
next round: an attack rebuilt from its last journal row (`resume_attacks`) continues exactly as
if it had never stopped. The order of rounds and of work items changes nothing.

Stops: `steps` (budget of steps spent), `patience` (that many steps without a better candidate),
`converged` (HotFlip: no ranked swap lowers the loss; its next gradient would be the same),
`success` (stop_on_success), `no candidates` (every swap was filtered out; HotFlip only).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from sensray.adversarial.cases import Case
from sensray.adversarial.objective import Problem
from sensray.adversarial.replica import Work
from sensray.adversarial.search import allowed_tokens, positions, propose_gcg, propose_hotflip, retokenizes
from sensray.adversarial.spec import AdversarialSpec
from sensray.perturbations.base import keyed_rng

MIN_CHUNK = 16  # candidates per work item at least: smaller items cost more in dispatch than they save


@dataclass
class Attack:
    key: str  # "c{case}-b{budget}"
    case: int
    budget: int
    problem: Problem
    original: tuple[int, ...] | None  # substitute: the prompt tokens being edited; None for a suffix
    ids: list[int]  # the current edit
    retokenize: bool  # candidates must survive decode -> encode (off when the start itself does not)
    loss: float = math.nan
    step: int = 0
    stale: int = 0  # steps since the loss last fell
    stop: str | None = None
    success_below: float = -math.inf  # untargeted: a loss at or below this has succeeded (see note_clean)

    def row(self, **fields) -> dict:
        return {"attack": self.key, "case": self.case, "budget": self.budget, "step": self.step, "loss": self.loss,
                "ids": list(self.ids), "stale": self.stale, "stop": self.stop, **fields}


def problem_of(case: Case, spec: AdversarialSpec) -> Problem:
    if spec.attack.edit == "suffix":
        return Problem(case.before, (), case.after, case.target, spec.attack.objective)
    return Problem(case.before[: case.fixed], case.before[case.fixed:], case.after, case.target, spec.attack.objective)


def start_attacks(cases: list[Case], spec: AdversarialSpec, tokenizer) -> list[Attack]:
    """One attack per case and budget, at its starting edit (loss not yet measured)."""
    init = tokenizer(spec.attack.init, add_special_tokens=False).input_ids[0]
    out = []
    for case in cases:
        problem = problem_of(case, spec)
        for budget in spec.attack.budgets:
            suffix = spec.attack.edit == "suffix"
            ids = [init] * budget if suffix else list(problem.clean)
            check = spec.attack.retokenize and bool(retokenizes(tokenizer, torch.tensor([ids])).all())
            out.append(Attack(f"c{case.index}-b{budget}", case.index, budget, problem,
                              None if suffix else problem.clean, ids, check))
    return out


def resume_attacks(attacks: list[Attack], rows: list[dict]) -> None:
    """Bring each attack to its last journaled step."""
    last = {}
    for row in rows:
        last[row["attack"]] = row
    for attack in attacks:
        row = last.get(attack.key)
        if row is not None:
            attack.ids, attack.loss, attack.step = list(row["ids"]), row["loss"], row["step"]
            attack.stale, attack.stop = row["stale"], row["stop"]


def search(pool, attacks: list[Attack], spec: AdversarialSpec, tokenizer, on_step: Callable[[dict], None],
           log: Callable[[str], None] | None = None) -> None:
    """Run every attack to its stop, journaling each step through `on_step`."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    fresh = [a for a in attacks if math.isnan(a.loss)]
    for attack, loss in zip(fresh, _losses(pool, [(a, torch.tensor([a.ids])) for a in fresh])):
        attack.loss = float(loss[0])
        on_step(attack.row(best=None, candidates=0, accepted=None, seconds=0.0))
    allowed, last_log = None, 0.0
    while active := [a for a in attacks if a.stop is None]:
        start = time.perf_counter()
        grads = pool.map([Work(f"g-{a.key}-{a.step}", "gradient", a.problem, a.ids) for a in active])
        if allowed is None:
            allowed = allowed_tokens(tokenizer, grads[0].shape[1], spec.attack.allow_non_ascii)
        proposals = [propose(a, g, allowed, spec, tokenizer) for a, g in zip(active, grads)]
        losses = _losses(pool, list(zip(active, proposals)))
        rows = [advance(a, candidates, loss, spec) for a, candidates, loss in zip(active, proposals, losses)]
        if spec.attack.stop_on_success and spec.targeted:
            _stop_exact_matches(pool, active, rows)
        seconds = (time.perf_counter() - start) / len(active)
        for row in rows:
            on_step(row | {"seconds": seconds})
        if time.perf_counter() - last_log > 5 or not any(a.stop is None for a in attacks):
            last_log = time.perf_counter()
            log(progress_line(attacks, spec))


def _stop_exact_matches(pool, active: list[Attack], rows: list[dict]) -> None:
    """Targeted stop_on_success: an attack whose new input makes the model say its target stops."""
    moved = [(a, row) for a, row in zip(active, rows) if row["accepted"] and a.stop is None]
    works = [Work(f"m-{a.key}-{a.step}", "measure", edits=[(a.problem, a.ids)]) for a, _ in moved]
    for (attack, row), (measured,) in zip(moved, pool.map(works)):
        if measured["exact_match"]:
            attack.stop = row["stop"] = "success"


def propose(attack: Attack, grad: torch.Tensor, allowed: torch.Tensor, spec: AdversarialSpec,
            tokenizer) -> torch.Tensor:
    """This step's candidate edits of one attack, filtered."""
    where = positions(attack.ids, attack.original, attack.budget)
    a = spec.attack
    if a.method == "gcg":
        rng = keyed_rng(a.seed, "gcg", attack.case, attack.budget, attack.step + 1)
        edits = propose_gcg(grad, attack.ids, allowed, where, a.top_k, a.candidates, rng, attack.original)
    else:
        edits = propose_hotflip(grad, attack.ids, allowed, where, a.candidates, attack.original)
    return edits[retokenizes(tokenizer, edits)] if attack.retokenize else edits


def advance(attack: Attack, candidates: torch.Tensor, losses: torch.Tensor, spec: AdversarialSpec) -> dict:
    """Take the step: keep the best candidate if it lowers the loss; decide whether to stop; the journal row."""
    attack.step += 1
    best = int(losses.argmin()) if len(losses) else None
    accepted = best is not None and float(losses[best]) < attack.loss
    if accepted:
        attack.ids, attack.loss, attack.stale = candidates[best].tolist(), float(losses[best]), 0
    else:
        attack.stale += 1
    attack.stop = stop_reason(attack, accepted, len(candidates), spec)
    return attack.row(best=float(losses[best]) if best is not None else None, candidates=len(candidates),
                      accepted=accepted)


def stop_reason(attack: Attack, accepted: bool, candidates: int, spec: AdversarialSpec) -> str | None:
    a = spec.attack
    if a.method == "hotflip" and not accepted:
        return "converged" if candidates else "no candidates"
    if a.stop_on_success and accepted and attack.loss <= attack.success_below:
        return "success"
    if a.patience is not None and attack.stale >= a.patience:
        return "patience"
    return "steps" if attack.step >= a.steps else None


def note_clean(attacks: list[Attack], clean: dict[int, dict], spec: AdversarialSpec) -> None:
    """Each untargeted attack's success threshold on its loss: the continuation's NLL up by success_at over
    the clean input's (nll), or a KL of success_at (kl). Targeted success is an exact match, a property of
    the argmax rather than the loss (checked by measuring)."""
    for attack in attacks:
        if spec.attack.objective == "nll":
            attack.success_below = -(clean[attack.case]["nll"] + spec.attack.success_at)
        elif spec.attack.objective == "kl":
            attack.success_below = -spec.attack.success_at


def _losses(pool, batches: list[tuple[Attack, torch.Tensor]]) -> list[torch.Tensor]:
    """Exact losses of every attack's candidates, in chunks spread evenly over the pool's replicas."""
    total = sum(len(edits) for _, edits in batches)
    size = max(MIN_CHUNK, math.ceil(total / pool.replicas))
    works, owners = [], []
    for i, (attack, edits) in enumerate(batches):
        for j, chunk in enumerate(edits.split(size)):
            works.append(Work(f"l-{attack.key}-{attack.step}-{j}", "losses", attack.problem, chunk))
            owners.append(i)
    results = pool.map(works)
    out = [[] for _ in batches]
    for owner, result in zip(owners, results):
        out[owner].append(result)
    return [torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64) for parts in out]


def progress_line(attacks: list[Attack], spec: AdversarialSpec) -> str:
    done = sum(a.stop is not None for a in attacks)
    steps = sum(a.step for a in attacks)
    best = {b: min(a.loss for a in attacks if a.budget == b) for b in spec.attack.budgets}
    shown = "  ".join(f"b{b}: {loss:.3f}" for b, loss in best.items())
    return f"[{done}/{len(attacks)} attacks done, {steps} steps] best loss per budget  {shown}"
