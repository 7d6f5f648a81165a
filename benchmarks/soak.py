"""A soak: 100,000 random trials on the shipped model; the weights stay exact, memory stays flat, every row lands once.

    nice -n 19 python benchmarks/soak.py                          # 100,000 trials (docs/BENCHMARKS.md: its results)
    python benchmarks/soak.py --trials 3000 --check-every 500     # a short one (tests/test_soak.py runs this)
    python benchmarks/soak.py --resume results/soak/<run id>      # finish a run that was stopped

Every trial is drawn at random (seeded: the same command draws the same trials) from:

- a storage format: one resident replica per entry of FORMATS (float32, float16, bfloat16). A format
  is one line there (its `model` spec keys); a trial a kind cannot apply to a format (bitflip on
  integer storage, say) is redrawn, so quantized storage joins the soak by adding its line;
- a case: each perturbation kind with random parameters (bitflip by field or bit position, noise,
  ablation zero/mean/skip, zero coords/top/random, prune magnitude/wanda/N:M) on random targets
  (blocks, components, single tensors, the embedding/head); `naninf`: a flip of the exponent's top bit
  of an element in [1, 2), which makes that weight inf or NaN; `repeat`: the exact parameters of one of
  that format's last 32 bitflip/naninf trials again (the same elements flipped again after a restore).

Each trial goes through `Replica.run_trial` (perturb, evaluate, restore, verify bit for bit) and its
row, with `format`, `case` and `repeat_of` added, through the run directory's fsynced journal
(`RunDir`/`Journal`, as a sweep writes it). Every --check-every trials each replica's weights checksum
is compared with the one taken at load and the process RSS is sampled (both in soak-checks.jsonl);
at the end the checksums are compared again, trials.parquet is written (`RunDir.finish`) and read back:
each trial id exactly once, none missing, none extra, and every repeat's metrics and changes equal to
its original's. The eval set is tiny (1 x 4 tokens) on purpose: a soak tests restoring, not metrics.
Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/soak.py` from a checkout
    sys.path.insert(0, str(REPO))

# Storage formats: name -> the spec's `model` keys. Quantized storage is one more line here.
FORMATS: dict[str, dict[str, Any]] = {
    "float32": {"dtype": "float32"},
    "float16": {"dtype": "float16"},
    "bfloat16": {"dtype": "bfloat16"},
}
# Cases and their weights in the draw.
CASES = {"bitflip": 30, "noise": 8, "ablation": 10, "zero": 10, "prune": 7, "naninf": 15, "repeat": 20}
REPEAT_POOL = 32  # a repeat re-runs one of the last this many bitflip/naninf trials of its format
FIELDS = ("sign", "exponent", "exponent_msb", "mantissa", "any")
COMPARED = ("nll", "ppl", "kl", "top1_agreement", "nonfinite", "changes", "tensor", "index", "old", "new")


@dataclass
class Targets:
    """What one format's model offers to draw targets from (canonical names)."""

    blocks: list[str]
    components: list[str]
    tensors: list[str]  # every canonical tensor
    matrices: list[str]  # the 2-D ones
    naninf: list[tuple[str, list[int]]]  # (tensor, coords) of elements in [1, 2): exponent-MSB flip -> inf/NaN
    msb: int  # the exponent's top bit position in this format (-1: not a float format)
    width: int  # bits per element


def targets_of(model) -> Targets:
    from sensray.perturbations.bitflip import LAYOUTS
    from sensray.targets import each, select

    components = each(model, "**")
    tensors = sorted({ref.name for name in components for ref in select(model, name).tensors})
    live = {name: select(model, name).tensors[0].resolve(model) for name in tensors}
    dtype = next(iter(live.values())).dtype
    layout = LAYOUTS.get(dtype)
    naninf = []
    if layout is not None:
        for name, tensor in live.items():
            inside = ((tensor.abs() >= 1) & (tensor.abs() < 2)).nonzero().tolist()
            naninf += [(name, coords) for coords in inside[:8]]
    return Targets(
        blocks=each(model, "blocks.*"), components=components, tensors=tensors,
        matrices=[n for n, t in live.items() if t.dim() == 2], naninf=naninf,
        msb=layout["exponent_msb"][0] if layout else -1, width=torch.finfo(dtype).bits if layout else 8,
    )


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def draw_bitflip(rng, t: Targets) -> dict:
    params = {"target": pick(rng, t.components + t.tensors)}
    if rng.random() < 0.6:
        params["field"] = pick(rng, FIELDS)
    else:
        params["bit"] = int(rng.integers(t.width))
    return params | {"count": int(rng.integers(1, 5)), "seed": int(rng.integers(2**31))}


