"""What distribution costs and what it buys: the Ray executor's overhead, scaling and startup.

    python benchmarks/ray_overhead.py                    # everything, as markdown for docs/BENCHMARKS.md
    python benchmarks/ray_overhead.py --only overhead --trials 400
    python benchmarks/ray_overhead.py --only scaling --sequences 4 --scaling-trials 30 --rounds 3
    python benchmarks/ray_overhead.py --only tune        # the alternative not taken: a Tune trainable per trial

    overhead  a replica that does no work (returns a fixed row): what is left per trial is the engine,
              i.e. dispatch, the result's trip back, the driver's fsynced journal and progress line.
              Per-trial latency at 1 in flight (median), and throughput with 2 in flight per replica.
    tune      the same no-op trials as a Tune class trainable with reuse_actors=True (storage in a temp dir)
    scaling   a ~40M-parameter random Llama (trial_rate.LLAMA_40M), bit-flip trials on 16 x 128 tokens
              (as trial_rate.py; --sequences 4 for a quarter): trials/s of 1 replica x 1 thread,
              2 x 1 thread, 1 x 2 threads, and the local executor, each measured --rounds times,
              interleaved, from the moment every replica has loaded; a measurement during which other
              programs used more than 0.1 of a core is taken again
    startup   seconds from `python -m sensray.sweep` to the first row in the journal, Ray and local

Everything runs on a local Ray bound to 127.0.0.1 and stops it again. Numbers depend on the
machine and its load; docs/BENCHMARKS.md records where they were taken.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
CORPUS = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # benchmark corpus line {i}\n" for i in range(2000))


@dataclass(frozen=True)
class NoBaseline:
    model: str = "none"
    source: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    parameters: int = 0
    tokens: int = 0
    sequences: int = 0
    nll: float = 0.0
    ppl: float = 1.0
    checksum_at_load: str = "-"


class NoWorkReplica:
    """A replica that does no model work: what remains per trial is the engine's own cost."""

    def __init__(self, spec, replica_id):
        self.replica_id, self.baseline = replica_id, NoBaseline()

    def run_trial(self, trial):
        start = time.perf_counter()
        row = {**trial.config(), "ppl": 1.0, "nll": 0.0, "delta_ppl": 1.0, "kl": 0.0, "top1_agreement": 1.0,
               "nonfinite": False, "replica": self.replica_id, "error": None}
        return row | {"seconds": time.perf_counter() - start}

    def checksum(self):
        return "-"


def no_work_replica(spec, replica_id):
    return NoWorkReplica(spec, replica_id)


def tiny_dir(root: Path, config: dict | None = None) -> tuple[str, str]:
    """A random Llama (tiny, or `config`) with a character tokenizer, and a corpus, under root."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from sensray.testing import tiny_model

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)} | {"[UNK]": len(chars)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    path = root / ("llama-40m" if config else "tiny")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config)) if config else tiny_model("llama")
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    (root / "corpus.txt").write_text(CORPUS)
    return str(path), str(root / "corpus.txt")


def spec_for(model: str, corpus: str, out: Path, samples: int, cpus: int = 1, replicas: int = 1,
             seq_len: int = 32, sequences: int = 2):
    """Bit flips in every block, `samples` times (the tiny model has 2 blocks, the 40M one 10)."""
    from sensray.spec import validate

    return validate({
        "name": "bench", "model": {"name": model, "device": "cpu"}, "output_dir": str(out),
        "data": {"corpus": corpus, "seq_len": seq_len, "num_sequences": sequences, "batch_size": sequences},
        "perturbation": "bitflip", "num_samples": samples,
        "space": {"target": {"each": "blocks.*"}, "field": "exponent_msb", "count": 1},
        "resources": {"cpus": cpus, "replicas": replicas},
    })


def ready_executor(spec, **options):
    """A started RayExecutor with every replica loaded (so that timing starts at steady state)."""
    from sensray.executors.ray import RayExecutor

    executor = RayExecutor(spec, log=lambda line: None, **options)
    executor.start()
    while executor.replicas < executor.target:
        executor._step()
    return executor


def journaled(run_dir: Path, total: int):
    """The driver's real per-row work: fsynced journal append and the progress line (to /dev/null)."""
    from sensray.progress import Progress
    from sensray.results import Journal

    journal = Journal(run_dir / "trials.jsonl")
    progress = Progress(total=total, stream=open(os.devnull, "w"))

    def on_row(row):
        journal.append(row)
        progress.update(failed=row["error"] is not None)

    return journal, on_row


