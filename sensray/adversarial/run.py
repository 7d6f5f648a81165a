"""Run an adversarial experiment end to end: plan, search, measure, report (the function API).

    from sensray.adversarial import run_attack
    run = run_attack(load_adversarial_spec("experiments/adversarial.yaml"))     # -> the run directory
    run = run_attack(spec, resume="results/adversarial/<run id>")               # after a crash

The pool starts (model loaded, baseline measured) before the run directory exists, so a bad model
leaves nothing on disk. The cases are recorded in cases.json and a resumed run attacks exactly those.
At the end each attack's final input is measured in full against its clean input (NLL, KL, top-1,
exact match), the replicas generate clean and adversarial continuations, and the weights' checksum
is compared with the one taken at load: an attack only reads the model.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import polars as pl

from sensray.adversarial import report
from sensray.adversarial.attack import Attack, note_clean, resume_attacks, search, start_attacks
from sensray.adversarial.cases import Case
from sensray.adversarial.objective import prompt
from sensray.adversarial.pool import default_executor, open_pool
from sensray.adversarial.replica import Work
from sensray.adversarial.spec import AdversarialSpec
from sensray.adversarial.store import AttackRun
from sensray.errors import RestoreError

GENERATE_TOKENS = 24


def run_attack(spec: AdversarialSpec, cases: list[Case] | None = None, resume: str | Path | None = None,
               executor: str | None = None, address: str | None = None, replicas=None, on_run=None,
               log: Callable[[str], None] | None = None) -> Path:
    """Attack every case at every budget; returns the run directory. `on_run(path)` hears it once it exists."""
    from sensray.models import load_tokenizer

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    run = AttackRun.open(resume) if resume is not None else None
    if run is not None and run.table.is_file():
        return run.path
    tokenizer = load_tokenizer(spec.model)
    if run is not None:
        cases = run.cases()
    elif cases is None:
        from sensray.adversarial.plan import make_attack_plan

        cases = make_attack_plan(spec).cases
    executor = executor or default_executor(spec, address, replicas)
    with open_pool(spec, executor, address, replicas) as pool:
        if run is None:
            run = AttackRun.create(spec)
            run.write_cases(cases)
        if on_run is not None:
            on_run(run.path)
        run.write_baseline(asdict(pool.baseline))
        log(f"{spec.name}: {spec.attack.method} on {spec.model.name} [{pool.baseline.device}], {len(cases)} cases x "
            f"budgets {spec.attack.budgets}, objective {spec.attack.objective}, {pool.replicas} replica(s)")
        rows = attack_rows(pool, spec, cases, tokenizer, run, log)
        _check_unchanged(pool, pool.baseline.checksum_at_load)
    finish(run, spec, rows)
    return run.path


def attack_rows(pool, spec: AdversarialSpec, cases: list[Case], tokenizer, run: AttackRun, log) -> list[dict]:
    """Search (resuming from the journal), then measure and generate: one row per attack."""
    from sensray.results import Journal

    attacks = start_attacks(cases, spec, tokenizer)
    starts = [list(a.ids) for a in attacks]  # the control: the same number of `init` tokens, unoptimised
    resume_attacks(attacks, run.rows())
    clean = dict(zip([c.index for c in cases], measure(pool, [(_first(attacks, c.index), None) for c in cases])))
    note_clean(attacks, clean, spec)
    with Journal(run.journal) as journal:
        if journal.dropped:
            log(f"{run.journal}: its last line was cut short (a crash mid-write); that step runs again")
        search(pool, attacks, spec, tokenizer, journal.append, log)
    attacked = measure(pool, [(a, a.ids) for a in attacks])
    started = measure(pool, list(zip(attacks, starts)))
    texts = continuations(pool, attacks, cases)
    by_case = {c.index: c for c in cases}
    seconds: dict[str, float] = {}
    for step in run.rows():
        seconds[step["attack"]] = seconds.get(step["attack"], 0.0) + step["seconds"]
    return [row(spec, a, by_case[a.case], clean[a.case], m, t, tokenizer)
            | {"start_nll": s["nll"], "start_kl": s["kl"], "seconds": seconds[a.key]}
            for a, m, s, t in zip(attacks, attacked, started, texts)]


def _first(attacks: list[Attack], case: int) -> Attack:
    return next(a for a in attacks if a.case == case)


def measure(pool, items: list[tuple[Attack, list[int] | None]]) -> list[dict]:
    """Each attack's problem with the given edit (None: the clean input), measured in full."""
    works = [Work(f"m-{i}", "measure", edits=[(a.problem, list(a.problem.clean) if ids is None else ids)])
             for i, (a, ids) in enumerate(items)]
    return [result[0] for result in pool.map(works)]


