"""The Ray executor: a pool of resident model replicas (Ray actors) fed trials by the driver.

    python -m sensray.sweep experiments/bitflip.yaml                  # starts a local Ray on 127.0.0.1
    python -m sensray.sweep experiments/bitflip.yaml --address auto   # the same sweep on a running cluster

Each actor loads the model once (on its GPU when it has one) and keeps it; the driver keeps up to
`depth` trials in flight per actor, so an actor never waits for its next trial, and hands every
row to `on_row` (the driver's fsynced journal) the moment its ObjectRef resolves.

Why not a Tune trainable per trial: on 2 CPUs, Tune with reuse_actors costs ~80 ms per trial,
this pool under 1 ms (docs/BENCHMARKS.md), and Tune's restore re-runs trials it had finished. Tune
keeps its other job: the search space vocabulary (sensray.space) and, for adaptive studies,
its Searchers, driven by this pool (sensray.executors.search).

Failures. A trial that fails for its own reasons is already a row (Replica.run_trial). A replica
that dies (process killed, node removed, out of host memory) is replaced; its trials in flight go
back to the front of the queue, and a trial that was running when its replica died `max_attempts`
times is recorded with that error instead of being retried forever. Which trial was running is what
the actor recorded in Ray's GCS as it started it: the oldest unanswered one may have finished, its
reply lost with the process. A replica that cannot load the model, or a restore that does not verify,
stops the sweep with the original error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from sensray.errors import SensrayError, SpecError
from sensray.executors.actor import ReplicaActor, ReplicaFactory, forget_running, started_last
from sensray.executors.feed import StaticFeed
from sensray.space import Trial
from sensray.spec import ExperimentSpec

LOOPBACK = "127.0.0.1"
LOCAL_OBJECT_STORE = 150 * 2**20  # rows are a few hundred bytes; the model never enters the object store


def loopback_only() -> None:
    """Keep a Ray started from this process on this machine: no outward node-IP discovery.

    Unless told otherwise, Ray finds "its" IP by routing toward a public address and binds there.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes it use 127.0.0.1; Ray reads it at import (and its
    child processes inherit it), so a Ray imported earlier also gets its constant set.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:
        sys.modules["ray"]._private.ray_constants.ENABLE_RAY_CLUSTER = False


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join (address) or start (None) a Ray; True when this call started it and must stop it.

    A local Ray binds every listener to 127.0.0.1 (see loopback_only). The process keeps its
    own signal handlers: ray.init replaces SIGTERM's with one that exits 15 mid-stack, which
    would skip the sweep's orderly stop (replicas killed, journal closed, "interrupted" message).
    """
    if address is None:
        loopback_only()
    import ray

    if ray.is_initialized():  # a notebook or test that set Ray up itself: use it, leave it running
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": True}
    with _own_signal_handlers():
        if address is None:
            ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, num_cpus=num_cpus,
                     object_store_memory=LOCAL_OBJECT_STORE, **quiet)
        else:
            ray.init(address=address, **quiet)
    return True


@contextlib.contextmanager
def _own_signal_handlers():
    """Put back the SIGTERM and SIGINT handlers that were in place before the block."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread has (and may set) handlers
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def replica_count(cpus: float, gpus: float, replicas: Any, free: dict[str, float]) -> int:
    """`replicas` as asked, or with 'auto' as many as the free resources fit (at least one)."""
    if replicas != "auto":
        return int(replicas)
    return max(1, fitting(cpus, gpus, free))


def fitting(cpus: float, gpus: float, resources: dict[str, float]) -> int:
    """How many replicas of cpus/gpus each these resources hold."""
    fits = [resources.get("CPU", 0.0) / cpus] + ([resources.get("GPU", 0.0) / gpus] if gpus else [])
    return math.floor(min(fits) + 1e-9)


@dataclass(eq=False)
class Slot:
    """One replica actor, from launch to death."""

    index: int
    actor: Any
    replica_id: str = ""  # set once loaded
    pid: int = 0
    node_ip: str = ""
    node_id: str = ""
    actor_id: str = ""  # the key of its "running" record (sensray.executors.actor.mark_running)
    inflight: deque = field(default_factory=deque)  # ObjectRefs, oldest first

    @property
    def ready(self) -> bool:
        return bool(self.replica_id)


