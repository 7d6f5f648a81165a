"""sensray next to the tools people use instead: PyTorchFI weight injection, nnsight block skipping, reload per trial.

    python benchmarks/peers.py                         # every table (in the peers venv: docs/BENCHMARKS.md)
    python benchmarks/peers.py --only fi --models tiny --trials 32 --rounds 2
    python benchmarks/peers.py --only skip
    python benchmarks/peers.py --only projection

Needs `pip install -e '.[peers]'` (pytorchfi 0.6.0, nnsight 0.8.1), in an environment of its own.

fi: the default study (experiments/bitflip.yaml: one bit flip in one element of one block) on the
    same model, eval tokens and fault positions, four ways, each in its own process per round, the
    ways' order rotating over --rounds rounds (medians shown):
      sensray   Replica.run_trial: flip in place, evaluate, restore, verify (prefix reuse on, the default)
      sensray-noreuse  the same with prefix reuse off: every trial runs the whole forward, as the others do
      pytorchfi fault_injection(...).declare_weight_fi(layer_num, k, dim1, value): a deep copy of the
                model with the element set to `value`, evaluated, then dropped (fi_reset)
      reload    the seed framework's way: the model loaded from disk for every trial, the element set
    The positions and values come from the first sensray process's rows (their `changes` column:
    tensor, coords, new_bits), so every way writes the same bits into the same element. Every way
    evaluates with sensray.metrics.evaluate against the same reference; rows are compared (nll, ppl,
    KL, top-1, nonfinite, and the written element's bits) before any time is printed.
skip: ablation `mode: skip` of every block in turn, --skip-repeats times: sensray (reuse on and off)
    vs nnsight 0.8.1, whose trace sets the block's output to its input (`layer.output =
    layer.inputs[0][0]`), each in its own process per round; metrics compared first.
projection: per-GB rates of copy.deepcopy (PyTorchFI's per-trial copy) and of a reload from a
    safetensors checkpoint in the page cache, measured here on the ~40M-parameter model, scaled to
    13.5 GB (Llama-2-7B in fp16/bf16): projections, labelled as such, next to sensray's measured
    apply+restore+verify of one flip on the same model.

PyTorchFI cannot wrap a causal LM as it is: its constructor profiles the model with
`torch.randn(1, *input_shape)`, float noise, which an embedding rejects. FloatIds (below) is the
smallest adapter that lets it through: it rounds its float input to token ids. Its layer_types are
nn.Linear and the model's RMSNorm class, so that flips in the norms (part of `blocks.*`) can be
injected too; layer_num counts those modules in `model.modules()` order, as PyTorchFI does.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # sensray, and trial_rate's helpers

from trial_rate import build_40m, peak_rss_mb  # noqa: E402

METRICS = ("nll", "ppl", "kl", "top1_agreement", "nonfinite")
GB = 1e9
SEVEN_B_GB = 13.5  # Llama-2-7B: 6.74e9 parameters x 2 bytes (fp16/bf16)
FI_WAYS = ("sensray", "sensray-noreuse", "pytorchfi", "reload")
SKIP_WAYS = ("sensray", "sensray-noreuse", "nnsight")


def study_spec(model_dir: str, reuse: bool = True):
    """The default study (experiments/bitflip.yaml) on `model_dir`."""
    from sensray.spec import load_spec

    return load_spec(REPO / "experiments" / "bitflip.yaml",
                     [f"model.name={model_dir}", f"reuse.prefix={str(reuse).lower()}"])


def study_trials(model_dir: str, count: int) -> list[dict]:
    """The first `count` trials of the default study in a seeded shuffle (a uniform sample of it)."""
    from sensray.plan import make_plan

    trials = make_plan(study_spec(model_dir)).trials
    random.Random(0).shuffle(trials)
    return [{"trial_id": t.trial_id, "kind": t.kind, "params": t.params} for t in trials[:count]]


def loaded(model_dir: str):
    """(model, eval batches, reference) exactly as a replica has them."""
    from sensray.data import eval_batches
    from sensray.metrics import reference
    from sensray.models import load_model, load_tokenizer

    spec = study_spec(model_dir)
    model = load_model(spec.model, torch.device("cpu"))
    batches = eval_batches(spec.data, load_tokenizer(spec.model))
    return model, batches, reference(model, batches)


def scores_row(trial_id: str, scores, bits_ok: bool | None = None) -> dict:
    row = {"trial_id": trial_id, **{m: getattr(scores, m) for m in METRICS}}
    return row | ({"bits_ok": bits_ok} if bits_ok is not None else {})


# ----------------------------------------------------------------------------- fi: the three ways


def fi_sensray(model_dir: str, trials: list[dict], reuse: bool = True) -> list[dict]:
    from sensray.replica import Replica
    from sensray.space import Trial

    replica = Replica(study_spec(model_dir, reuse=reuse))
    start, rows = time.perf_counter(), []
    for t in trials:
        row = replica.run_trial(Trial(t["trial_id"], t["kind"], t["params"], 0))
        rows.append(row | {"bits_ok": True})
    return rows, time.perf_counter() - start


def element(model, change: dict) -> tuple[str, tuple]:
    """(HF parameter name, index) of a `changes` entry's element."""
    from sensray.targets import select

    ref = select(model, change["tensor"]).tensors[0]
    if not ref.whole:
        raise ValueError(f"{change['tensor']} is a view of a fused tensor; not supported here")
    return ref.param, tuple(change["coords"])