def continuations(pool, attacks: list[Attack], cases: list[Case]) -> list[tuple[str, str]]:
    """(clean, adversarial) greedy continuation of each attack's input, without its target."""
    prompts = []
    for a in attacks:
        prompts += [prompt(a.problem, a.problem.clean), prompt(a.problem, a.ids)]
    (texts,) = pool.map([Work("generate", "generate", edits=prompts, options={"max_new_tokens": GENERATE_TOKENS})])
    return list(zip(texts[::2], texts[1::2]))


def row(spec: AdversarialSpec, a: Attack, case: Case, clean: dict, attacked: dict, texts: tuple[str, str],
        tokenizer) -> dict:
    changed = a.budget if a.original is None else sum(x != y for x, y in zip(a.ids, a.original))
    return {
        "attack": a.key, "case": a.case, "source": case.source, "budget": a.budget, "method": spec.attack.method,
        "objective": spec.attack.objective, "edit": spec.attack.edit, "steps": a.step, "stop": a.stop,
        "ids": a.ids, "text": tokenizer.decode(a.ids), "changed": changed, "retokenized": a.retokenize,
        "prompt": tokenizer.decode(case.before + case.after), "target": tokenizer.decode(case.target),
        "target_ids": list(case.target), "loss": a.loss, "clean_nll": clean["nll"], "nll": attacked["nll"],
        "kl": attacked["kl"], "top1_agreement": attacked["top1_agreement"], "exact_match": attacked["exact_match"],
        "clean_exact_match": clean["exact_match"], "success": report.success(spec, clean, attacked),
        "clean_continuation": texts[0], "continuation": texts[1],
    }


def _check_unchanged(pool, at_load: str) -> None:
    after = pool.checksums()
    if set(after) != {at_load}:
        raise RestoreError(f"weights checksum changed during the attack ({at_load} -> {after})")


def finish(run: AttackRun, spec: AdversarialSpec, rows: list[dict]) -> None:
    """The tables, figures, summary and continuations; steps.parquet replaces the journal."""
    import json

    from sensray.analyze.figures import save
    from sensray.results import _atomic_write

    # Every row decides a column's type: `stop` is null until an attack's last step.
    attacks = pl.DataFrame(rows, infer_schema_length=None)
    steps = pl.DataFrame(run.rows(), infer_schema_length=None)
    table = report.budget_table(attacks)
    run.write_table("steps", steps)
    run.write_table("budgets", table)
    save(report.loss_figure(steps, attacks, spec), run.path / "loss")
    save(report.success_figure(table, spec), run.path / "success")
    _atomic_write(run.path / "continuations.md", report.continuations_text(rows, 110))
    summary = {"model": spec.model.name, "method": spec.attack.method, "objective": spec.attack.objective,
               "edit": spec.attack.edit, "criterion": report.criterion(spec), "budgets": table.to_dicts(),
               "seconds": attacks["seconds"].sum(), "steps": int(attacks["steps"].sum())}
    _atomic_write(run.path / "summary.json", json.dumps(summary, indent=2) + "\n")
    run.write_table("attacks", attacks)  # last: a finished search is one with this table
    run.journal.unlink(missing_ok=True)


def summary_text(path: Path) -> str:
    """The per-budget table of a finished run directory, in words."""
    spec = AttackRun.open(path).spec()
    table = pl.read_parquet(Path(path) / "budgets.parquet")
    return f"{spec.name}: success = {report.criterion(spec)}\n{report.text_table(table, spec.attack.objective)}"
