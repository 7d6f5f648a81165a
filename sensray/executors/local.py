"""The local executor: one replica in this process, no Ray.

Used for debugging, for tests, and on machines where Ray is not installed (the GPU machine).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from sensray.replica import Replica
from sensray.space import Trial
from sensray.spec import ExperimentSpec


class LocalExecutor:
    replicas = 1

    def __init__(self, spec: ExperimentSpec):
        self.spec = spec
        self.replica: Replica | None = None

    def start(self) -> dict:
        self.replica = Replica(self.spec)
        return asdict(self.replica.baseline)

    def run(self, trials: list[Trial], on_row: Callable[[dict], None]) -> None:
        for trial in trials:
            on_row(self.replica.run_trial(trial))

    def checksums(self) -> list[str]:
        return [self.replica.checksum()]

    def close(self) -> None:
        self.replica = None
