"""A heal on several workers: Ray Train's TorchTrainer, on sensray's Ray (loopback, or a cluster).

    run_on_ray(job, recipe, address=None)       # a local Ray bound to 127.0.0.1, recipe.workers workers
    run_on_ray(job, recipe, address="auto")     # a running cluster; the state dir must be on shared storage

Each worker runs heal.loop.train(job): the process group comes from Ray Train (gloo on CPUs, nccl
on GPUs), DDP through accelerate or ZeRO through DeepSpeed. Worker 0 writes checkpoints and the
export into the heal's state directory and output, which every node must see (on a cluster, put
--output-dir on a shared filesystem, as Ray Train's own storage_path must be). Ray Train's files go
inside the state directory, so nothing lands in ~/ray_results.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

from sensray.errors import SensrayError

# With no dashboard, Ray Train v2's placement-group monitor logs this about once a second; it only says the
# state API is unavailable, which a loopback Ray started without a dashboard never has (measured: harmless).
NOISE = ("Failed to query Ray Train Controller actor state",)


def run_on_ray(job: dict, recipe, address: str | None) -> None:
    import ray

    from sensray.executors.ray import connect

    started = connect(address)
    try:
        trainer = _trainer(job, recipe)
        with _quiet(NOISE):
            result = trainer.fit()
        if result.error is not None:
            raise _unwrapped(result.error)
    except Exception as err:
        raise _unwrapped(err) from None
    finally:
        if started:
            ray.shutdown()


def _trainer(job: dict, recipe):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sensray.heal.loop import train

    gpus = ray.cluster_resources().get("GPU", 0)
    if recipe.model.device == "cuda" and gpus < recipe.workers:
        raise SensrayError(f"model.device: cuda asks for {recipe.workers} GPU workers; the cluster has {gpus:g} GPUs")
    use_gpu = recipe.model.device != "cpu" and gpus >= recipe.workers
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1) // recipe.workers)) if not use_gpu else 1
    resources = {"CPU": cpus} | ({"GPU": 1} if use_gpu else {})
    return TorchTrainer(
        train,
        train_loop_config=job | {"threads": cpus},
        scaling_config=ScalingConfig(num_workers=recipe.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="heal", storage_path=str(Path(job["work"]) / "ray")),
    )


def _unwrapped(err: BaseException) -> BaseException:
    """A worker's SensrayError arrives wrapped by Ray Train: hand back the original (one readable line);
    any other error as it came."""
    todo, seen = [err], set()
    while todo:
        found = todo.pop()
        if id(found) in seen:
            continue
        seen.add(id(found))
        if isinstance(found, SensrayError):
            return found
        failures = getattr(found, "worker_failures", None)
        todo += list(failures.values()) if isinstance(failures, dict) else []
        todo += [getattr(found, name, None) for name in ("__cause__", "cause")]
        todo = [e for e in todo if isinstance(e, BaseException)]
    return err


@contextlib.contextmanager
def _quiet(noise: tuple[str, ...]) -> Iterator[None]:
    """Drop the lines of stderr that contain any of `noise` while Ray relays its workers' logs."""
    real = sys.stderr

    class Filtered:
        def write(self, text: str) -> int:
            kept = "".join(line for line in text.splitlines(keepends=True) if not any(n in line for n in noise))
            return real.write(kept) if kept else len(text)

        def __getattr__(self, name: str):
            return getattr(real, name)

    sys.stderr = Filtered()
    try:
        yield
    finally:
        sys.stderr = real
