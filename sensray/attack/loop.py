"""The progressive bit search, driven from here: the replicas compute gradients and run the trials.

    summary = run_attack(spec, run=None, executor_name="ray", options={}, log=print)

Per step (Rakin et al. 2019, BFA, as PrisonBreak and AttentionBreaker adapt it to LLMs):
  1. one replica ranks candidate flips on its committed state (one backward pass; sensray.attack.rank);
  2. the candidates run EXACTLY, as ordinary bitflip trials (target, bit, coords), spread over the pool;
  3. the best measured one (highest NLL on the attack text; with a utility text, only candidates that
     keep its ppl within the bound) is journaled to flips.jsonl, then committed on every replica;
  4. stop at the target (ppl ratio, top-1 agreement), when nothing raises the loss, or at the budget.
Before step 0 the random-flip baseline (k random flips of the same bits and tensors, a few seeds per k)
runs on the clean model, so the figure can put both curves side by side.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from sensray.attack.replica import AttackFactory
from sensray.attack.spec import AttackSpec
from sensray.attack.state import AttackRun, committed_changes
from sensray.changes import element, value
from sensray.results import Journal
from sensray.space import Trial, trial_id

Log = Callable[[str], None]
TARGETS = (10.0, 100.0)  # the ppl ratios the summary reports flips-to


def run_attack(spec: AttackSpec, run: AttackRun | None, executor_name: str, options: dict, log: Log,
               on_run: Callable[[AttackRun], None] = lambda run: None) -> tuple[AttackRun, dict]:
    """Start (or resume) the attack; return its run directory and summary (attack.json)."""
    from sensray.executors import executor_for

    utility_text = spec.utility.data if spec.utility is not None else None
    factory = AttackFactory(gradient=_mapping(spec.attack.gradient_data), utility=_mapping(utility_text))
    executor = executor_for(executor_name, spec.trials(), replica_factory=factory, **options)
    started = time.perf_counter()
    try:
        baseline = executor.start()
        run = run or AttackRun.create(spec)
        on_run(run)
        utility = executor.ask("utility_baseline") if spec.utility is not None else None
        run.write_baseline(baseline | {"utility_ppl": utility})
        flips = run.flips()
        _random_baseline(spec, run, executor, log, clean=not flips)
        if flips:
            executor.commit(committed_changes(flips))
            log(f"resumed: {len(flips)} committed flips replayed on every replica")
        search = _Search(spec, run, executor, baseline, utility, log)
        searched = time.perf_counter()
        reason = search.until_stop(flips)
        searched = time.perf_counter() - searched
        checksums = executor.checksums()
    finally:
        executor.close()
    ran = run.journal_rows("candidates") + run.journal_rows("random")
    replicas = len({row["replica"] for row in ran})  # the replicas that ran trials
    summary = _summary(spec, run, baseline, reason, checksums, search, searched, time.perf_counter() - started,
                       replicas)
    return run, summary


def _mapping(data) -> dict | None:
    return None if data is None else data.model_dump(mode="json")


def _random_baseline(spec: AttackSpec, run: AttackRun, executor, log: Log, clean: bool) -> None:
    """k random flips of the allowed bits in the allowed tensors, `seeds` draws per k, on the clean model."""
    trials = [_trial({"target": spec.attack.target, **spec.attack.restriction, "count": k, "seed": spec.seed + s},
                     sample=s) for k in spec.random_counts() for s in range(spec.random.seeds)]
    done = {row["trial_id"] for row in run.journal_rows("random")}
    todo = [t for t in trials if t.trial_id not in done]
    if not todo:
        return
    if not clean:  # flips are committed already: random flips now would not start from the clean model
        log(f"note: {len(todo)} random-baseline trials are missing and flips are committed; they are left out")
        return
    log(f"random baseline: {len(todo)} trials ({len(spec.random_counts())} flip counts x {spec.random.seeds} seeds)")
    with Journal(run.journal_of("random")) as journal:
        executor.run(todo, journal.append)


def _trial(params: dict[str, Any], sample: int) -> Trial:
    from sensray.perturbations import PERTURBATIONS
    from sensray.plan import canonical_params

    params = canonical_params(PERTURBATIONS.get("bitflip"), params)
    return Trial(trial_id("bitflip", params), "bitflip", params, sample)


class _Search:
    def __init__(self, spec: AttackSpec, run: AttackRun, executor, baseline: dict, utility: float | None, log: Log):
        self.spec, self.run, self.executor, self.log = spec, run, executor, log
        self.baseline = baseline
        self.limit = None if spec.utility is None else 1 + spec.utility.max_increase
        self.steps = 0  # steps run by this process (resumed steps not counted): the rate's numerator

    def until_stop(self, flips: list[dict]) -> str:
        stop = self.spec.stop
        if flips and reached(stop, flips[-1]):
            return reached(stop, flips[-1])
        flips_file, candidates_file = self.run.journal_of("flips"), self.run.journal_of("candidates")
        with Journal(flips_file) as flip_journal, Journal(candidates_file) as journal:
            for step in range(len(flips), stop.max_flips):
                flip = self._step(step, flips, journal)
                if isinstance(flip, str):
                    return flip
                flip_journal.append(flip)  # journaled first: a crash before the commit replays it on resume
                self.executor.commit(flip["changes"])
                flips.append(flip)
                self.steps += 1
                self.log(_describe(flip))
                if reached(stop, flip):
                    return reached(stop, flip)
        return f"the budget of {stop.max_flips} flips is spent"

    def _step(self, step: int, flips: list[dict], journal: Journal) -> dict | str:
        start = time.perf_counter()
        candidates = self.executor.ask("candidates", self._request(flips))
        if not candidates:
            return "no allowed flip is predicted to raise the loss"
        trials = [_trial({"target": c["tensor"], "bit": c["bit"], "coords": [c["coords"]]}, sample=step)
                  for c in candidates]
        predicted = {t.trial_id: c["predicted"] for t, c in zip(trials, candidates)}
        rows = {row["trial_id"]: row for row in self.run.journal_rows("candidates") if row["step"] == step}

        def on_row(row: dict) -> None:
            row = row | {"step": step, "predicted": predicted[row["trial_id"]]}
            journal.append(row)
            rows[row["trial_id"]] = row

        self.executor.run([t for t in trials if t.trial_id not in rows], on_row)
        current = flips[-1]["nll"] if flips else self.baseline["nll"]
        best = choose([rows[t.trial_id] for t in trials if t.trial_id in rows], current, self.limit)
        if best is None:
            within = f" within the utility bound (ppl x{self.limit:g})" if self.limit else ""
            return f"no evaluated candidate raises the loss{within} (step {step}, {len(trials)} candidates)"
        return flip_row(step, best, len(trials), time.perf_counter() - start)

    def _request(self, flips: list[dict]) -> dict[str, Any]:
        a = self.spec.attack
        return {"target": a.target, "field": None if a.bit is not None else (a.field or "any"), "bit": a.bit,
                "per_tensor": a.per_tensor, "evaluate": a.evaluate, "finite_only": a.finite_only,
                "checkpoint": a.checkpoint,
                "exclude": [[c["tensor"], c["index"], c["bit"]] for c in committed_changes(flips)]}


def choose(rows: list[dict], current_nll: float, limit: float | None) -> dict | None:
    """The candidate with the highest NLL (non-finite highest of all), among those within the utility
    limit; None when none raises the NLL above `current_nll`. Ties: the first (best predicted)."""
    feasible = [r for r in rows if r["error"] is None and r["nll"] is not None
                and (limit is None or (r.get("utility_ratio") is not None and r["utility_ratio"] <= limit))]
    if not feasible:
        return None
    best = max(feasible, key=lambda r: r["nll"])
    return best if best["nll"] > current_nll else None


def reached(stop, row: dict) -> str:
    """Why the attack stops at this row ('' while it goes on)."""
    if stop.ppl_ratio is not None and row["delta_ppl"] is not None and row["delta_ppl"] >= stop.ppl_ratio:
        return f"target reached: ppl x{value(row['delta_ppl'])} >= x{stop.ppl_ratio:g} after {row['step'] + 1} flips"
    if stop.top1_below is not None and row["top1_agreement"] is not None and row["top1_agreement"] < stop.top1_below:
        return (f"target reached: top-1 agreement {row['top1_agreement']:.3f} < {stop.top1_below:g} after "
                f"{row['step'] + 1} flips")
    return ""


FLIP_METRICS = ("ppl", "nll", "delta_ppl", "kl", "top1_agreement", "nonfinite", "utility_ppl", "utility_ratio")


def flip_row(step: int, row: dict, evaluated: int, seconds: float) -> dict:
    """The journal line of a committed flip: what changed (exactly, for replay) and the model after it."""
    (change,) = row["changes"]
    return {"step": step, "trial_id": row["trial_id"], **{k: change[k] for k in
            ("tensor", "index", "coords", "bit", "old", "new", "old_bits", "new_bits")},
            "predicted": row["predicted"], **{k: row.get(k) for k in FLIP_METRICS},
            "evaluated": evaluated, "seconds": seconds, "changes": row["changes"]}


def _describe(flip: dict) -> str:
    utility = f", utility ppl x{value(flip['utility_ratio'])}" if flip.get("utility_ratio") is not None else ""
    top1 = f"{flip['top1_agreement']:.1%}" if flip["top1_agreement"] is not None else "?"
    return (f"flip {flip['step'] + 1}: {element(flip)}; ppl x{value(flip['delta_ppl'])}, top-1 {top1}{utility} "
            f"({flip['evaluated']} candidates, {flip['seconds']:.1f} s)")


def flips_to(flips: list[dict], ratio: float) -> int | None:
    """How many flips first took ppl to `ratio` x the clean model's (None: never)."""
    return next((f["step"] + 1 for f in flips if f["delta_ppl"] is not None and f["delta_ppl"] >= ratio), None)


def _summary(spec: AttackSpec, run: AttackRun, baseline: dict, reason: str, checksums: list[str], search: _Search,
             search_seconds: float, seconds: float, replicas: int) -> dict:
    flips = run.flips()
    last = flips[-1] if flips else {}
    if len(set(checksums)) != 1:
        from sensray.errors import RestoreError

        raise RestoreError(f"the replicas' committed states differ after the attack: {checksums}")
    return {"stop_reason": reason, "flips": len(flips),
            "flips_to": {f"x{r:g}": flips_to(flips, r) for r in TARGETS},
            "baseline": {k: baseline.get(k) for k in ("ppl", "nll", "tokens", "utility_ppl")},
            "final": {k: last.get(k) for k in FLIP_METRICS},
            "checksum_at_load": baseline["checksum_at_load"], "checksum_committed": checksums[0],
            "replicas": replicas, "steps_this_session": search.steps, "search_seconds": search_seconds,
            "steps_per_minute": 60 * search.steps / search_seconds if search.steps and search_seconds > 0 else None,
            "seconds": seconds}

