"""Prune a model once and write it out as a standard Hugging Face directory, to study it further.

    python -m sensray.prune --model pythia-70m --method wanda --sparsity 0.5 --output-dir data/pythia-70m-wanda50
    python -m sensray.prune --model sensray-tiny --method magnitude --pattern 2:4 --output-dir data/tiny-2of4
    python -m sensray.prune --model sensray-tiny --method sensitivity --score wanda --sparsity 0.6 \\
        --run results/prune-layers --output-dir data/tiny-sens60
    python -m sensray.sweep experiments/noise.yaml --set model.name=data/pythia-70m-wanda50

The pruning is the `prune` perturbation kind, with the same parameters and checks as in a sweep
(see docs/pruning.md). --output-dir (or --out) receives config, safetensors weights, tokenizer, and
sensray-prune.json: method, pattern, requested and achieved sparsity (per tensor and overall),
source model and revision, calibration settings, weight checksums. Everything is written into a
temporary directory beside it and renamed into place at the end, so a failure leaves nothing.
Invalid arguments exit with status 2 and one line naming the argument.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sensray.errors import SensrayError, SpecError

METADATA = "sensray-prune.json"
# CLI option -> prune parameter
OPTIONS = ("target", "method", "sparsity", "pattern", "scope", "score", "run", "spread", "calibration",
           "calib_sequences", "calib_seq_len")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sensray.prune",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="alias (python -m sensray.sweep --list-models), HF id, or "
                                                       "local HF directory")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of --model")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with --model (its own config/modeling files)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="load, prune and save in this dtype (default float32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--output-dir", "--out", dest="out", required=True, metavar="DIR",
                        help="directory to create (must not exist yet); --out is the older spelling")
    parser.add_argument("--target", default="blocks.*", help="what to prune (default: every linear weight of every "
                                                             "decoder block); biases and norms are never pruned")
    parser.add_argument("--method", choices=("magnitude", "wanda", "sensitivity"), default="magnitude")
    parser.add_argument("--sparsity", type=float, help="share of weights zeroed, 0..1 (implied by an N:M --pattern)")
    parser.add_argument("--pattern", help="unstructured (default) or N:M, e.g. 2:4: keep N of every M input weights")
    parser.add_argument("--scope", choices=("tensor", "row"), help="weights compete per matrix or per output row "
                                                                   "(default: tensor for magnitude, row for wanda)")
    parser.add_argument("--score", choices=("magnitude", "wanda"), help="sensitivity: rank weights by (default "
                                                                        "magnitude)")
    parser.add_argument("--run", help="sensitivity: a run (or experiment) directory with per-layer trials")
    parser.add_argument("--spread", type=float, help="sensitivity: half the gap between layer sparsities (default 0.1)")
    parser.add_argument("--calibration", help="wanda: calibration corpus (default bundled-train; never the eval text)")
    parser.add_argument("--calib-sequences", type=int, help="wanda: calibration windows (default 32)")
    parser.add_argument("--calib-seq-len", type=int, help="wanda: tokens per window (default 128)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export(args)
    except SensrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


def export(args: argparse.Namespace) -> Path:
    """Prune `args.model` as asked and write it to `args.out`; returns that directory."""
    from sensray.checksum import weights_checksum
    from sensray.models import load_model, load_tokenizer, meta_model
    from sensray.perturbations import PERTURBATIONS

    kind, out = PERTURBATIONS.get("prune"), Path(args.out)
    if out.exists():
        raise SpecError("--output-dir", f"{out} already exists; choose a new directory (nothing is overwritten)")
    params = _params(kind, args)
    spec = _model_spec(args)
    try:
        meta = meta_model(spec)
    except SensrayError as err:
        raise SpecError("--model", str(err).removeprefix("model.name: ")) from None
    _checked(kind, meta, params)  # bad arguments fail before any weight is loaded
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    before = weights_checksum(model)
    kind.apply(model, params)  # never restored: this process exists to write the pruned model
    meta = metadata(args, model, params, before, weights_checksum(model))
    write_model_dir(out, model, tokenizer, {METADATA: json.dumps(meta, indent=2) + "\n"})
    return out


def _params(kind, args: argparse.Namespace):
    from sensray.perturbations import ParamError

    given = {name: getattr(args, name) for name in OPTIONS if getattr(args, name) is not None}
    try:
        return kind.parse(given)
    except ParamError as err:
        raise SpecError(_flag(err.param), str(err)) from None


def _checked(kind, model, params) -> None:
    from sensray.perturbations import ParamError

    try:
        kind.check(model, params)
    except ParamError as err:
        raise SpecError(_flag(err.param), str(err)) from None


def _flag(param: str) -> str:
    return "--" + param.replace("_", "-") if param else "arguments"


def _model_spec(args: argparse.Namespace):
    from sensray.spec import ModelSpec

    return ModelSpec(name=args.model, dtype=args.dtype, device=args.device, revision=args.revision,
                     trust_remote_code=args.trust_remote_code)


def metadata(args: argparse.Namespace, model, params, before: str, after: str) -> dict[str, Any]:
    """What sensray-prune.json records: how the model was pruned and what came out."""
    import sensray
    from sensray.models import resolve_name
    from sensray.perturbations.prune import matrices, sparsities
    from sensray.targets import select

    refs = matrices(model, select(model, params.target).tensors, params.target)
    per_tensor, zeros, total = {}, 0, 0
    for ref, allotted in zip(refs, sparsities(model, refs, params)):
        live = ref.resolve(model)
        count = int((live == 0).sum())
        zeros, total = zeros + count, total + live.numel()
        per_tensor[ref.name] = {"param": ref.param, "shape": list(live.shape), "zeros": count,
                                "sparsity": count / live.numel(), "allotted": allotted}
    wanda = params.ranking == "wanda"
    return {
        "format": "sensray-prune/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sensray": sensray.__version__,
        "source": {"model": args.model, "resolved": resolve_name(args.model), "revision": args.revision,
                   "commit": getattr(model.config, "_commit_hash", None), "dtype": args.dtype,
                   "weights_checksum": before},
        "target": params.target, "method": params.method, "score": params.ranking, "pattern": params.pattern,
        "scope": params.where, "requested_sparsity": params.target_sparsity,
        "calibration": ({"corpus": params.calibration, "sequences": params.calib_sequences,
                         "seq_len": params.calib_seq_len} if wanda else None),
        "sensitivity": ({"run": params.run, "spread": params.spread} if params.method == "sensitivity" else None),
        "achieved": {"overall": zeros / total, "zeros": zeros, "weights": total, "tensors": per_tensor},
        "weights_checksum": after,
    }


def write_model_dir(out: Path, model, tokenizer, files: dict[str, str | bytes]) -> None:
    """Write the model, its tokenizer and `files` (name -> text or bytes: metadata, figures) into a
    temporary sibling of `out`, then rename it into place (sensray heal writes its exports here too)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        tokenizer.save_pretrained(tmp)
        pickles = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if pickles or not any(tmp.glob("*.safetensors")):
            raise SensrayError(f"--output-dir: expected safetensors weights only, the save wrote {pickles or 'none'}")
        for name, content in files.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
        os.rename(tmp, out)  # fails rather than merge if the directory appeared meanwhile
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise SpecError("--output-dir", f"cannot write {out}: {err}; nothing was written") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