def draw_naninf(rng, t: Targets) -> dict:
    name, coords = pick(rng, t.naninf)
    return {"target": name, "bit": t.msb, "coords": [coords]}


def draw_noise(rng, t: Targets) -> dict:
    return {"target": pick(rng, t.components), "dist": pick(rng, ("gaussian", "uniform")),
            "sigma": float(10 ** rng.uniform(-3, 0.5)), "relative": bool(rng.random() < 0.8),
            "seed": int(rng.integers(2**31))}


def draw_ablation(rng, t: Targets) -> dict:
    if rng.random() < 0.4:
        return {"target": pick(rng, t.blocks), "mode": "skip"}
    return {"target": pick(rng, t.components + t.tensors), "mode": pick(rng, ("zero", "mean"))}


def draw_zero(rng, t: Targets) -> dict:
    params = {"target": pick(rng, t.matrices), "pick": pick(rng, ("coords", "top", "random"))}
    if params["pick"] == "coords":
        rows, cols = (int(rng.integers(64)) for _ in range(2))
        return params | {"coords": [[rows, cols], [rows + 1, cols]]}
    return params | {"count": int(rng.integers(1, 17)), "seed": int(rng.integers(2**31))}


def draw_prune(rng, t: Targets) -> dict:
    params = {"target": pick(rng, t.blocks + t.matrices), "method": pick(rng, ("magnitude", "wanda"))}
    if params["method"] == "wanda":  # a small calibration set: measured once per replica, then cached
        params |= {"calib_sequences": 4, "calib_seq_len": 32}
    if rng.random() < 0.3:
        return params | {"pattern": pick(rng, ("2:4", "4:8"))}
    return params | {"sparsity": round(float(rng.uniform(0.05, 0.9)), 3), "scope": pick(rng, ("tensor", "row"))}


DRAWS = {"bitflip": draw_bitflip, "naninf": draw_naninf, "noise": draw_noise, "ablation": draw_ablation,
         "zero": draw_zero, "prune": draw_prune}
KIND_OF = {"naninf": "bitflip"}


@dataclass(frozen=True)
class Planned:
    index: int
    format: str
    case: str
    trial: Any  # sensray.space.Trial
    repeat_of: str | None = None

    def extra(self) -> dict:
        return {"format": self.format, "case": self.case, "repeat_of": self.repeat_of}


def usable(kind, model, params: dict) -> bool:
    """Whether `params` parse and fit this model (a kind that does not apply to a format does not)."""
    from sensray.perturbations import ParamError

    try:
        kind.check(model, kind.parse(params))
        return True
    except ParamError:
        return False


def plan(seed: int, count: int, formats: list[str], models: dict, targets: dict[str, Targets]) -> Iterator[Planned]:
    """The soak's trials, drawn one by one from (seed, index): the same arguments give the same trials."""
    from sensray.perturbations import PERTURBATIONS
    from sensray.space import Trial

    cases, weights = list(CASES), np.array(list(CASES.values()), dtype=float)
    pools = {fmt: deque(maxlen=REPEAT_POOL) for fmt in formats}
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        fmt = pick(rng, formats)
        trial_id = f"soak-{index:06d}"
        while True:
            case = cases[int(rng.choice(len(cases), p=weights / weights.sum()))]
            if case == "repeat" and pools[fmt]:
                earlier = pick(rng, list(pools[fmt]))
                yield Planned(index, fmt, case, Trial(trial_id, "bitflip", earlier.trial.params, 0), earlier.trial.trial_id)
                break
            if case == "repeat" or (case == "naninf" and not targets[fmt].naninf):
                continue
            kind = KIND_OF.get(case, case)
            params = DRAWS[case](rng, targets[fmt])
            if usable(PERTURBATIONS.get(kind), models[fmt], params):
                planned = Planned(index, fmt, case, Trial(trial_id, kind, params, 0))
                if kind == "bitflip":
                    pools[fmt].append(planned)
                yield planned
                break


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def format_spec(fmt: str, args):
    from sensray.spec import validate

    return validate({
        "name": "soak", "model": {"name": args.model, "device": "cpu", **FORMATS[fmt]},
        "data": {"corpus": "bundled", "seq_len": args.seq_len, "num_sequences": args.sequences,
                 "batch_size": args.sequences},
        "perturbation": "bitflip", "space": {"target": "blocks.0"}, "output_dir": args.output_dir,
    })