def bench_overhead(root: Path, trials: int) -> list[str]:
    from sensray.plan import make_plan

    model, corpus = tiny_dir(root)
    spec = spec_for(model, corpus, root, trials // 2)
    plan = make_plan(spec)
    lines = []
    for replicas, depth in ((1, 1), (1, 2), (2, 2)):
        executor = ready_executor(spec, replicas=replicas, depth=depth, replica_factory=no_work_replica)
        journal, on_row = journaled(root, len(plan.trials))
        sent, latencies = {}, []

        def timed(row):
            on_row(row)
            latencies.append(time.perf_counter() - sent.pop(row["trial_id"]) - row["seconds"])

        original = executor._fill

        def fill(feed):  # stamp each trial as it is dispatched
            before = {id(r) for r in executor.refs}
            count = original(feed)
            for ref, (_, trial) in executor.refs.items():
                if id(ref) not in before and trial is not None:
                    sent[trial.trial_id] = time.perf_counter()
            return count

        executor._fill = fill
        start = time.perf_counter()
        try:
            executor.run(plan.trials, timed)
        finally:
            wall = time.perf_counter() - start
            journal.close()
            executor.close()
        lines.append(f"| {replicas} | {depth} | {len(plan.trials)} | {1000 * statistics.median(latencies):.2f} | "
                     f"{1000 * wall / len(plan.trials):.2f} | {len(plan.trials) / wall:.0f} |")
    return ["| replicas | in flight per replica | trials | median latency - replica time (ms) | "
            "wall per trial (ms) | trials/s |", "|---|---|---|---|---|---|", *lines]


def bench_tune(trials: int) -> list[str]:
    import ray
    from ray import tune

    class NoWork(tune.Trainable):
        def setup(self, config):
            self.config_ = config

        def step(self):
            return {"ppl": 1.0, "done": True}

        def reset_config(self, new_config):
            self.config_ = new_config
            return True

        def save_checkpoint(self, checkpoint_dir):
            return {}

        def load_checkpoint(self, checkpoint):
            pass

    from sensray.executors.ray import LOCAL_OBJECT_STORE, LOOPBACK, loopback_only

    loopback_only()
    ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, log_to_driver=False,
             object_store_memory=LOCAL_OBJECT_STORE, logging_level="error")  # Tune's per-trial log lines: off
    try:
        with tempfile.TemporaryDirectory() as storage:
            tuner = tune.Tuner(
                tune.with_resources(NoWork, {"cpu": 1}), param_space={"i": tune.grid_search(list(range(trials)))},
                tune_config=tune.TuneConfig(reuse_actors=True),
                run_config=tune.RunConfig(storage_path=storage, verbose=0))
            start = time.perf_counter()
            tuner.fit()
            wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    return ["| engine | trials | wall per trial (ms) |", "|---|---|---|",
            f"| Tune class trainable, reuse_actors=True | {trials} | {1000 * wall / trials:.1f} |"]


SCALING = (("ray: 1 replica x 1 thread", 1, 1), ("ray: 2 replicas x 1 thread", 1, 2),
           ("ray: 1 replica x 2 threads", 2, 1), ("local executor (torch default threads)", 0, 0))


def bench_scaling(root: Path, trials: int, rounds: int, sequences: int) -> list[str]:
    """Each configuration `rounds` times, interleaved; a measurement during which other programs used
    more than QUIET of a core is taken again (the machine is shared), up to 5 times."""
    from trial_rate import LLAMA_40M

    from sensray.plan import make_plan

    model, corpus = tiny_dir(root, LLAMA_40M)
    rates: dict[str, list[float]] = {name: [] for name, _, _ in SCALING}
    inside: dict[str, list[float]] = {name: [] for name, _, _ in SCALING}
    noise = []
    for _ in range(rounds):
        for name, cpus, replicas in SCALING:
            spec = spec_for(model, corpus, root, trials // 10, cpus=max(cpus, 1), replicas=max(replicas, 1),
                            seq_len=128, sequences=sequences)
            for _attempt in range(5):
                rows, wall, foreign = _timed_run(spec, make_plan(spec).trials, ray=bool(replicas))
                if foreign < QUIET:
                    break
                print(f"  ({name}: other programs used {foreign:.2f} of a core; measuring again)", file=sys.stderr)
            noise.append(foreign)
            rates[name].append(len(rows) / wall)
            inside[name].append(statistics.median(r["seconds"] for r in rows))
    med = {name: statistics.median(values) for name, values in rates.items()}
    lines = [f"| {name} | {statistics.median(inside[name]) * 1000:.0f} | {med[name]:.2f} | "
             f"{', '.join(f'{r:.2f}' for r in rates[name])} |" for name, _, _ in SCALING]
    speedup = med["ray: 2 replicas x 1 thread"] / med["ray: 1 replica x 1 thread"]
    return [f"{trials} trials x {rounds} rounds per configuration, eval {sequences} x 128 tokens; other programs "
            f"used at most {max(noise):.2f} of a core during a kept measurement", "",
            "| configuration | median trial in the replica (ms) | trials/s (median) | trials/s per round |",
            "|---|---|---|---|", *lines, f"| **2 replicas x 1 thread vs 1 x 1** | | **{speedup:.2f}x** | |"]


