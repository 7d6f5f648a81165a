"""The local executor: one replica in this process, no Ray.

Used for debugging, for tests, and on machines where Ray is not installed (the GPU box).
Rows go to the journal the moment a trial finishes.
"""

from __future__ import annotations

from typing import Callable

from sensray.progress import Progress
from sensray.replica import Replica
from sensray.results import Journal
from sensray.space import Trial


def run_local(
    replica: Replica,
    trials: list[Trial],
    journal: Journal,
    progress: Progress,
    on_row: Callable[[dict], None] = lambda row: None,
) -> None:
    for trial in trials:
        row = replica.run_trial(trial)
        journal.append(row)
        on_row(row)
        progress.update(failed=row["error"] is not None)
