"""Which trials of a sweep score lm-eval tasks (the spec's `eval:` section).

    eval: {tasks: [...], on: all}       every trial, in the same pass as its ppl/KL
    eval: {tasks: [...], every: 4}      plan positions 0, 4, 8, ...: a thinned grid, same pass
    eval: {tasks: [...], top_k: 8}      after the sweep, the 8 most damaging trials again, with tasks

The driver marks a trial (`Trial.tasks`) and the replica scores the tasks of a marked trial (or
of every trial under `on: all`). `top_k` is a second phase: once every trial has its ppl/KL, the
k most damaging by `eval.metric` (top1_agreement: the lowest) are applied again, measured again
and scored; their new rows, appended to the same journal, replace the first ones (a run keeps a
trial's last row), so the table holds each trial once. Metrics are deterministic, so the ranking
read back on `--resume` is the same and only the trials still without task scores run.
"""

from __future__ import annotations

import math
from dataclasses import replace

from sensray.results import TASK_SECONDS
from sensray.space import Trial
from sensray.spec import EvalSpec


def marked(trials: list[Trial], order: list[Trial], every: int) -> list[Trial]:
    """`trials` with those at plan positions 0, every, 2*every, ... marked to score tasks."""
    picked = {t.trial_id for i, t in enumerate(order) if i % every == 0}
    return [replace(t, tasks=True) if t.trial_id in picked else t for t in trials]


def top_k(rows: list[dict], spec: EvalSpec) -> list[str]:
    """The trial ids of the `top_k` most damaging rows by `spec.metric` (failed trials left out;
    a non-finite model counts as the most damaged); ties keep the order of `rows`."""
    lowest_first = spec.metric == "top1_agreement"
    ranked = [r for r in rows if r.get("error") is None and _number(r.get(spec.metric)) is not None]

    def damage(row: dict) -> float:
        value = _number(row[spec.metric])
        return -value if lowest_first else value

    ranked.sort(key=damage, reverse=True)
    return [row["trial_id"] for row in ranked[: spec.top_k]]


def second_phase(rows: list[dict], spec: EvalSpec, plan_trials: list[Trial], kind) -> tuple[list[Trial], int]:
    """(the top-k trials still without task scores, marked; k as found): what `top_k` runs after the sweep.
    A trial of a search is rebuilt from its row (its parameters are the columns its kind takes)."""
    chosen = top_k(rows, spec)
    by_id = {t.trial_id: t for t in plan_trials}
    latest = {row["trial_id"]: row for row in rows}
    todo = [by_id.get(tid) or _from_row(latest[tid], kind) for tid in chosen if latest[tid].get(TASK_SECONDS) is None]
    return [replace(t, tasks=True, bounds=None) for t in todo], len(chosen)


def _from_row(row: dict, kind) -> Trial:
    params = {k: row[k] for k in kind.Params.model_fields if row.get(k) is not None}
    return Trial(row["trial_id"], row["kind"], params, row.get("sample") or 0)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return math.inf if math.isnan(value) else float(value)
