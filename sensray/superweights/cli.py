"""Find a model's super-weight candidates, then verify them as a sweep.

    python -m sensray.superweights --model sensray-tiny --executor local
    python -m sensray.superweights --model mistral-7b --dtype bfloat16 --eval hf:wikitext/wikitext-2-raw-v1
    python -m sensray.superweights --model llama-2-7b --discover-only          # candidates only, no sweep
    python -m sensray.superweights --model sensray-tiny --strongest 2          # also verify 2 sub-threshold pairs

Discovery runs in this process on calibration text (default: the shipped model's training text,
never the eval text). Verification is a sensray sweep per tensor with candidates (the `zero` kind:
each candidate alone, one random weight per seed, the largest weight), on Ray by default or with
--executor local. Everything lands in one directory, printed last: report.md, activations.png,
candidates.json, verdicts.json, activations.parquet, and the sweeps' run directories. Invalid
arguments exit with status 2 and one line saying what is wrong; nothing is written.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import polars as pl
import torch

from sensray.errors import SensrayError, SpecError, run_cli
from sensray.executors import EXECUTORS
from sensray.spec import DataSpec, ModelSpec, ResourcesSpec
from sensray.superweights import report
from sensray.superweights.discovery import Discovery, Pair, Thresholds, discover
from sensray.superweights.verify import judge, verification_spec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other invalid argument
        raise SpecError("", message)


def build_parser() -> argparse.ArgumentParser:
    from sensray.cli_options import default_executor, replicas_or_auto as _replicas

    th = Thresholds()
    p = _Parser(prog="python -m sensray.superweights", description=__doc__.split("\n\n")[0],
                epilog="example: python -m sensray.superweights --model sensray-tiny --executor local",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="alias (python -m sensray.sweep --list-models), HF id, or local dir")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with --model (its own config/modeling files)")
    p.add_argument("--calibration", default="bundled-train", metavar="CORPUS",
                   help="text for discovery (default: bundled-train, the shipped model's training text); "
                        "hf: corpora use their train split")
    p.add_argument("--calibration-sequences", type=int, default=32, metavar="N", help="calibration windows (default 32)")
    p.add_argument("--eval", default="bundled", metavar="CORPUS",
                   help="text the verification sweep measures on (default: bundled, held-out); hf: uses test")
    p.add_argument("--num-sequences", type=int, default=16, metavar="N", help="eval windows (default 16)")
    p.add_argument("--seq-len", type=int, default=128, metavar="TOKENS", help="window length, both texts (default 128)")
    p.add_argument("--min-magnitude", type=float, default=th.min_magnitude, metavar="T",
                   help=f"a spike's |activation| is at least T (default {th.min_magnitude:g})")
    p.add_argument("--min-ratio", type=float, default=th.min_ratio, metavar="K",
                   help=f"... and at least K x the block's median channel maximum (default {th.min_ratio:g})")
    p.add_argument("--min-share", type=float, default=th.min_share, metavar="S",
                   help=f"the one weight carries at least S of the output spike (default {th.min_share:g})")
    p.add_argument("--strongest", type=int, default=0, metavar="N",
                   help="also verify the N most coordinated pairs below the thresholds (default 0)")
    p.add_argument("--seeds", type=int, default=8, metavar="N", help="random controls per weight (default 8)")
    p.add_argument("--discover-only", action="store_true", help="find and report candidates; run no sweep")
    p.add_argument("--executor", choices=list(EXECUTORS), default=default_executor(),
                   help="where the sweep runs: ray (default when installed) or local (this process)")
    p.add_argument("--address", help="Ray only: a running cluster to join ('auto' on its head node)")
    p.add_argument("--replicas", type=_replicas, metavar="N|auto", help="Ray only: how many replicas")
    p.add_argument("--gpus", type=float, default=0, help="GPUs per replica in the sweep (default 0)")
    p.add_argument("--output-dir", default="results", help="parent of the output directory (default results)")
    return p


def main(argv: list[str] | None = None) -> int:
    # The parser reports bad arguments as a SpecError, so parsing happens inside run_cli too.
    return run_cli(lambda: run(build_parser().parse_args(argv)), interrupted="a sweep's finished trials are in its trials.jsonl; finish it "
                   "with python -m sensray.sweep --resume RUN_DIR")


def run(args: argparse.Namespace) -> int:
    setup = _Setup(args)  # every check that needs no weights: raises before anything is written
    model = _usage(setup.load_model, "--model")
    found = discover(model, setup.calibration, setup.thresholds)
    pairs = found.candidates + found.strongest(args.strongest)
    plans = [] if args.discover_only else setup.plans(pairs)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the sweep's replicas load their own copy

    out = setup.output_dir()
    _write_discovery(out, found, setup)
    print(report.printed(report.layer_table(found)))
    print(report.printed(report.pair_table(found.candidates, setup.decode)) if found.candidates
          else "no candidate super weight at these thresholds")
    verdicts = None if args.discover_only else _verify(plans, pairs, setup, out)
    (out / "report.md").write_text(report.markdown(found, verdicts, setup.describe(), setup.decode), encoding="utf-8")
    if verdicts:
        print(report.printed(report.verdict_table(verdicts)))
    print(out)
    return 0


class _Setup:
    """The arguments, validated against the model's config, tokenizer and texts (no weights)."""

    def __init__(self, args: argparse.Namespace):
        from sensray.models import meta_model

        self.args = args
        least = {"calibration_sequences": 1, "num_sequences": 1, "seeds": 1, "seq_len": 2, "strongest": 0,
                 "min_magnitude": 0, "min_ratio": 0, "min_share": 0, "gpus": 0}
        for name, low in least.items():
            if getattr(args, name) < low:
                raise SpecError(f"--{name.replace('_', '-')}", f"must be at least {low}, got {getattr(args, name)}")
        if args.executor != "ray" and (args.address or args.replicas):
            raise SpecError("--address/--replicas", "only for --executor ray")
        self.thresholds = Thresholds(args.min_magnitude, args.min_ratio, args.min_share)
        self.model = ModelSpec(name=args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        self.meta = _usage(lambda: meta_model(self.model), "--model")
        _usage(lambda: _check_family(self.meta), "--model")
        self.tokenizer = _usage(lambda: _tokenizer(self.model), "--model")
        self.calib_data = DataSpec(corpus=args.calibration, split="train", seq_len=args.seq_len,
                                   num_sequences=args.calibration_sequences, batch_size=8)
        self.eval_data = DataSpec(corpus=args.eval, split="test", seq_len=args.seq_len,
                                  num_sequences=args.num_sequences, batch_size=min(16, args.num_sequences))
        self.calibration = _windows(self.calib_data, self.tokenizer, "--calibration", "--calibration-sequences")
        _windows(self.eval_data, self.tokenizer, "--eval", "--num-sequences")
        if args.calibration == args.eval and not args.eval.startswith("hf:"):  # hf: train vs test split
            print(f"warning: --calibration and --eval are the same text ({args.eval}): candidates are "
                  "measured on the text that chose them", file=sys.stderr)
        self.runs: list[Path] = []
        self.baseline_ppl = float("nan")

    def load_model(self):
        from sensray.models import load_model

        return load_model(self.model)

    def plans(self, pairs: list[Pair]) -> list:
        """One validated plan per tensor that holds a pair to verify."""
        from sensray.plan import make_plan

        by_target: dict[str, list[Pair]] = {}
        for pair in sorted(pairs, key=lambda p: (p.layer, p.row)):
            by_target.setdefault(pair.target, []).append(pair)
        plans = []
        for target, group in by_target.items():
            spec = verification_spec(
                name=f"verify-{target.removesuffix('.weight')}", model=self.model, data=self.eval_data,
                target=target, coords=[[p.row, p.col] for p in group], seeds=self.args.seeds,
                output_dir="<output dir>", resources=ResourcesSpec(gpus=self.args.gpus, cpus=1),
                description=f"super-weight candidates of {self.args.model} in {target} against random and "
                            "top-magnitude controls")
            plans.append(make_plan(spec, self.meta))
        return plans

    def output_dir(self) -> Path:
        from sensray.results import new_run_id

        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(self.args.model).name if Path(self.args.model).is_dir()
                      else self.args.model).strip("-.") or "model"
        out = Path(self.args.output_dir) / f"superweights-{slug}" / new_run_id()
        out.mkdir(parents=True)
        return out

    def decode(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def describe(self, verification: bool = True) -> dict:
        a = self.args
        out = {
            "model": f"{a.model} ({a.dtype})",
            "calibration": f"{a.calibration}, {a.calibration_sequences} x {a.seq_len} tokens",
            "eval": f"{a.eval}, {a.num_sequences} x {a.seq_len} tokens",
        }
        return out | ({"baseline_ppl": self.baseline_ppl, "runs": [str(r) for r in self.runs]} if verification else {})


def _verify(plans: list, pairs: list[Pair], setup: _Setup, out: Path) -> list:
    from sensray.plan import Plan
    from sensray.sweep import _run  # the sweep CLI's driver: run dir, journal, progress, checksums

    trials = []
    for plan in plans:
        spec = plan.spec.model_copy(update={"output_dir": str(out)})
        _run(Plan(spec, plan.trials), run_dir=None, executor_name=setup.args.executor, **_options(setup.args))
        (run,) = (out / spec.name).iterdir()
        setup.runs.append(run)
        setup.baseline_ppl = json.loads((run / "baseline.json").read_text())["ppl"]
        trials.append(pl.read_parquet(run / "trials.parquet"))
    if not trials:
        return []
    verdicts = judge(pl.concat(trials, how="diagonal_relaxed"), pairs)
    (out / "verdicts.json").write_text(json.dumps(
        {"setup": setup.describe(), "verdicts": [_verdict_json(v) for v in verdicts]}, indent=2) + "\n")
    return verdicts


def _options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("address", args.address), ("replicas", args.replicas)) if v is not None}


