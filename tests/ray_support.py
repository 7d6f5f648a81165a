"""What the Ray tests share: a tiny model on disk, spec text, fault-injecting replicas, process checks.

Everything is built in-process (a random 2-layer Llama and a one-token-per-character tokenizer),
so the Ray tests need neither the Hub nor the shipped model. Ray is always bound to 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import textwrap
import time
from pathlib import Path

import psutil

from sensray.executors.ray import loopback_only

loopback_only()  # before Ray starts, even if another test module imported it already

CORPUS = "\n\n".join(
    f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i} of a tiny corpus for perplexity\n" for i in range(400))


def build_tiny_model(root: Path) -> tuple[Path, Path]:
    """A random tiny Llama with a character tokenizer, saved in HF format, and a text corpus."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sensray.testing import tiny_model

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)} | {"[UNK]": len(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    model_dir = root / "tiny-llama"
    tiny_model("llama", seed=1).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    return model_dir, corpus


def spec_text(model_dir: Path, corpus: Path, out: Path, num_samples: int = 3, extra: str = "") -> str:
    """A bit-flip sweep of 2 blocks x 2 fields x num_samples trials on the tiny model."""
    return textwrap.dedent(f"""\
        name: raysweep
        model: {{name: "{model_dir}"}}
        data: {{corpus: "{corpus}", seq_len: 32, num_sequences: 2, batch_size: 2}}
        perturbation: bitflip
        space:
          target: {{each: "blocks.*"}}
          field: {{grid_search: [exponent_msb, mantissa]}}
          count: 2
        num_samples: {num_samples}
        output_dir: "{out}"
        resources: {{cpus: 1, replicas: 2}}
        """) + extra


def spec_of(text: str):
    from sensray.spec import parse_spec

    return parse_spec(text)


def plan_of(text: str):
    from sensray.plan import make_plan

    return make_plan(spec_of(text))


# -- replicas with faults, built inside the actor (the factory travels to it by value) ----------


def slow_replica(seconds: float):
    """A real Replica whose trials take at least `seconds` (so a kill lands mid-trial)."""

    def build(spec, replica_id):
        from sensray.replica import Replica

        class Slow(Replica):
            def run_trial(self, trial):
                time.sleep(seconds)
                return super().run_trial(trial)

        return Slow(spec, replica_id)

    return build


def faulty_replica(crash_on: str = "", oom_on: str = "", restore_fails: bool = False, load_fails: bool = False,
                   dies_loading: bool = False):
    """A real Replica that dies on one trial, runs out of memory on another, cannot restore/load, or
    whose process dies while it loads."""

    def build(spec, replica_id):
        from sensray.errors import RestoreError, SensrayError
        from sensray.replica import Replica

        if load_fails:
            raise SensrayError("model.name: cannot load 'nowhere' (simulated)")
        if dies_loading:
            os._exit(1)  # e.g. the host's OOM killer, every time the model is read in

        class Faulty(Replica):
            def run_trial(self, trial):
                if trial.trial_id == crash_on:
                    os._exit(1)  # the process dies mid-trial, as with a segfault or the OOM killer
                if restore_fails:
                    raise RestoreError(f"trial {trial.trial_id}: weights differ from their originals (simulated)")
                if trial.trial_id == oom_on:
                    import sensray.replica as module

                    def out_of_memory(*args, **kwargs):
                        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

                    real = module.evaluate
                    module.evaluate = out_of_memory
                    try:
                        return super().run_trial(trial)
                    finally:
                        module.evaluate = real
                return super().run_trial(trial)

        return Faulty(spec, replica_id)

    return build


def different_weights(index: int):
    """Replica `index` loads weights that differ in one element, as from a stale model cache on its node."""

    def build(spec, replica_id):
        import torch

        from sensray.models import load_model
        from sensray.replica import Replica

        model = load_model(spec.model)
        if replica_id.startswith(f"ray-{index}@"):
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] += 1.0
        return Replica(spec, replica_id, model=model)

    return build


def unconstructible_actor(message: str):
    """A ReplicaActor class whose constructor raises (built here, so Ray ships it by value)."""
    from sensray.executors.actor import ReplicaActor

    class Unconstructible(ReplicaActor):
        def __init__(self, threads: int):
            raise RuntimeError(message)

    return Unconstructible


# -- running the executor --------------------------------------------------------------------------


def run_executor(plan, on_row=None, **options):
    """start + run + checksums + close; returns (rows, checksums, executor, log lines)."""
    from sensray.executors.ray import RayExecutor

    rows, logs = [], []
    executor = RayExecutor(plan.spec, log=logs.append, **options)
    try:
        executor.start()
        executor.run(plan.trials, lambda row: (rows.append(row), on_row and on_row(executor, rows)))
        checksums = executor.checksums()
    finally:
        executor.close()
    return rows, checksums, executor, logs


def assert_exactly_once(rows, plan):
    ids = [row["trial_id"] for row in rows]
    assert len(ids) == len(set(ids)), "a trial was recorded twice"
    assert set(ids) == {t.trial_id for t in plan.trials}, "a trial is missing"


# -- processes and sockets -------------------------------------------------------------------------


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def ray_descendants(root: int | None = None) -> list[psutil.Process]:
    """The Ray processes below this process (local Ray: GCS, raylet, agents, workers)."""
    me = psutil.Process(root or os.getpid())
    out = []
    for proc in me.children(recursive=True):
        try:
            name = " ".join(proc.cmdline()[:2]) + proc.name()
        except psutil.Error:
            continue
        if "ray" in name:
            out.append(proc)
    return out


def listening_sockets(procs: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
    """(pid, name, ip, port) of every TCP listener and every bound UDP socket of these processes."""
    found = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:
            continue
        for c in conns:
            if (c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN) or c.type == socket.SOCK_DGRAM:
                found.append((proc.pid, name, c.laddr.ip, c.laddr.port))
    return found


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == sid:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def stop_session(sid: int, grace: float = 10.0) -> list[str]:
    """Wait for a finished driver's session to empty; SIGKILL (by pid) what is left. Returns the leftovers."""
    deadline = time.time() + grace
    while time.time() < deadline and session_processes(sid):
        time.sleep(0.25)
    left = session_processes(sid)
    names = []
    for proc in left:
        try:
            names.append(proc.name())
            os.kill(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, psutil.Error):
            pass
    return names
