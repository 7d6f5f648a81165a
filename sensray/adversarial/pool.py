"""Where the attack's work runs: one replica in this process, or sensray's Ray replica pool.

    with open_pool(spec, executor="local") as pool:          # AttackReplica in this process
        grads = pool.map([Work("g-0", "gradient", problem, edit)])
    with open_pool(spec, executor="ray", replicas=4) as pool: # RayExecutor's actors, each an AttackReplica

The Ray path is the sweep's own pool (sensray.executors.ray.RayExecutor), not a second one: its
`replica_factory` seam builds an `AttackReplica` inside each actor, and `map` feeds it `Work` items
the way a sweep feeds trials (depth-2 queues, dead replicas replaced and their items requeued, a
replica's error raised on the driver as itself). The executor needs an ExperimentSpec for the
resources and the model each actor loads; `pool_spec` is that spec (its perturbation is never used:
every transfer item names its own kind). In Ray mode the driver holds no model at all: on a
cluster its head node has no GPU (cluster.yaml), so gradients, losses and generation all go to
the replicas.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

from sensray.adversarial.replica import AttackReplica, Work, build_replica
from sensray.adversarial.spec import AdversarialSpec
from sensray.errors import SensrayError


class LocalPool:
    """One AttackReplica in this process (no Ray): the shipped model on a laptop, tests."""

    replicas = 1

    def __init__(self, spec: AdversarialSpec, model=None, tokenizer=None):
        import torch

        # As many torch threads as a Ray replica of the spec gets (resources.cpus): on a busy machine,
        # threads beyond the cores they are given wait on each other at every op.
        self.threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(spec.resources.cpus)))
        try:
            self.replica = AttackReplica(spec, "local-0", model=model, tokenizer=tokenizer)
        except BaseException:
            torch.set_num_threads(self.threads)
            raise
        self.baseline = self.replica.baseline

    def map(self, works: list[Work]) -> list:
        return [_result(self.replica.run_trial(work)) for work in works]

    def checksums(self) -> list[str]:
        return [self.replica.checksum()]

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        self.replica = None


class RayPool:
    """The sweep's replica-actor pool running AttackReplicas."""

    def __init__(self, spec: AdversarialSpec, address: str | None = None, replicas=None):
        from sensray.executors.ray import RayExecutor

        factory = functools.partial(build_replica, spec.resolved())
        self.executor = RayExecutor(pool_spec(spec), address=address, replicas=replicas, replica_factory=factory)
        self.baseline = None

    def start(self) -> None:
        from sensray.adversarial.replica import AttackBaseline

        self.baseline = AttackBaseline(**self.executor.start())

    @property
    def replicas(self) -> int:
        """The replicas started (some may still be loading: work waits for them rather than going unsplit)."""
        return max(1, self.executor.target)

    def map(self, works: list[Work]) -> list:
        rows: dict[str, dict] = {}
        self.executor.run(works, lambda row: rows.__setitem__(row["trial_id"], row))
        return [_result(rows[work.trial_id]) for work in works]

    def checksums(self) -> list[str]:
        return self.executor.checksums()

    def close(self) -> None:
        self.executor.close()


def _result(row: dict):
    if row.get("error") is not None:  # only a replica that died on this item repeatedly leaves an error row
        raise SensrayError(f"work item {row['trial_id']}: {row['error']}")
    return row["result"]


def pool_spec(spec: AdversarialSpec):
    """The ExperimentSpec the Ray executor starts its actors from: model, data, resources."""
    from sensray.spec import ExperimentSpec

    return ExperimentSpec(name=spec.name, model=spec.model, data=spec.data, perturbation="zero", space={},
                          output_dir=spec.output_dir, resources=spec.resources)


def default_executor(spec: AdversarialSpec, address: str | None, replicas) -> str:
    """Ray when more than one replica is asked for (or a cluster's address); else this process."""
    asked = replicas if replicas is not None else spec.resources.replicas
    return "ray" if address is not None or asked != 1 else "local"


@contextlib.contextmanager
def open_pool(spec: AdversarialSpec, executor: str = "local", address: str | None = None, replicas=None,
              model=None, tokenizer=None) -> Iterator[LocalPool | RayPool]:
    """A started pool, closed on exit. `model`/`tokenizer`: an already loaded one (local only)."""
    if executor == "local":
        if address is not None or replicas not in (None, 1):
            raise SensrayError("--address and --replicas are for --executor ray")
        pool = LocalPool(spec, model, tokenizer)
    else:
        pool = RayPool(spec, address, replicas)
    try:
        if isinstance(pool, RayPool):
            pool.start()
        yield pool
    finally:
        pool.close()
