"""Heal a pruned or otherwise damaged model by fine-tuning it, and write it out as a HF directory.

    sensray heal --model data/tiny-wanda50 --method lora --steps 300 --output-dir data/tiny-wanda50-lora
    sensray heal --model data/tiny-wanda50 --method masked --steps 300 --lr 1e-4 --dry-run
    sensray heal --model data/tiny-wanda50 --method lora --steps 300 --output-dir data/tiny-wanda50-lora --resume
    sensray heal --model data/tiny-wanda50 --method masked --steps 100 --workers 2 --deepspeed 2
    sensray heal --model data/x --method lora --steps 50 --set lora.targets='[blocks.*.attn.q, blocks.*.attn.v]'

`lora` trains peft adapters and merges them; `masked` trains every weight except the pruned
ones, whose gradients are zeroed. Either way the export keeps exactly the pruned model's zeros
(sensray-prune.json says which tensors were pruned; a model without one is plainly fine-tuned,
and the output says so). The training text defaults to bundled-train, never the eval text.
--output-dir receives the model, tokenizer, sensray-heal.json (recipe, loss curve, eval ppl
before and after, sparsity) and loss-curve.png, renamed into place when complete; checkpoints
go to <output-dir>.heal-state/ so --resume continues after a crash. More than one --workers (or
--deepspeed) trains under Ray Train. Every recipe key can be --set (docs/heal.md). Invalid
arguments exit with status 2 and one line naming the argument; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sensray.errors import SpecError, run_cli

# recipe key -> the flag that sets it, so errors name what the user typed
FLAGS = {"steps": "--steps", "lr": "--lr", "method": "--method", "output_dir": "--output-dir",
         "train.corpus": "--corpus", "train.batch_size": "--batch-size", "train.seq_len": "--seq-len",
         "eval.corpus": "--eval-corpus", "workers": "--workers", "deepspeed": "--deepspeed",
         "mixed_precision": "--mixed-precision", "model": "--model", "model.name": "--model"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sensray.heal", description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="alias, HF id, or local HF directory (e.g. a sensray prune "
                                                       "export)")
    parser.add_argument("--method", required=True, choices=("lora", "masked"))
    parser.add_argument("--steps", required=True, type=int, help="optimizer steps")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 lora, 1e-5 masked)")
    parser.add_argument("--output-dir", "--out", dest="out", metavar="DIR",
                        help="directory to create (default: <model>-<method> beside a local model)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted heal of this output from its "
                                                              "last checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="check everything, say what would run, write nothing")
    parser.add_argument("--corpus", help="training text: bundled-train (default), a .txt/.jsonl path, hf:<dataset>")
    parser.add_argument("--eval-corpus", help="text the perplexity before and after is measured on (default bundled)")
    parser.add_argument("--batch-size", type=int, help="windows per optimizer step, over all workers (default 8)")
    parser.add_argument("--seq-len", type=int, help="tokens per training window (default 128)")
    parser.add_argument("--workers", type=int, help="training processes under Ray Train (default 1: this process)")
    parser.add_argument("--deepspeed", type=int, choices=(1, 2), help="DeepSpeed ZeRO stage (under Ray Train)")
    parser.add_argument("--address", help="Ray cluster to train on (default: a local Ray on 127.0.0.1)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"))
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--revision", help="Hub revision of --model")
    parser.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped with --model")
    parser.add_argument("--threads", type=int, help="torch threads in this process (default: torch's choice; on a "
                                                    "busy machine 1 is often fastest)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set any recipe key, value parsed as YAML (repeatable), e.g. --set warmup_steps=10")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or default_output(args.model, args.method))
    said = f"checkpoints are kept in {out}.heal-state; continue with the same command and --resume"
    return run_cli(lambda: _run(args), interrupted=said)


def _run(args: argparse.Namespace) -> int:
    from sensray.heal.recipe import check_recipe, parse_recipe
    from sensray.heal.run import check_state, heal
    from sensray.spec import check_remote_code

    recipe = parse_recipe(raw_recipe(args), FLAGS)
    check_remote_code(recipe.model, args.trust_remote_code)
    try:
        check_recipe(recipe)
    except SpecError as err:  # name the flag the user typed, where there is one
        raise SpecError(FLAGS.get(err.path, err.path), err.message) from None
    check_state(recipe, args.resume)
    if args.dry_run:
        print(describe(recipe))
        return 0
    print(describe(recipe), file=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = heal(recipe, resume=args.resume, address=args.address)
    print(summary(out), file=sys.stderr)
    print(out)
    return 0


def raw_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as a recipe mapping (then --set on top), validated by parse_recipe."""
    from sensray.heal.recipe import EVAL_TEXT, TRAIN_TEXT
    from sensray.spec import apply_override

    model = {"name": args.model, "dtype": args.dtype, "device": args.device, "revision": args.revision,
             "trust_remote_code": args.trust_remote_code}
    train = {k: v for k, v in (("corpus", args.corpus), ("batch_size", args.batch_size), ("seq_len", args.seq_len))
             if v is not None}
    given = {"lr": args.lr, "workers": args.workers, "deepspeed": args.deepspeed,
             "mixed_precision": args.mixed_precision}
    raw = {"model": model, "method": args.method, "steps": args.steps,
           "output_dir": args.out or default_output(args.model, args.method),
           "train": TRAIN_TEXT.model_dump() | train,
           "eval": EVAL_TEXT.model_dump() | ({"corpus": args.eval_corpus} if args.eval_corpus else {}),
           **{k: v for k, v in given.items() if v is not None}}
    for override in args.overrides:
        apply_override(raw, override)
    return raw