def _write_discovery(out: Path, found: Discovery, setup: _Setup) -> None:
    summary = {"setup": setup.describe(verification=False)} | found.summary()
    (out / "candidates.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    rows = [(a.layer, side, channel, float(v)) for a in found.layers
            for side, values in (("input", a.inputs), ("output", a.outputs)) for channel, v in enumerate(values)]
    pl.DataFrame(rows, schema=["layer", "side", "channel", "max_abs"], orient="row").write_parquet(
        out / "activations.parquet")
    context = f"{setup.args.model}, {found.tokens} calibration tokens of {setup.args.calibration}"
    report.save_figure(report.activation_figure(found, context), out / "activations.png")


def _verdict_json(v) -> dict:
    return {"name": v.pair.name, "target": v.pair.target, "coords": [v.pair.row, v.pair.col],
            "candidate": v.pair.candidate, "verdict": v.verdict,
            "zeroed": v.candidate and asdict(v.candidate), "random": v.random and asdict(v.random),
            "top": v.top and asdict(v.top), "top_includes_candidate": v.top_includes_candidate}


def _usage(call, flag: str):
    """Run a validation step; a user-caused failure becomes one line naming the flag, exit 2."""
    try:
        return call()
    except SpecError:
        raise
    except (SensrayError, ValueError) as err:
        message = re.sub(r"^model\.name: ", "", str(err))
        raise SpecError(flag, message) from None


def _check_family(meta) -> None:
    from sensray.adapters import adapter_for
    from sensray.superweights.discovery import down_projections

    adapter_for(meta.config)
    if not down_projections(meta):
        raise SensrayError(f"{type(meta).__name__} has no MLP down projection (blocks.*.mlp.down)")


def _tokenizer(spec: ModelSpec):
    from sensray.models import load_tokenizer

    return load_tokenizer(spec)


def _windows(data: DataSpec, tokenizer, corpus_flag: str, count_flag: str) -> torch.Tensor:
    from sensray.data import load_text, token_windows

    flags = {"data.corpus": corpus_flag, "data.text_field": corpus_flag, "data.seq_len": "--seq-len",
             "data.num_sequences": count_flag}
    try:
        return token_windows(tokenizer, load_text(data), data.seq_len, data.max_sequences)
    except SpecError as err:
        raise SpecError(flags.get(err.path, corpus_flag), err.message) from None
