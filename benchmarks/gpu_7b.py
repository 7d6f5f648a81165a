"""7B-shaped models on one GPU: trial rate with and without prefix reuse, FLOP rate, memory.

    python3 benchmarks/gpu_7b.py                      # Llama-2-7B and Mistral-7B shapes, the table for docs/BENCHMARKS.md
    python3 benchmarks/gpu_7b.py --tiny               # the same study on two small shapes, on the CPU (a smoke run)
    python3 benchmarks/gpu_7b.py --shapes llama-2-7b --batch 16 --seq 512 --seeds 2

On the GPU machine (one H200; python3 there has torch, transformers, accelerate, numpy and
PyYAML, but not pydantic, which sensray's specs and perturbation parameters need, nor polars or
ray). Once, here, in the repository root (`/.whl/` is in .gitignore):

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \\
        typing-inspection==0.4.5 typing-extensions==4.16.0

then one device call, carry [".whl"], timeout_s 600 (about 2.8 MB of wheels travel):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_7b.py 2>&1 | tee $OUT/gpu_7b.log

The import chain it uses (sensray.replica and what it imports) loads neither polars nor ray;
the table's header line says which of ray, polars, pydantic were loaded.

What runs, per shape (each built with random bf16 weights directly on the GPU:
`with torch.device("cuda"): AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)`,
no download and no CPU copy; SDPA attention unless --attn says otherwise):

  1. the bf16 matrix rate of the device: C = A @ B with A, B of --matmul-n^2 random entries
     (8192: 1.1 TFLOP each), 3 warm-ups, then the mean of 20 products timed with CUDA events;
  2. a Replica around the model (`Replica(spec, model=..., tokenizer=...)`), eval tokens
     --batch x --seq (default 16 x 512 = 8,192) from the bundled held-out corpus through the
     shipped 2048-word tokenizer (ids < 2048 are valid in a 32000-word vocabulary), or with
     --tokens random, uniform random ids over the whole vocabulary;
  3. the plan of a uniform sweep of block-level bit flips: target {each: "blocks.*"}, field
     exponent_msb, count 1, --seeds seeds per block (default 2: 64 trials for 32 blocks), in a
     seeded shuffled order (so a pass cut short is still a uniform sample of the blocks);
  4. the model forward alone (logits of every eval batch) timed with CUDA events, median of 5
     after a warm-up: its achieved TFLOP/s against the matrix rate of step 1;
  5. the trial rate: every trial through `replica.run_trial` (what the local executor runs),
     once with prefix reuse off (`replica.prefix = None`) and once on (the recorded cache put
     back), interleaved trial by trial, the order alternating, after --warmup trials each way
     that are not counted; run_trial synchronizes the GPU before it returns, so wall time per
     call is the trial's. The two ways' metrics (nll, ppl, KL, top-1, nonfinite) are compared;
  6. where a trial's time goes: the trials of seed 0 (one per block) once more each way, the
     steps of run_trial done one by one with a synchronize after each: parse + apply, the
     evaluation (start_for + evaluate), restore, verify;
  7. peak GPU memory (torch.cuda.max_memory_allocated) over the whole shape and over the
     trials alone, next to the prefix cache (`cache.bytes`), the reference (logits, probs and
     log-sum-exps of the unperturbed model) and the weights;
  8. the weights' checksum after all of it, against the one the replica took at load;
  9. what PyTorchFI's declare_weight_fi does per trial instead of 1-3: copy.deepcopy of the
     whole model, timed, and the peak memory while the two copies exist.

Time: each shape's rate pass stops after --max-trial-seconds (60) and its breakdown after half
of that, and a shape is skipped when less of --budget (450 s) is left than the longest shape so far took
(150 s at least), so the run ends inside 8 minutes whatever the per-trial time turns out to be.

FLOPs of one eval forward (the PaLM paper's convention, multiply-add = 2 FLOPs):

    2 x T x P_mm  +  L x 4 x B x S^2 x d_attn

T = B x S eval tokens; P_mm = parameters in matmuls: the weights of every nn.Linear (per block
q, k, v, o, gate, up, down; plus the output projection), not the embedding (a gather) or the
norms; L blocks; d_attn = heads x head_dim; 4 x B x S^2 x d_attn per block counts Q K^T and
(scores) V over the full S x S square (a causal kernel skips about half of it, so this
over-counts by up to L x 2 x B x S^2 x d_attn). A trial that resumes at block s counts only
blocks s..L-1 and the output projection. The softmax, norms, rotary and the metrics' log-softmax
are not counted.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import math
import platform
import random
import shlex
import statistics
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python3 benchmarks/gpu_7b.py` from a plain checkout
    sys.path.insert(0, str(REPO))

# name -> (config class, keyword arguments). The 7B shapes are those of the released checkpoints'
# config.json; the tiny ones are small enough for a CPU smoke run in seconds.
SHAPES = {
    "llama-2-7b": ("LlamaConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    "mistral-7b": ("MistralConfig", dict(  # sliding_window: MistralConfig's default
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    "tiny-llama": ("LlamaConfig", dict(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)),
    "tiny-mistral": ("MistralConfig", dict(
        vocab_size=2048, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)),
}
METRICS = ("nll", "ppl", "kl", "top1_agreement", "nonfinite")
GIB = 2**30


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Timer:
    """Wall time with the device drained at both ends (a no-op drain on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def matmul_rate(device: torch.device, n: int, reps: int = 20, warmup: int = 3) -> float:
    """bf16 TFLOP/s of an n x n x n product on random data: mean of `reps` after `warmup`."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        seconds = time.perf_counter() - t0
    del a, b, c
    return 2 * n**3 * reps / seconds / 1e12


def build_model(shape: str, device: torch.device, attn: str):
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, kwargs = SHAPES[shape]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    model.eval()
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices != {device.type}:
        raise RuntimeError(f"{shape}: parameters on {devices}, expected all on {device.type}")
    return model


class RandomIds:
    """A stand-in tokenizer: uniform random ids over the vocabulary, whatever the text."""

    def __init__(self, vocab: int, count: int, seed: int = 0):
        self.ids = torch.randint(vocab, (1, count), generator=torch.Generator().manual_seed(seed))

    def __call__(self, text, return_tensors=None, verbose=None):
        return SimpleNamespace(input_ids=self.ids)


def make_spec(shape: str, device: torch.device, args):
    from sensray.spec import validate

    return validate({
        "name": f"gpu-7b-{shape}",
        "model": {"name": f"random-{shape}", "dtype": "bfloat16", "device": device.type},
        "data": {"corpus": "bundled", "seq_len": args.seq, "num_sequences": args.batch * args.batches,
                 "batch_size": args.batch},
        "perturbation": "bitflip",
        "space": {"target": {"each": "blocks.*"}, "field": "exponent_msb", "count": 1,
                  "seed": {"grid_search": list(range(args.seeds))}},
        "reuse": {"prefix": True, "max_gb": args.max_gb},
    })


def flop_model(model, batches: list[torch.Tensor]):
    """FLOPs of one eval forward that runs blocks start..L-1 (see the module docstring)."""
    from sensray.architectures import decoder_blocks

    blocks = decoder_blocks(model)
    config = model.config
    linear = lambda module: sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    per_block = [linear(b) for b in blocks]
    head = linear(model) - sum(per_block)  # the output projection (and any other Linear outside the blocks)
    tokens = sum(b.numel() for b in batches)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = sum(4 * b.shape[0] * b.shape[1] ** 2 * config.num_attention_heads * head_dim for b in batches)

    def flops(start: int = 0) -> float:
        return 2.0 * tokens * (sum(per_block[start:]) + head) + attn * (len(blocks) - start)

    return flops, sum(per_block) + head


def forward_seconds(model, batches, timer: Timer, reps: int) -> float:
    """Median time of the bare model forward over every eval batch, after one warm-up."""

    def once():
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch, use_cache=False).logits

    once()
    times = []
    for _ in range(reps):
        if timer.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def rel_diff(a, b) -> float:
    if not (isinstance(a, float) and isinstance(b, float)) or not (math.isfinite(a) and math.isfinite(b)):
        return 0.0 if same(a, b) else math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def rate_pass(replica, trials, cache, timer: Timer, args) -> dict:
    """run_trial on every trial, reuse off and on, interleaved; warm-ups first, not counted."""
    ways = {"full": None, "reuse": cache}
    for trial in trials[: args.warmup]:
        for prefix in ways.values():
            replica.prefix = prefix
            replica.run_trial(trial)
    seconds = {way: [] for way in ways}
    identical, worst, errors = 0, 0.0, 0
    began = time.perf_counter()
    done = 0
    for i, trial in enumerate(trials):
        rows = {}
        for way in (("full", "reuse") if i % 2 == 0 else ("reuse", "full")):
            replica.prefix = ways[way]
            t0 = timer.now()
            rows[way] = replica.run_trial(trial)
            seconds[way].append(timer.now() - t0)
            errors += rows[way]["error"] is not None
        identical += all(same(rows["full"][m], rows["reuse"][m]) for m in METRICS)
        worst = max([worst] + [rel_diff(rows["full"][m], rows["reuse"][m]) for m in ("nll", "kl", "top1_agreement")])
        done += 1
        if time.perf_counter() - began > args.max_trial_seconds:
            log(f"  stopped the rate pass after {done} of {len(trials)} trials (--max-trial-seconds)")
            break
    replica.prefix = cache
    return {"seconds": seconds, "trials": done, "identical": identical, "worst_rel_diff": worst, "errors": errors}


def breakdown_pass(replica, trials, cache, timer: Timer, flops, max_seconds: float) -> dict:
    """The steps of run_trial one by one, each drained before the clock is read."""
    from sensray.metrics import evaluate
    from sensray.perturbations import PERTURBATIONS

    steps = {way: {"apply": [], "eval": [], "restore": [], "verify": [], "flops": [], "start": []}
             for way in ("full", "reuse")}
    began = time.perf_counter()
    for i, trial in enumerate(trials):
        if time.perf_counter() - began > max_seconds:
            log(f"  stopped the breakdown after {i} of {len(trials)} trials (--max-trial-seconds / 2)")
            break
        for way in (("full", "reuse") if i % 2 == 0 else ("reuse", "full")):
            prefix = cache if way == "reuse" else None
            out = steps[way]
            t0 = timer.now()
            kind = PERTURBATIONS.get(trial.kind)
            undo = kind.apply(replica.model, kind.parse(trial.params))
            t1 = timer.now()
            try:
                start = prefix.start_for(undo) if prefix is not None else 0
                evaluate(replica.model, replica.batches, replica.reference, prefix, start)
                t2 = timer.now()
            finally:
                undo.restore()
                t3 = timer.now()
            if not undo.verify():
                raise RuntimeError(f"trial {trial.trial_id}: weights differ after restore")
            t4 = timer.now()
            for name, value in (("apply", t1 - t0), ("eval", t2 - t1), ("restore", t3 - t2), ("verify", t4 - t3),
                                ("flops", flops(start)), ("start", start)):
                out[name].append(value)
    return steps


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return math.nan


def run_shape(shape: str, device: torch.device, args, timer: Timer) -> dict:
    from sensray.models import load_tokenizer
    from sensray.plan import make_plan
    from sensray.replica import Replica
    from sensray.spec import ModelSpec

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / GIB if cuda else math.nan  # what an earlier shape left behind
    t0 = time.perf_counter()
    model = build_model(shape, device, args.attn)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"{shape}: built {params / 1e9:.2f}B parameters ({weight_bytes / GIB:.1f} GiB bf16) on {device} "
        f"in {build_s:.1f} s, attention {model.config._attn_implementation}")

    spec = make_spec(shape, device, args)
    tokens_needed = args.batch * args.batches * args.seq
    tokenizer = (RandomIds(model.config.vocab_size, tokens_needed) if args.tokens == "random"
                 else load_tokenizer(ModelSpec(name="sensray-tiny")))
    t0 = time.perf_counter()
    replica = Replica(spec, model=model, tokenizer=tokenizer)
    setup_s = time.perf_counter() - t0
    cache = replica.prefix
    reference_bytes = sum(t.numel() * t.element_size()
                          for part in (replica.reference.logits, replica.reference.probs, replica.reference.lse,
                                       replica.reference.top1)
                          for t in part)
    log(f"{shape}: replica ready in {setup_s:.1f} s (reference, prefix recording, baseline, checksum); "
        f"prefix cache {cache.bytes / GIB:.2f} GiB over {len(cache.starts)} resume points; "
        f"baseline ppl {replica.baseline.ppl:.4g}")

    # A seeded shuffle: any leading part of the sweep (a pass cut short by --max-trial-seconds,
    # the warm-ups) is then a uniform sample of the blocks, not the first few.
    trials = make_plan(spec, replica.model).trials
    random.Random(0).shuffle(trials)
    flops, matmul_params = flop_model(replica.model, replica.batches)
    forward_s = forward_seconds(replica.model, replica.batches, timer, args.forward_reps)
    log(f"{shape}: forward {forward_s * 1e3:.1f} ms = {g(flops() / forward_s / 1e12)} TFLOP/s; "
        f"{len(trials)} trials, rate pass next")

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rate = rate_pass(replica, trials, cache, timer, args)
    peak_trials = torch.cuda.max_memory_allocated() / GIB if cuda else math.nan
    log(f"{shape}: rate pass: {rate['trials']} trials each way, {rate['identical']} identical")

    seed0 = [t for t in trials if t.params.get("seed") == 0]
    steps = breakdown_pass(replica, seed0, cache, timer, flops, args.max_trial_seconds / 2)
    t0 = time.perf_counter()
    intact = replica.checksum() == replica.baseline.checksum_at_load
    checksum_s = time.perf_counter() - t0
    peak_total = torch.cuda.max_memory_allocated() / GIB if cuda else peak_rss_gib()
    deepcopy_s, peak_copy = copy_cost(replica.model, timer)
    log(f"{shape}: breakdown over {len(steps['full']['eval'])} trials done; weights checksum {checksum_s:.1f} s, "
        f"{'unchanged' if intact else 'CHANGED'}")
    result = {
        "shape": shape, "params": params, "matmul_params": matmul_params, "weight_gib": weight_bytes / GIB,
        "tokens": sum(b.numel() for b in replica.batches), "vocab": model.config.vocab_size,
        "attn": model.config._attn_implementation, "build_s": build_s, "setup_s": setup_s,
        "forward_s": forward_s, "forward_flops": flops(), "rate": rate, "steps": steps,
        "cache_gib": cache.bytes / GIB, "cache_points": len(cache.starts), "blocks": len(cache.blocks),
        "reference_gib": reference_bytes / GIB, "peak_gib": peak_total, "peak_trials_gib": peak_trials,
        "checksum_s": checksum_s, "intact": intact, "resident_gib": resident,
        "deepcopy_s": deepcopy_s, "peak_copy_gib": peak_copy,
    }
    gone = weakref.ref(model)
    replica.prefix = cache = None
    del replica, model
    gc.collect()
    if gone() is not None:
        log(f"{shape}: the model is still referenced after the shape's run; later peaks include it")
    if cuda:
        torch.cuda.empty_cache()
    return result


def copy_cost(model, timer: Timer) -> tuple[float, float]:
    """What PyTorchFI's declare_weight_fi does per trial: copy.deepcopy of the whole model. Seconds,
    and the peak memory while both copies exist (GPU: allocated GiB; CPU: the process's peak RSS)."""
    if timer.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = timer.now()
    twin = copy.deepcopy(model)
    seconds = timer.now() - t0
    peak = torch.cuda.max_memory_allocated() / GIB if timer.cuda else peak_rss_gib()
    del twin
    gc.collect()
    if timer.cuda:
        torch.cuda.empty_cache()
    return seconds, peak


def cache_gib(shape: str, tokens: int, dtype_bytes: int = 2) -> float:
    """Recorded block outputs for every block: tokens x hidden x blocks x bytes (arithmetic, not measured)."""
    kwargs = SHAPES[shape][1]
    return tokens * kwargs["hidden_size"] * kwargs["num_hidden_layers"] * dtype_bytes / GIB


def g(x: float) -> str:
    """Three significant digits, whatever the scale (7B and tiny models share the tables)."""
    return f"{x:.3g}"


def report(results: list[dict], args, device: torch.device, matmul: float) -> str:
    import transformers

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}) -- a smoke run, not a GPU number"
    loaded = [m for m in ("ray", "polars", "pydantic") if sys.modules.get(m) is not None]  # None: a blocked import
    lines = [
        f"{when}; {where}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"command: `{shlex.join(['python3', 'benchmarks/gpu_7b.py', *sys.argv[1:]])}`",
        f"eval: {args.batch * args.batches} x {args.seq} tokens ({args.tokens} ids), bf16 weights, "
        f"{args.seeds} bit flip(s) per block (exponent MSB, one element), {args.warmup} warm-up trial(s) each way",
        f"bf16 matmul {args.matmul_n}^3: {g(matmul)} TFLOP/s (mean of 20 after 3 warm-ups); "
        f"model forward: median of {args.forward_reps} after a warm-up",
        f"modules loaded: {', '.join(loaded) or 'none'} of ray, polars, pydantic",
        "",
        "| model | way | trials | trials/s | median s/trial | vs full | metrics identical to full | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = r["rate"]
        totals = {w: sum(s) for w, s in rate["seconds"].items()}
        for way in ("full", "reuse"):
            seconds = rate["seconds"][way]
            agree = f"{rate['identical']}/{rate['trials']} (max rel. diff {rate['worst_rel_diff']:.1e})" if way == "reuse" else ""
            lines.append(f"| {r['shape']} | {way} | {rate['trials']} | {len(seconds) / totals[way]:.2f} | "
                         f"{statistics.median(seconds):.3f} | {totals['full'] / totals[way]:.2f}x | {agree} | "
                         f"{rate['errors']} |")
    lines += [
        "",
        "| model | params (B) | GFLOP/forward | forward s | forward TFLOP/s | % of matmul | eval s (full) | eval TFLOP/s (full) "
        "| eval s (reuse) | eval TFLOP/s (reuse, blocks run) | mean resume block |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        full, reuse = r["steps"]["full"], r["steps"]["reuse"]
        fwd_tf = r["forward_flops"] / r["forward_s"] / 1e12
        lines.append(
            f"| {r['shape']} | {g(r['params'] / 1e9)} | {g(r['forward_flops'] / 1e9)} | {r['forward_s']:.3f} | "
            f"{g(fwd_tf)} | {100 * fwd_tf / matmul:.0f}% | {statistics.mean(full['eval']):.3f} | "
            f"{g(sum(full['flops']) / sum(full['eval']) / 1e12)} | {statistics.mean(reuse['eval']):.3f} | "
            f"{g(sum(reuse['flops']) / sum(reuse['eval']) / 1e12)} | {statistics.mean(reuse['start']):.1f} of {r['blocks']} |")
    lines += [
        "",
        "| model | way | apply ms | restore ms | verify ms | eval ms | apply+restore+verify share of trial |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for way in ("full", "reuse"):
            s = r["steps"][way]
            ms = {k: 1e3 * statistics.mean(s[k]) for k in ("apply", "restore", "verify", "eval")}
            share = (ms["apply"] + ms["restore"] + ms["verify"]) / sum(ms.values())
            lines.append(f"| {r['shape']} | {way} | {ms['apply']:.2f} | {ms['restore']:.2f} | {ms['verify']:.2f} | "
                         f"{ms['eval']:.1f} | {100 * share:.2f}% |")
    peak = "peak GPU GiB (whole run / trials)" if device.type == "cuda" else "peak RSS GiB (process, CPU)"
    lines += [
        "",
        f"| model | weights GiB | reference GiB | prefix cache GiB (resume points) | {peak} | build s | replica setup s | "
        "checksum s | deepcopy s (PyTorchFI's per-trial copy) | peak GiB with the copy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak_cell = (f"{g(r['peak_gib'])} / {g(r['peak_trials_gib'])}" if device.type == "cuda"
                     else g(r["peak_gib"]))
        lines.append(f"| {r['shape']} | {g(r['weight_gib'])} | {g(r['reference_gib'])} | "
                     f"{g(r['cache_gib'])} ({r['cache_points']}) | {peak_cell} | {r['build_s']:.1f} | "
                     f"{r['setup_s']:.1f} | {r['checksum_s']:.1f}{'' if r['intact'] else ' CHANGED'} | "
                     f"{r['deepcopy_s']:.3f} | {g(r['peak_copy_gib'])} |")
    if device.type == "cuda":
        lines += ["", "GPU memory still allocated as each shape began (left by the one before): "
                  + ", ".join(f"{r['shape']} {r['resident_gib']:.2f} GiB" for r in results)]
    default_tokens = 16 * 512
    lines += [
        "",
        f"Prefix cache of Llama-2-7B at 16 x 512 eval tokens, every block recorded (arithmetic): "
        f"{default_tokens:,} tokens x 4096 hidden x 32 blocks x 2 bytes = "
        f"{default_tokens * 4096 * 32 * 2:,} bytes = {cache_gib('llama-2-7b', default_tokens):.2f} GiB",
        "",
    ]
    return "\n".join(lines)


# Flags whose default depends on --tiny: (the 7B study's, the tiny CPU smoke run's).
DEFAULTS = {
    "shapes": ("llama-2-7b,mistral-7b", "tiny-llama,tiny-mistral"), "batch": (16, 4), "seq": (512, 64),
    "seeds": (2, 1), "warmup": (2, 1), "matmul_n": (8192, 512), "forward_reps": (5, 2),
    "threads": (None, 1),  # --tiny: a shared CPU, where threads that wait on each other stall every op
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default: the two 7B shapes)")
    parser.add_argument("--tiny", action="store_true",
                        help="the default flags become tiny-llama,tiny-mistral at 4 x 64 tokens, 1 seed, 1 warm-up, "
                             "2 forward repeats, a 512^3 matmul, 1 CPU thread: a CPU smoke run")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--batch", type=int, help="sequences per eval batch (default 16)")
    parser.add_argument("--batches", type=int, default=1, help="eval batches")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 512)")
    parser.add_argument("--tokens", default="corpus", choices=("corpus", "random"),
                        help="bundled corpus through the shipped tokenizer (at most 10,540 tokens), or random ids")
    parser.add_argument("--seeds", type=int, help="bit-flip trials per block (default 2)")
    parser.add_argument("--warmup", type=int, help="trials run each way before timing (default 2)")
    parser.add_argument("--max-gb", type=float, default=None, help="prefix cache budget (default: a quarter of free memory)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation of the models")
    parser.add_argument("--matmul-n", type=int, help="size of the bf16 matmul that gives the ceiling (default 8192)")
    parser.add_argument("--forward-reps", type=int, help="timed repeats of the bare model forward (default 5)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--budget", type=float, default=450,
                        help="seconds for the whole run: a shape is skipped when less is left than the longest shape so "
                             "far took (150 s at least)")
    parser.add_argument("--max-trial-seconds", type=float, default=60,
                        help="stop a shape's rate pass after this long, its breakdown after half of it "
                             "(keeps the run inside a 10-minute call)")
    args = parser.parse_args(argv)
    for name, (full, tiny) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cpu" and args.device == "auto" and not all(s.startswith("tiny-") for s in shapes):
        parser.error("no GPU here: a 7B shape on the CPU takes hours; use --tiny (or --device cpu to insist)")

    began = time.perf_counter()
    if importlib.util.find_spec("pydantic") is None:
        sys.exit("pydantic is not installed (sensray's specs need it): carry its wheels as the docstring of "
                 "benchmarks/gpu_7b.py says, and install them with pip --target before this runs")
    import sensray.replica  # noqa: F401  (the import chain the study uses, before anything is timed)
    log(f"device {device}; polars imported: {sys.modules.get('polars') is not None}; "
        f"ray imported: {sys.modules.get('ray') is not None}")
    timer = Timer(device)
    matmul = matmul_rate(device, args.matmul_n)
    log(f"bf16 matmul {args.matmul_n}^3: {g(matmul)} TFLOP/s")
    results, longest = [], 150.0  # a shape is assumed to take as long as the longest one so far, 150 s at least
    for shape in shapes:
        left = args.budget - (time.perf_counter() - began)
        if results and left < longest:
            log(f"{shape}: skipped, {left:.0f} s of the --budget of {args.budget:.0f} s left, a shape took {longest:.0f} s")
            continue
        t0 = time.perf_counter()
        results.append(run_shape(shape, device, args, timer))
        longest = max(longest, time.perf_counter() - t0)
    log(f"done in {time.perf_counter() - began:.0f} s")
    print(report(results, args, device, matmul), flush=True)


if __name__ == "__main__":
    main()