class RayExecutor:
    def __init__(
        self,
        spec: ExperimentSpec,
        address: str | None = None,
        replicas: int | str | None = None,
        depth: int = 2,
        max_attempts: int = 3,
        replica_factory: ReplicaFactory | None = None,
        num_cpus: int | None = None,
        report_every: float = 30.0,
        log: Callable[[str], None] | None = None,
    ):
        self.spec, self.address, self.depth, self.max_attempts = spec, address, depth, max_attempts
        self.asked = replicas if replicas is not None else spec.resources.replicas
        self.factory, self.num_cpus, self.report_every = replica_factory, num_cpus, report_every
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.slots: list[Slot] = []
        self.refs: dict[Any, tuple[Slot, Trial | None]] = {}  # in flight: load (trial None) or trial
        self.attempts: Counter[str] = Counter()
        self.retry: deque[Trial] = deque()
        self.baseline: dict | None = None
        self.committed: list[dict] = []  # changes every replica holds (and a new one replays): see commit()
        self.started_ray = False
        self.launched = self.deaths_in_a_row = 0
        self.target = 0
        self._remote = None

    # -- the Executor protocol ---------------------------------------------------------------

    @property
    def replicas(self) -> int:
        """Replicas alive and loaded now (the progress line shows it)."""
        return sum(slot.ready for slot in self.slots)

    def start(self) -> dict:
        self.started_ray = connect(self.address, self.num_cpus)
        import ray

        res = self.spec.resources
        self._check_feasible(ray.cluster_resources())
        self.target = replica_count(res.cpus, res.gpus, self.asked, ray.available_resources())
        self._check_replicas_fit(ray.cluster_resources(), ray.available_resources())
        for _ in range(self.target):
            self._launch()
        while self.baseline is None:  # the first replica to load; the others join while trials run
            self._step()
        return self.baseline

    def run(self, trials, on_row: Callable[[dict], None]) -> None:
        """Run every trial (a list, or a feed with poll/finished) once; on_row(row) as each lands."""
        feed = trials if hasattr(trials, "poll") else StaticFeed(trials)
        while True:
            dispatched = self._fill(feed)
            busy = any(trial is not None for _, trial in self.refs.values())
            if not busy and not self.retry and feed.finished():
                return
            if not busy and not dispatched and self.replicas and not self.retry:
                raise SensrayError("the trial source has nothing to run and nothing is in flight")
            self._step(on_row)

    def checksums(self) -> list[str]:
        """Each live replica's weights checksum now (a replica that died since is skipped)."""
        import ray

        pending = [(slot, slot.actor.checksum.remote()) for slot in self.slots if slot.ready]
        out = []
        for slot, ref in pending:
            try:
                out.append(ray.get(ref))
            except _lost_errors() as err:
                self.log(f"replica {slot.replica_id} died before its final checksum ({_first_line(err)})")
        if not out:
            raise SensrayError("no replica is left to checksum the weights after the sweep")
        return out

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for slot in self.slots:
            _kill(slot.actor)
            with contextlib.suppress(Exception):  # a cluster whose head is gone: nothing left to tidy
                forget_running(slot.actor_id)
        self.slots, self.refs = [], {}
        if self.started_ray:
            ray.shutdown()

    # -- the pool ----------------------------------------------------------------------------

    def _launch(self) -> None:
        import ray

        res = self.spec.resources
        if self._remote is None:
            self._remote = ray.remote(ReplicaActor).options(
                num_cpus=res.cpus, num_gpus=res.gpus, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD")
        slot = Slot(self.launched, self._remote.remote(max(1, int(res.cpus))))
        self.launched += 1
        self.slots.append(slot)
        self.refs[slot.actor.load.remote(self.spec.resolved(), slot.index, self.factory, list(self.committed))] = (
            slot, None)

    def _fill(self, feed) -> int:
        """Top every loaded replica up to `depth` trials in flight, one level at a time (fair)."""
        sent = 0
        for level in range(self.depth):
            for slot in self.slots:
                if slot.ready and len(slot.inflight) <= level:
                    trial = self.retry.popleft() if self.retry else feed.poll()
                    if trial is None:
                        return sent
                    ref = slot.actor.run_trial.remote(trial)
                    slot.inflight.append(ref)
                    self.refs[ref] = (slot, trial)
                    sent += 1
        return sent

    def _step(self, on_row: Callable[[dict], None] | None = None) -> None:
        """Wait for one result (a trial's row, or a replica that finished loading) and take it in."""
        import ray

        if not self.refs:
            raise SensrayError("every replica is gone and none could be started; see the errors above")
        ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=self.report_every)
        if not ready:
            self._report_wait()
            return
        ref = ready[0]
        slot, trial = self.refs[ref]
        try:
            value = ray.get(ref)
        except _lost_errors() as err:
            if getattr(err, "actor_init_failed", False):
                raise _cause(err) from None
            self._lost(slot, err, on_row)
            return
        except ray.exceptions.RayTaskError as err:  # RestoreError, a failed load, or a bug: stop, as locally
            raise _cause(err) from None
        del self.refs[ref]
        if trial is None:
            self._loaded(slot, value)
        else:
            slot.inflight.remove(ref)
            self.deaths_in_a_row = 0
            on_row(value)

    def _loaded(self, slot: Slot, info: dict) -> None:
        baseline = info["baseline"]
        if self.baseline is not None and baseline["checksum_at_load"] != self.baseline["checksum_at_load"]:
            raise SensrayError(
                f"replica {info['replica_id']} loaded different weights (checksum {baseline['checksum_at_load']}) "
                f"than the first replica ({self.baseline['checksum_at_load']}): are the nodes' model caches the same?")
        slot.replica_id, slot.pid, slot.node_ip, slot.node_id, slot.actor_id = (
            info["replica_id"], info["pid"], info["node_ip"], info["node_id"], info["actor_id"])
        if self.baseline is None:
            self.baseline = baseline
        behind = len(self.committed) - info["committed"]
        if behind:  # changes committed while it loaded
            self._committed_on(slot, slot.actor.commit.remote(self.committed[-behind:]))

    def _lost(self, slot: Slot, err: Exception, on_row: Callable[[dict], None] | None) -> None:
        """A replica died: requeue its trials in flight (the one it was running counts an attempt), replace it."""
        trials = [self.refs.pop(ref)[1] for ref in slot.inflight]
        self.refs = {ref: owner for ref, owner in self.refs.items() if owner[0] is not slot}
        slot.inflight.clear()
        self.slots.remove(slot)
        _kill(slot.actor)
        reason = _first_line(err)
        running = _running(slot, trials)
        if running is not None:
            self.attempts[running.trial_id] += 1
            if self.attempts[running.trial_id] >= self.max_attempts and on_row is not None:
                trials.remove(running)
                on_row(died_row(running, slot.replica_id, self.attempts[running.trial_id], reason))
        self.retry.extendleft(reversed(trials))
        self.deaths_in_a_row += 1
        name = slot.replica_id or f"ray-{slot.index} (loading)"
        during = f" running trial {running.trial_id}" if running is not None else ""
        self.log(f"replica {name} died{during} ({reason}); {len(trials)} trial(s) requeued, starting a replacement")
        if self.deaths_in_a_row > max(3, 2 * self.target):
            raise SensrayError(f"{self.deaths_in_a_row} replicas died in a row without finishing a trial; "
                               f"last: {reason}")
        self._launch()

    # -- committed state and questions: an attack's loop (sensray.attack); ordinary sweeps use neither --

    def commit(self, changes: list[dict]) -> None:
        """Make `changes` part of every replica's state, with no trial in flight: loaded replicas apply them
        now, loading ones once loaded, and a replacement replays the whole list while it loads."""
        self.committed.extend(changes)
        for slot, ref in [(slot, slot.actor.commit.remote(changes)) for slot in self.slots if slot.ready]:
            self._committed_on(slot, ref)

    def _committed_on(self, slot: Slot, ref) -> None:
        import ray

        try:
            ray.get(ref)
        except _lost_errors() as err:
            self._lost(slot, err, None)  # its replacement replays self.committed while it loads
        except ray.exceptions.RayTaskError as err:  # e.g. RestoreError: the change does not fit these weights
            raise _cause(err) from None

    def ask(self, question: str, *args: Any) -> Any:
        """One loaded replica's answer (sensray.executors.actor.answer), e.g. the attack's gradient ranking;
        a replica that dies answering is replaced and the next one asked."""
        import ray

        while True:
            slot = next((s for s in self.slots if s.ready), None)
            if slot is None:
                self._step()  # no trial is in flight: this waits for a replica to load
                continue
            try:
                return ray.get(slot.actor.ask.remote(question, *args))
            except _lost_errors() as err:
                self._lost(slot, err, None)
            except ray.exceptions.RayTaskError as err:
                raise _cause(err) from None

    def _check_feasible(self, total: dict[str, float]) -> None:
        res = self.spec.resources
        if self.address is None and (total.get("CPU", 0) < res.cpus or total.get("GPU", 0) < res.gpus):
            raise SpecError(
                "resources", f"one replica needs {res.cpus:g} CPU and {res.gpus:g} GPU, but this machine's Ray has "
                f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU (set resources.cpus/gpus, or --address)")

    def _check_replicas_fit(self, total: dict[str, float], free: dict[str, float]) -> None:
        """More replicas than fit: on this machine's Ray an error (they would never start); on a
        cluster a note (an autoscaler may add nodes, and the rest start as resources free up)."""
        res = self.spec.resources
        fit = fitting(res.cpus, res.gpus, total if self.address is None else free)
        if self.target <= fit:
            return
        need = f"{self.target} replicas need {self.target * res.cpus:g} CPU" + (
            f" and {self.target * res.gpus:g} GPU" if res.gpus else "")
        if self.address is None:
            have = f"{total.get('CPU', 0):g} CPU" + (f" and {total.get('GPU', 0):g} GPU" if res.gpus else "")
            raise SpecError("resources.replicas", f"{need}; this machine's Ray has {have}, which fits {fit} "
                                                  f"(--replicas {fit}, or lower resources.cpus/gpus)")
        self.log(f"note: {need}; the cluster has room for {fit} now, the other {self.target - fit} wait for "
                 "resources (an autoscaler may add nodes)")

    def _report_wait(self) -> None:
        import ray

        loading = sum(not slot.ready for slot in self.slots)
        if loading and not self.replicas:
            res = self.spec.resources
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            self.log(f"waiting for replicas: {loading} starting, each needs {res.cpus:g} CPU and {res.gpus:g} GPU; "
                     f"free now: {free}")


def _lost_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "the replica (its process or its node) is gone", not "the trial failed"."""
    from ray import exceptions as x

    return (x.RayActorError, x.WorkerCrashedError, x.OutOfMemoryError, x.NodeDiedError, x.ObjectLostError,
            x.ActorUnschedulableError, x.LocalRayletDiedError)


def _running(slot: Slot, trials: list[Trial]) -> Trial | None:
    """Which of a dead replica's unanswered trials it was running: the one it last started, if that
    one's row never came back; None if it died loading, idle, or between trials.

    Not simply the oldest unanswered one: that one may have finished, its reply lost with the process
    when the next trial killed it at once; charging it would retry the trial that kills replicas once
    more than max_attempts and, at max_attempts 1, record an innocent trial as ReplicaDied."""
    started = started_last(slot.actor_id)
    return next((trial for trial in trials if trial.trial_id == started), None)


def died_row(trial: Trial, replica_id: str, attempts: int, reason: str) -> dict:
    """The row of a trial whose replica died every time it ran it: a result, like an OOM."""
    from sensray.replica import METRICS

    return {**trial.config(), **dict.fromkeys(METRICS), "seconds": None, "replica": replica_id,
            "error": f"ReplicaDied: the replica died {attempts} times running this trial (last: {reason})"}


def _cause(err: Exception) -> Exception:
    """The exception raised inside the actor (RayTaskError.cause), else the Ray error itself."""
    if getattr(err, "actor_init_failed", False):
        return SensrayError(f"a replica failed to start: {_constructor_error(err)}")
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else err


def _constructor_error(err: Exception) -> str:
    """What an actor's constructor raised: Ray puts it on the last line of its (coloured) message, after a
    first line that only says where the actor died."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead, or its node is gone: nothing left to stop
        pass