QUIET = 0.1  # of a core: what other programs may use during a scaling measurement


def _timed_run(spec, trials, ray: bool) -> tuple[list[dict], float, float]:
    """Run `trials` on a ready executor: (rows, seconds from first dispatch to last row, the cores
    that programs outside this benchmark's process tree used meanwhile)."""
    from sensray.executors.local import LocalExecutor

    rows: list[dict] = []
    executor = ready_executor(spec) if ray else LocalExecutor(spec)
    try:
        if not ray:
            executor.start()
        busy, mine = _busy_seconds(), _tree_seconds()
        start = time.perf_counter()
        executor.run(trials, rows.append)
        wall = time.perf_counter() - start
        foreign = ((_busy_seconds() - busy) - (_tree_seconds() - mine)) / wall
        return rows, wall, max(0.0, foreign)
    finally:
        executor.close()


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def _tree_seconds() -> float:
    """CPU seconds of this process and every process below it (the driver, Ray, the replicas)."""
    import psutil

    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def bench_startup(root: Path, repeats: int) -> list[str]:
    model, corpus = tiny_dir(root)
    spec = root / "startup.yaml"
    spec.write_text(f"name: startup\nmodel: {{name: '{model}'}}\n"
                    f"data: {{corpus: '{corpus}', seq_len: 32, num_sequences: 2, batch_size: 2}}\n"
                    f"perturbation: bitflip\nspace: {{target: {{each: 'blocks.*'}}, field: mantissa, count: 1}}\n"
                    f"num_samples: 20\noutput_dir: '{root / 'results'}'\nresources: {{replicas: 2}}\n")
    lines = []
    for executor in ("ray", "local"):
        firsts, totals = [], []
        for _ in range(repeats):
            first, total = _time_to_first_row(spec, executor, root / "results" / "startup")
            firsts.append(first)
            totals.append(total)
        lines.append(f"| {executor} | {statistics.median(firsts):.1f} | {statistics.median(totals):.1f} |")
    return ["| executor | command to first row (s) | command to exit, 40 trials (s) |", "|---|---|---|", *lines]


def _time_to_first_row(spec: Path, executor: str, results: Path) -> tuple[float, float]:
    before = set(results.glob("*")) if results.exists() else set()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sensray.sweep", str(spec), "--executor", executor], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    while proc.poll() is None:
        if first is None:
            new = [p / "trials.jsonl" for p in results.glob("*") if p not in before] if results.exists() else []
            if any(j.is_file() and j.stat().st_size for j in new):
                first = time.perf_counter() - start
        time.sleep(0.005)
    total = time.perf_counter() - start
    assert proc.returncode == 0, f"the {executor} sweep failed"
    return first if first is not None else total, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["overhead", "tune", "scaling", "startup"], action="append")
    parser.add_argument("--trials", type=int, default=400, help="no-work trials for overhead and tune")
    parser.add_argument("--scaling-trials", type=int, default=20, help="trials per scaling measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of each scaling configuration")
    parser.add_argument("--sequences", type=int, default=16, help="eval sequences of 128 tokens (trial_rate.py: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="startup measurements per executor")
    args = parser.parse_args()
    wanted = args.only or ["overhead", "tune", "scaling", "startup"]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start\n")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in wanted:
            (root / name).mkdir()
            table = {"overhead": lambda: bench_overhead(root / name, args.trials),
                     "tune": lambda: bench_tune(args.trials // 4),
                     "scaling": lambda: bench_scaling(root / name, args.scaling_trials, args.rounds, args.sequences),
                     "startup": lambda: bench_startup(root / name, args.repeats)}[name]()
            print(f"### {name}\n\n" + "\n".join(table) + "\n", flush=True)


if __name__ == "__main__":
    main()