@dataclass
class Clock:
    """Where the soak's time goes."""

    seconds: Counter = field(default_factory=Counter)

    def add(self, what: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[what] += now - since
        return now


def check(replicas: dict, done: int, began: float, log_path: Path) -> dict:
    """Each replica's checksum against the one at load, and the RSS, appended to soak-checks.jsonl."""
    point = {"trials": done, "seconds": round(time.perf_counter() - began, 2), "rss_mb": round(rss_mb(), 1),
             "intact": {fmt: r.checksum() == r.baseline.checksum_at_load for fmt, r in replicas.items()}}
    with open(log_path, "a", encoding="utf-8") as file:
        file.write(json.dumps(point) + "\n")
    return point


def run_soak(args, replicas: dict, run, todo: list[Planned], total: int) -> dict:
    """Run `todo`; stop at the first check whose checksum differs. Returns the check points and timings."""
    from sensray.progress import Progress
    from sensray.results import Journal

    clock, checks = Clock(), []
    progress = Progress(total=total, done=total - len(todo), every=args.progress_every)
    began, cpu = time.perf_counter(), time.process_time()
    with Journal(run.journal) as journal:
        for planned in todo:
            t = time.perf_counter()
            row = replicas[planned.format].run_trial(planned.trial)
            t = clock.add("run_trial", t)
            journal.append(row | planned.extra())
            t = clock.add("journal", t)
            progress.update(failed=row["error"] is not None)
            if (planned.index + 1) % args.check_every == 0:
                checks.append(check(replicas, planned.index + 1, began, run.path / "soak-checks.jsonl"))
                clock.add("checks", t)
                if not all(checks[-1]["intact"].values()):
                    break
    return {"checks": checks, "seconds": clock.seconds, "loop": time.perf_counter() - began, "trials": len(todo),
            "loop_cpu": time.process_time() - cpu}


def same(a, b) -> bool:
    """Equal, with NaN equal to NaN, inside lists and dicts too (a repeat's `changes` may hold NaNs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def verify_table(run, expected: list[str]) -> dict:
    """Read trials.parquet back: each expected trial id exactly once; repeats equal their originals."""
    import polars as pl

    table = pl.read_parquet(run.table)
    ids = table["trial_id"].to_list()
    counts = Counter(ids)
    rows = {r["trial_id"]: r for r in table.to_dicts()}
    repeats = [r for r in rows.values() if r["repeat_of"] is not None]
    differing = [r["trial_id"] for r in repeats if not all(same(r[k], rows[r["repeat_of"]][k]) for k in COMPARED)]
    return {
        "rows": len(ids), "unique": len(counts), "duplicated": sum(1 for n in counts.values() if n > 1),
        "missing": len(set(expected) - set(counts)), "extra": len(set(counts) - set(expected)),
        "errors": table["error"].is_not_null().sum(), "nonfinite": int(table["nonfinite"].sum()),
        "naninf_weights": sum(1 for r in rows.values() if r["case"] == "naninf"
                              and any(not math.isfinite(c["new"]) for c in r["changes"] or [])),
        "repeats": len(repeats), "repeats_differing": differing,
        "by_case": dict(Counter(table["case"].to_list())), "by_format": dict(Counter(table["format"].to_list())),
        "by_kind": dict(Counter(table["kind"].to_list())),
    }


def rss_growth(checks: list[dict], warmup: int) -> dict:
    """RSS after the warm-up checks vs at the end, the maximum, and a least-squares slope."""
    points = [(c["trials"], c["rss_mb"]) for c in checks][warmup:] or [(c["trials"], c["rss_mb"]) for c in checks]
    if not points:
        return {}
    xs, ys = zip(*points)
    slope = statistics.linear_regression(xs, ys).slope * 10_000 if len(set(xs)) > 1 else 0.0
    return {"first": ys[0], "last": ys[-1], "max": max(ys), "growth": ys[-1] - ys[0], "per_10k": slope}


def report(args, result: dict, table: dict, final: dict, seconds: dict) -> str:
    checks = result["checks"]
    rss = rss_growth(checks, args.rss_warmup)
    passed = sum(all(c["intact"].values()) for c in checks)
    split = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]))
    lines = [
        f"soak: {args.trials:,} trials, formats {', '.join(args.formats)}, eval {args.sequences} x {args.seq_len} tokens, "
        f"seed {args.seed}, torch threads {torch.get_num_threads()}, nice {_niceness()}",
        "",
        "| check | result |", "|---|---|",
        f"| weights checksum vs load, every {args.check_every:,} trials | {passed}/{len(checks)} intact |",
        f"| weights checksum at the end | {', '.join(f'{k} {_ok(v)}' for k, v in final.items())} |",
        f"| trial table rows / unique ids / expected | {table['rows']:,} / {table['unique']:,} / {args.trials:,} "
        f"(duplicated {table['duplicated']}, missing {table['missing']}, extra {table['extra']}) |",
        f"| rows with an error | {table['errors']} |",
        f"| rows with non-finite logits | {table['nonfinite']:,} |",
        f"| naninf trials that wrote an inf/NaN weight | {table['naninf_weights']:,} of {table['by_case'].get('naninf', 0):,} |",
        f"| repeats equal to their original (metrics, changes) | {table['repeats'] - len(table['repeats_differing']):,}"
        f"/{table['repeats']:,} |",
        f"| RSS after warm-up / at the end / max (MB) | {rss.get('first', math.nan):.0f} / {rss.get('last', math.nan):.0f}"
        f" / {rss.get('max', math.nan):.0f} |",
        f"| RSS growth: end - after warm-up, slope per 10k trials (MB) | {rss.get('growth', math.nan):+.1f}, "
        f"{rss.get('per_10k', math.nan):+.2f} |",
        f"| wall (CPU time of this process): all, trial loop | {seconds.get('total', 0):.0f} s "
        f"({time.process_time():.0f} s), {result['loop']:.0f} s ({result['loop_cpu']:.0f} s) |",
        f"| trials/s in the loop: wall, per CPU second | {result['trials'] / max(result['loop'], 1e-9):.1f}, "
        f"{result['trials'] / max(result['loop_cpu'], 1e-9):.1f} |",
        f"| where the time went | {split} |",
        "", f"cases: {table['by_case']}", f"kinds: {table['by_kind']}", f"formats: {table['by_format']}",
    ]
    return "\n".join(lines)


def _ok(flag: bool) -> str:
    return "intact" if flag else "CHANGED"


def _niceness() -> int:
    import os

    return os.nice(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100_000)
    parser.add_argument("--check-every", type=int, default=1000, help="trials between checksum/RSS checks")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--model", default="sensray-tiny")
    parser.add_argument("--seq-len", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: see tests/conftest.py)")
    parser.add_argument("--rss-warmup", type=int, default=2, help="check points before RSS is compared")
    parser.add_argument("--output-dir", default="results")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this soak's run directory")
    parser.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    from sensray.replica import Replica
    from sensray.results import RunDir

    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    if args.resume:  # the run's own settings, so the same trials are drawn again
        saved = json.loads((Path(args.resume) / "soak.json").read_text())
        args = argparse.Namespace(**(saved | {"resume": args.resume, "progress_every": args.progress_every}))
    else:
        args.formats = args.formats.split(",")
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        print(f"error: --formats: unknown {unknown}; known: {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    replicas = {fmt: Replica(format_spec(fmt, args), replica_id=fmt) for fmt in args.formats}
    targets = {fmt: targets_of(r.model) for fmt, r in replicas.items()}
    planned = list(plan(args.seed, args.trials, args.formats, {f: r.model for f, r in replicas.items()}, targets))
    run = RunDir.open(args.resume) if args.resume else RunDir.create(format_spec(args.formats[0], args))
    if not args.resume:
        (run.path / "soak.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    done = {row["trial_id"] for row in run.rows()}
    todo = [p for p in planned if p.trial.trial_id not in done]
    print(f"{run.path}: {len(planned):,} trials, {len(todo):,} to run; setup {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    result = run_soak(args, replicas, run, todo, len(planned))
    t = time.perf_counter()
    final = {fmt: r.checksum() == r.baseline.checksum_at_load for fmt, r in replicas.items()}
    result["seconds"]["checks"] += time.perf_counter() - t
    if not all(final.values()) or (result["checks"] and not all(result["checks"][-1]["intact"].values())):
        print(f"error: weights changed: {result['checks'][-1] if result['checks'] else final}", file=sys.stderr)
        return 1
    t = time.perf_counter()
    run.finish(sorted(run.rows(), key=lambda r: r["trial_id"]))
    result["seconds"]["finish"] = time.perf_counter() - t
    table = verify_table(run, [p.trial.trial_id for p in planned])
    seconds = dict(result["seconds"]) | {"total": time.perf_counter() - started}
    print(report(args, result, table, final, seconds))
    clean = table["rows"] == table["unique"] == args.trials and not (table["missing"] or table["extra"])
    return 0 if clean and not table["repeats_differing"] and not table["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