def default_output(model: str, method: str) -> str:
    """<model>-<method> beside a local model directory; in the current directory for an alias or Hub id."""
    path = Path(model)
    return str(path.with_name(f"{path.name}-{method}")) if path.is_dir() else f"{path.name}-{method}"


def describe(recipe) -> str:
    """What a heal will do, in a few lines (the dry run's output, and the first lines of a real one)."""
    from sensray.heal.masks import read_pruning

    train, pruning = recipe.train, read_pruning(recipe.model.name)
    if recipe.mask == "none" or (recipe.mask == "auto" and pruning is None):
        mask = "none: plain fine-tuning, no weight held at zero" + (
            f" ({recipe.model.name} has no sensray-prune.json)" if pruning is None else "")
    elif recipe.mask == "zeros":
        mask = "every zero of every block weight matrix, as loaded"
    else:
        achieved = pruning[1]["achieved"]
        mask = (f"{Path(pruning[0]).name}: {len(achieved['tensors'])} tensors, {achieved['zeros']:,} weights held at "
                f"zero ({achieved['overall']:.2%})")
    where = "this process" if not recipe.distributed else (
        f"{recipe.workers} Ray Train workers" + (f", DeepSpeed ZeRO-{recipe.deepspeed}" if recipe.deepspeed else ""))
    adapters = f", adapters r {recipe.lora.r} on {', '.join(recipe.lora.targets)}" if recipe.method == "lora" else ""
    return "\n".join([
        f"heal: {recipe.method} on {recipe.model.name} [{recipe.model.dtype}]{adapters}",
        f"  mask: {mask}",
        f"  train: {recipe.steps} steps x {train.batch_size} windows of {train.seq_len} tokens of {train.corpus}, "
        f"lr {recipe.peak_lr:g} ({recipe.schedule}, warmup {recipe.warmup_steps}), seed {recipe.seed}",
        f"  eval: ppl before and after on {recipe.eval.corpus} ({recipe.eval.max_sequences or 'all'} windows of "
        f"{recipe.eval.seq_len} tokens)",
        f"  runs on: {where}; checkpoint every {recipe.every} steps in {recipe.output_dir}.heal-state",
        f"  output: {recipe.output_dir}"])


def summary(out: Path) -> str:
    """The closing lines: perplexity before and after, and the sparsity the export kept."""
    record = json.loads((out / "sensray-heal.json").read_text(encoding="utf-8"))
    ev, mask, achieved = record["eval"], record["mask"], record["achieved"]
    kept = (f"sparsity {achieved['overall']:.4f} over {mask['tensors']} tensors ({mask['held_at_zero']:,} weights "
            f"held at zero; {mask['moved_then_rezeroed']:,} had moved and were zeroed again)"
            if mask["held_at_zero"] else "plain fine-tuning: no weight held at zero")
    return (f"healed in {record['steps']} steps ({record['seconds']:.1f} s of training): eval ppl "
            f"{ev['ppl_before']:.4f} -> {ev['ppl_after']:.4f} on {ev['corpus']} ({ev['tokens']:,} tokens); {kept}")


if __name__ == "__main__":
    sys.exit(main())
