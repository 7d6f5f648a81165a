"""What runs inside one Ray actor: a resident Replica, trials in, rows out.

A plain class with no Ray import: `sensray.executors.ray` wraps it with `ray.remote` and the
resources the spec asks for. Loading happens in `load()`, not `__init__`, so a bad model or
corpus comes back to the driver as the original error (one readable message) instead of an
actor that died in its constructor.

    actor = ray.remote(ReplicaActor).options(num_cpus=1, num_gpus=1).remote(threads=1)
    info = ray.get(actor.load.remote(spec.resolved(), index=0))   # baseline, pid, node
    row = ray.get(actor.run_trial.remote(trial))
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Callable

# (spec, replica id) -> an object with run_trial(trial) -> row, checksum() and a `baseline` dataclass.
ReplicaFactory = Callable[[Any, str], Any]
RUNNING = "sensray-running"  # Ray's internal KV namespace: actor id -> the trial that actor last started


class ReplicaActor:
    def __init__(self, threads: int):
        import torch

        # Ray sets OMP_NUM_THREADS from num_cpus; say it to torch too, so that two replicas on one
        # machine do not each spin up a thread per core and fight over them.
        torch.set_num_threads(threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a loading bar per actor, prefixed by Ray, is only noise
        self.replica = None
        self.actor_id = ""

    def load(self, spec: dict, index: int, factory: ReplicaFactory | None = None,
             committed: list | None = None) -> dict:
        """Load the model and eval data once (then replay `committed` changes); return the baseline and where
        this replica lives."""
        from sensray.spec import validate

        spec_ = validate(spec)
        import ray

        node_ip = ray.util.get_node_ip_address()
        self.actor_id = ray.get_runtime_context().get_actor_id()
        replica_id = f"ray-{index}@{node_ip}"
        self.replica = (factory or build_replica)(spec_, replica_id)
        if committed:
            self.replica.commit(committed)
        return {"baseline": asdict(self.replica.baseline), "replica_id": replica_id, "pid": os.getpid(),
                "node_ip": node_ip, "node_id": ray.get_runtime_context().get_node_id(),
                "committed": len(committed or ()), "actor_id": self.actor_id}

    def run_trial(self, trial) -> dict:
        mark_running(self.actor_id, trial.trial_id)
        return self.replica.run_trial(trial)

    def checksum(self) -> str:
        return self.replica.checksum()

    # -- committed state and questions: an attack's loop (sensray.attack); ordinary sweeps use neither --

    def commit(self, changes: list) -> int:
        self.replica.commit(changes)
        return len(self.replica.committed)

    def ask(self, question: str, *args: Any) -> Any:
        return answer(self.replica, question, args)


def mark_running(actor_id: str, trial_id: str) -> None:
    """Record in the GCS, before the trial starts, that this actor runs it (one small synchronous put).

    The driver keeps two trials in flight per actor, and the reply carrying a finished trial's row can
    die with the process when the next trial kills it at once: the driver then sees both fail and cannot
    tell from its refs which one was running. It reads this record instead (sensray.executors.ray._running)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(actor_id, trial_id, namespace=RUNNING)


def started_last(actor_id: str) -> str | None:
    """The trial an actor (dead now) last started, read once and forgotten; None if it started none."""
    from ray.experimental import internal_kv

    if not actor_id:
        return None
    trial_id = internal_kv._internal_kv_get(actor_id, namespace=RUNNING)
    forget_running(actor_id)
    return trial_id.decode() if trial_id is not None else None


def forget_running(actor_id: str) -> None:
    """Drop an actor's record (its replica is gone or the sweep is closing): the GCS outlives sweeps."""
    from ray.experimental import internal_kv

    if actor_id:
        internal_kv._internal_kv_del(actor_id, namespace=RUNNING)


def answer(replica, question: str, args: tuple) -> Any:
    """What a specialised replica (built by a factory, e.g. the attack's) answers: only the methods it
    names in `questions`, so a driver can ask for a gradient ranking but never call anything else."""
    if question not in getattr(replica, "questions", ()):
        from sensray.errors import SensrayError

        raise SensrayError(f"a {type(replica).__name__} does not answer {question!r} (it answers: "
                           f"{', '.join(getattr(replica, 'questions', ())) or 'nothing'})")
    return getattr(replica, question)(*args)


def build_replica(spec, replica_id: str):
    """A Replica; with resources.gpus >= 2, its model is sharded over this actor's GPUs by accelerate."""
    from sensray.replica import Replica

    if spec.resources.gpus >= 2:
        return Replica(spec, replica_id, model=load_sharded(spec.model))
    return Replica(spec, replica_id)


def load_sharded(model_spec):
    """from_pretrained with device_map="auto": layers spread over every GPU Ray gave this actor.

    accelerate returns the logits to the input's device, so the Replica feeds batches to cuda:0
    and compares there, exactly as with one GPU.
    """
    import torch

    from sensray.models import load_model

    return load_model(model_spec, torch.device("cuda"), device_map="auto")  # quantized ones too