def value_of(bits: int, dtype: torch.dtype) -> float:
    """The float a raw bit pattern means (float32 only: the default study's dtype)."""
    if dtype != torch.float32:
        raise ValueError(f"{dtype}: this benchmark injects float32 values")
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def bits_at(tensor: torch.Tensor, index: tuple) -> int:
    return int(tensor.detach().view(torch.int32)[index]) & 0xFFFFFFFF


class FloatIds(nn.Module):
    """PyTorchFI feeds float tensors (random noise when it profiles): round them to token ids."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor):
        ids = x.round().long().clamp_(0, self.lm.config.vocab_size - 1) if x.is_floating_point() else x
        return self.lm(input_ids=ids, use_cache=False)


def fi_pytorchfi(model_dir: str, trials: list[dict], positions: dict) -> list[dict]:
    from pytorchfi.core import fault_injection

    from sensray.metrics import evaluate

    model, batches, ref = loaded(model_dir)
    norm = type(model.model.norm)
    adapter = FloatIds(model)
    fi = fault_injection(adapter, batch_size=batches[0].shape[0], input_shape=[batches[0].shape[1]],
                         layer_types=[nn.Linear, norm], use_cuda=False)
    layers = [m for m in adapter.modules() if isinstance(m, (nn.Linear, norm))]  # PyTorchFI's layer_num order
    start, rows = time.perf_counter(), []
    for t in trials:
        change = positions[t["trial_id"]]
        param, index = element(model, change)
        layer = layers.index(model.get_submodule(param.rsplit(".", 1)[0]))
        rest = list(index[1:]) + [None] * (3 - len(index[1:]))
        corrupted = fi.declare_weight_fi(layer_num=[layer], k=[index[0]], dim1=[rest[0]], dim2=[rest[1]],
                                         dim3=[rest[2]], value=[value_of(change["new_bits"], torch.float32)])
        scores = evaluate(corrupted.lm, batches, ref)
        bits_ok = bits_at(corrupted.lm.get_parameter(param), index) == change["new_bits"]
        rows.append(scores_row(t["trial_id"], scores, bits_ok))
        del corrupted
        fi.fi_reset()
    return rows, time.perf_counter() - start


def fi_reload(model_dir: str, trials: list[dict], positions: dict) -> list[dict]:
    from sensray.data import eval_batches
    from sensray.metrics import evaluate, reference
    from sensray.models import load_model, load_tokenizer

    spec = study_spec(model_dir)
    batches = eval_batches(spec.data, load_tokenizer(spec.model))
    ref = reference(load_model(spec.model, torch.device("cpu")), batches)
    start, rows = time.perf_counter(), []
    for t in trials:
        model = load_model(spec.model, torch.device("cpu"))  # from disk, every trial
        change = positions[t["trial_id"]]
        param, index = element(model, change)
        weight = model.get_parameter(param)
        weight.data.view(torch.int32)[index] = struct.unpack("<i", struct.pack("<I", change["new_bits"]))[0]
        rows.append(scores_row(t["trial_id"], evaluate(model, batches, ref), bits_at(weight, index) == change["new_bits"]))
    return rows, time.perf_counter() - start


# ----------------------------------------------------------------------------- skip: sensray vs nnsight


def skip_trials(blocks: int, repeats: int) -> list[dict]:
    return [{"trial_id": f"skip-{b}-{r}", "kind": "ablation", "params": {"target": f"blocks.{b}", "mode": "skip"}}
            for r in range(repeats) for b in range(blocks)]


def skip_sensray(model_dir: str, trials: list[dict], reuse: bool) -> list[dict]:
    from sensray.replica import Replica
    from sensray.space import Trial

    replica = Replica(study_spec(model_dir, reuse=reuse))
    start = time.perf_counter()
    rows = [scores_row(t["trial_id"], _scores(replica.run_trial(Trial(t["trial_id"], t["kind"], t["params"], 0))))
            for t in trials]
    return rows, time.perf_counter() - start


def _scores(row: dict):
    return argparse.Namespace(**{m: row[m] for m in METRICS})


class NnsightSkip:
    """A model for sensray.metrics.evaluate whose forward is an nnsight trace skipping one block."""

    def __init__(self, lm, block: int):
        self.lm, self.block = lm, block

    def __call__(self, input_ids, use_cache=False):
        with self.lm.trace(input_ids, use_cache=use_cache):
            layer = self.lm.model.layers[self.block]
            layer.output = layer.inputs[0][0]  # the block's input hidden states, as if it were not there
            logits = self.lm.output.logits.save()
        return argparse.Namespace(logits=logits)


def skip_nnsight(model_dir: str, trials: list[dict]) -> list[dict]:
    from nnsight import TransformersModel

    from sensray.metrics import evaluate
    from sensray.models import load_tokenizer

    model, batches, ref = loaded(model_dir)
    lm = TransformersModel(model, tokenizer=load_tokenizer(study_spec(model_dir).model))
    start, rows = time.perf_counter(), []
    for t in trials:
        block = int(t["params"]["target"].split(".")[1])
        rows.append(scores_row(t["trial_id"], evaluate(NnsightSkip(lm, block), batches, ref)))
    return rows, time.perf_counter() - start


WORKERS = {
    "sensray": lambda d, trials, pos: fi_sensray(d, trials),
    "sensray-noreuse": lambda d, trials, pos: fi_sensray(d, trials, reuse=False),
    "pytorchfi": fi_pytorchfi,
    "reload": fi_reload,
    "skip:sensray": lambda d, trials, pos: skip_sensray(d, trials, reuse=True),
    "skip:sensray-noreuse": lambda d, trials, pos: skip_sensray(d, trials, reuse=False),
    "skip:nnsight": lambda d, trials, pos: skip_nnsight(d, trials),
}


def worker(way: str, model_dir: str, job: str) -> None:
    """One way in this process: set up, run every trial, write its rows, the seconds of the trial loop
    (setup not counted, except the reload way's per-trial load, which is the point) and the peak RSS."""
    torch.set_num_threads(int(os.environ.get("PEERS_THREADS", "1")))
    spec = json.loads(Path(job).read_text())
    rows, seconds = WORKERS[way](model_dir, spec["trials"], spec.get("positions", {}))
    Path(spec["out"]).write_text(json.dumps({"rows": rows, "seconds": seconds, "peak_mb": peak_rss_mb()},
                                            allow_nan=True))


def launch(way: str, model_dir: str, job: dict, tmp: Path) -> dict:
    out = tmp / f"{way.replace(':', '-')}-{time.perf_counter_ns()}.json"
    path = out.with_suffix(".job.json")
    path.write_text(json.dumps(job | {"out": str(out)}, allow_nan=True))
    subprocess.run([sys.executable, __file__, "--worker", way, model_dir, str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- comparing and reporting


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def compare(reference: list[dict], other: list[dict]) -> tuple[int, int, list[str]]:
    """(rows whose metrics equal the reference's bit for bit, rows whose injected bits are right, differing ids)."""
    ref = {r["trial_id"]: r for r in reference}
    differ = [r["trial_id"] for r in other if not all(same(r[m], ref[r["trial_id"]][m]) for m in METRICS)]
    bits = sum(1 for r in other if r.get("bits_ok", True))
    return len(other) - len(differ), bits, differ


def rounds(ways: tuple[str, ...], model_dir: str, job: dict, n: int, tmp: Path, prefix: str = "") -> dict:
    """Each way once per round, the order rotating; the results of every round kept."""
    results = {w: [] for w in ways}
    for r in range(n):
        order = ways[r % len(ways):] + ways[: r % len(ways)]
        for way in order:
            results[way].append(launch(prefix + way, model_dir, job, tmp))
            print(f"  round {r + 1}: {way} {results[way][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return results


def fi_table(name: str, model_dir: str, args, tmp: Path) -> list[str]:
    trials = study_trials(model_dir, args.trials if name == "tiny" else args.big_trials)
    first = launch("sensray", model_dir, {"trials": trials}, tmp)  # the positions: its rows' `changes`
    positions = {r["trial_id"]: r["changes"][0] for r in first["rows"]}
    results = rounds(FI_WAYS, model_dir, {"trials": trials, "positions": positions}, args.rounds, tmp)
    lines = []
    for way in FI_WAYS:  # rows first: every round of every way against the positions' sensray run
        checks = [compare(first["rows"], res["rows"]) for res in results[way]]
        same_rows = min(c[0] for c in checks)
        bits = min(c[1] for c in checks)
        rate = statistics.median(len(trials) / res["seconds"] for res in results[way])
        peak = statistics.median(res["peak_mb"] for res in results[way])
        lines.append((way, same_rows, bits, rate, peak, sorted({d for c in checks for d in c[2]})))
    base = {w: (rate, peak) for w, _, _, rate, peak, _ in lines}["sensray"]
    out = []
    for way, same_rows, bits, rate, peak, differ in lines:
        note = f" (differ: {', '.join(differ[:4])})" if differ else ""
        out.append(f"| {name} | {way} | {len(trials)} | {same_rows}/{len(trials)}{note} | {bits}/{len(trials)} | "
                   f"{rate:.2f} | {rate / base[0]:.2f}x | {peak:.0f} | {peak / base[1]:.2f}x |")
    return out


def skip_table(name: str, model_dir: str, args, tmp: Path) -> list[str]:
    from transformers import AutoConfig

    blocks = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    trials = skip_trials(blocks, args.skip_repeats)
    results = rounds(SKIP_WAYS, model_dir, {"trials": trials}, args.rounds, tmp, prefix="skip:")
    reference = results["sensray-noreuse"][0]["rows"]
    out = []
    base = statistics.median(len(trials) / r["seconds"] for r in results["sensray"])
    for way in SKIP_WAYS:
        same_rows = min(compare(reference, r["rows"])[0] for r in results[way])
        rate = statistics.median(len(trials) / r["seconds"] for r in results[way])
        peak = statistics.median(r["peak_mb"] for r in results[way])
        out.append(f"| {name} | {way} | {len(trials)} | {same_rows}/{len(trials)} | {rate:.2f} | {rate / base:.2f}x | {peak:.0f} |")
    return out


def projection(model_dir: str, reps: int = 3) -> list[str]:
    """Per-GB deepcopy and reload rates measured here, scaled to 13.5 GB (projections)."""
    from sensray.models import load_model
    from sensray.perturbations import PERTURBATIONS

    spec = study_spec(model_dir)
    model = load_model(spec.model, torch.device("cpu"))
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / GB
    copy_s = statistics.median(_timed(lambda: copy.deepcopy(model)) for _ in range(reps))
    load_s = statistics.median(_timed(lambda: load_model(spec.model, torch.device("cpu"))) for _ in range(reps))
    kind = PERTURBATIONS.get("bitflip")
    params = kind.parse({"target": "blocks.3", "field": "exponent_msb", "count": 1, "seed": 0})

    def flip():
        edits = kind.apply(model, params)
        edits.restore()
        assert edits.verify()

    flip_s = statistics.median(_timed(flip) for _ in range(20))
    return [
        f"| measured here: {size:.3f} GB model (fp32) | {copy_s:.3f} s ({copy_s / size:.2f} s/GB) | "
        f"{load_s:.3f} s ({load_s / size:.2f} s/GB) | {flip_s * 1e3:.2f} ms | {2 * size:.2f} GB |",
        f"| **projection** to 13.5 GB (Llama-2-7B, bf16), this machine's per-GB rates | "
        f"{copy_s / size * SEVEN_B_GB:.1f} s per trial | {load_s / size * SEVEN_B_GB:.1f} s per trial | "
        f"size-independent (one element's bits saved) | {2 * SEVEN_B_GB:.1f} GB of weights |",
    ]


def _timed(fn) -> float:
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    del result
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=("fi", "skip", "projection"))
    parser.add_argument("--models", default="tiny,llama-40m")
    parser.add_argument("--trials", type=int, default=32, help="fi trials on the tiny model")
    parser.add_argument("--big-trials", type=int, default=8, help="fi trials on llama-40m")
    parser.add_argument("--skip-repeats", type=int, default=2, help="skip trials per block")
    parser.add_argument("--skip-models", default="tiny", help="models of the skip table")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    from sensray.models import BUNDLED_MODEL

    sections = args.only or ["fi", "skip", "projection"]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; torch {torch.__version__}; "
          f"threads per worker {os.environ.get('PEERS_THREADS', '1')}; nice {os.nice(0)}; "
          f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"tiny": str(BUNDLED_MODEL)}
        if "llama-40m" in args.models or "projection" in sections:
            dirs["llama-40m"] = build_40m(Path(tmp))
        models = args.models.split(",")
        if "fi" in sections:
            print("\n| model | way | trials | metrics identical to sensray | element bits as sensray's | trials/s "
                  "| vs sensray | peak RSS (MB) | vs sensray |\n|---|---|---|---|---|---|---|---|---|", flush=True)
            for name in models:
                print("\n".join(fi_table(name, dirs[name], args, Path(tmp))), flush=True)
        if "skip" in sections:
            print("\n| model | way | trials | metrics identical to sensray (reuse off) | trials/s | vs sensray | "
                  "peak RSS (MB) |\n|---|---|---|---|---|---|---|", flush=True)
            for name in args.skip_models.split(","):
                print("\n".join(skip_table(name, dirs[name], args, Path(tmp))), flush=True)
        if "projection" in sections:
            print("\n| | deepcopy (PyTorchFI, per trial) | reload from disk (per trial) | sensray apply+restore+verify "
                  "of one flip | weights in memory with PyTorchFI |\n|---|---|---|---|---|", flush=True)
            print("\n".join(projection(dirs["llama-40m"])), flush=True)
        load = os.getloadavg()[0]
        print(f"\nload average {load:.1f} at the end", flush=True)


if __name__ == "__main__":
    main()
