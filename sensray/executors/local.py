"""The local executor: one replica in this process, no Ray.

Used for debugging, for tests, and on machines where Ray is not installed (the GPU machine).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable

from sensray.executors.actor import ReplicaFactory, answer
from sensray.replica import Replica
from sensray.space import Trial
from sensray.spec import ExperimentSpec


class LocalExecutor:
    replicas = 1

    def __init__(self, spec: ExperimentSpec, replica_factory: ReplicaFactory | None = None):
        self.spec, self.factory = spec, replica_factory or Replica
        self.replica: Replica | None = None

    def start(self) -> dict:
        self.replica = self.factory(self.spec, "local-0")
        return asdict(self.replica.baseline)

    def run(self, trials: list[Trial], on_row: Callable[[dict], None]) -> None:
        for trial in trials:
            on_row(self.replica.run_trial(trial))

    def checksums(self) -> list[str]:
        return [self.replica.checksum()]

    def close(self) -> None:
        self.replica = None

    # -- committed state and questions: an attack's loop (sensray.attack); ordinary sweeps use neither --

    def commit(self, changes: list[dict]) -> None:
        self.replica.commit(changes)

    def ask(self, question: str, *args: Any) -> Any:
        return answer(self.replica, question, args)
