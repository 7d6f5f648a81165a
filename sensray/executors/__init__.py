"""Executors move trials to replicas and rows back; they never touch a model themselves.

An executor is built from the spec, starts its replicas (`start` returns the baseline every
replica measured), then `run`s trials, handing each finished row to `on_row` as it lands (in
any order), and finally reports each replica's weight checksum. The driver (sweep.py) owns the
run directory, the journal and the progress line, so every executor gets them for free.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable, Protocol

from sensray.registry import Registry
from sensray.space import Trial
from sensray.spec import ExperimentSpec


class Executor(Protocol):
    replicas: int

    def start(self) -> dict:
        """Load the replicas; return the baseline (as a dict) they measured."""

    def run(self, trials: Iterable[Trial], on_row: Callable[[dict], None]) -> None:
        """Run every trial once; call on_row(row) as each one finishes. `trials` is a list, or a feed
        (sensray.executors.feed) whose next trial may depend on the rows so far (an adaptive search)."""

    def checksums(self) -> list[str]:
        """Each live replica's weights checksum, taken now."""

    def close(self) -> None: ...


# name -> "module:Class", imported only when chosen: the local path must never import Ray.
EXECUTORS: Registry[str] = Registry("executor")
EXECUTORS.register("local")("sensray.executors.local:LocalExecutor")
EXECUTORS.register("ray")("sensray.executors.ray:RayExecutor")


def executor_for(name: str, spec: ExperimentSpec, **options) -> Executor:
    module, _, cls = EXECUTORS.get(name).partition(":")
    return getattr(importlib.import_module(module), cls)(spec, **options)
