"""Where an executor takes its next trial from.

A fixed plan is a `StaticFeed`; an adaptive search (sensray.executors.search) is a feed whose
next trial depends on the rows so far. `poll()` returns the next trial, or None when there is
nothing to run until more results come in; `finished()` says nothing more will come. Iterating
a feed (what the local executor does, one trial at a time) polls until it is finished.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

from sensray.space import Trial


class StaticFeed:
    """A fixed list of trials, in plan order."""

    def __init__(self, trials: Iterable[Trial]):
        self.todo = deque(trials)

    def poll(self) -> Trial | None:
        return self.todo.popleft() if self.todo else None

    def finished(self) -> bool:
        return not self.todo

    def __len__(self) -> int:
        return len(self.todo)

    def __iter__(self) -> Iterator[Trial]:
        while not self.finished():
            yield self.poll()


def trial_source(plan, done_rows: list[dict]):
    """What a run still has to do: (the plan's trials not yet recorded, or a SearchFeed; the run's total).

    Both have len() = trials left to run. A search spends the rest of search.num_trials.
    """
    if plan.spec.search is None:
        done = {row["trial_id"] for row in done_rows}
        return [t for t in plan.trials if t.trial_id not in done], len(plan.trials)
    from sensray.executors.search import SearchFeed

    return SearchFeed(plan.spec, done_rows), plan.spec.search.num_trials


def table_rows(plan, rows: list[dict]) -> list[dict]:
    """The rows of the final table, in plan order (a search: in the order its trials were proposed)."""
    if plan.spec.search is not None:
        return sorted(rows, key=lambda row: row.get("sample") or 0)
    order = {t.trial_id: i for i, t in enumerate(plan.trials)}
    return sorted((r for r in rows if r["trial_id"] in order), key=lambda r: order[r["trial_id"]])
