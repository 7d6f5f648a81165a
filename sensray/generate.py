"""Generate text from a model, optionally under a perturbation: hear what a damaged model says.

    python -m sensray.generate --prompt "The for statement"                     # sensray-tiny, as trained
    python -m sensray.generate --model gpt-neo-125m --prompt "Once upon a time"
    python -m sensray.generate --perturb bitflip --param target=blocks.3 --param field=exponent_msb \\
        --param seed=1 --prompt "The for statement"
    python -m sensray.generate --run results/bitflip/<run id> --trial <trial_id> --prompt "..."
    python -m sensray.generate --adversarial results/adversarial/<run id> [--model data/tiny-wanda50]
    python -m sensray.generate --attack results/attack-bitflip/<run id>        # an attack's committed flips

Decoding is greedy, so the same model, prompt and perturbation always give the same text.
With a perturbation the unperturbed and perturbed continuations are printed side by side (one
after the other on a narrow terminal); then the weights are restored and verified bit for bit,
and the whole model's checksum is compared with the one taken before. `--param` values are
parsed as YAML (`seed=1` is an int, `coords=[[0, 3]]` a list). `--trial` re-applies a trial of a
finished run exactly: trials are deterministic given their parameters, so the same elements
flip (or the same noise is drawn) as in the sweep. `--adversarial` continues each input of a
finished `sensray adversarial` run, clean and attacked (its token ids as found), on its model
or on another one with the same tokenizer (`--model`). `--attack` applies an attack's committed
flips (sensray attack), each checked against the bits it overwrites, and reverts them after.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import textwrap
from contextlib import contextmanager
from typing import Any, Iterator

from sensray import safe_yaml
from sensray.changes import element
from sensray.errors import RestoreError, SpecError, run_cli

DEFAULT_PROMPT = "The for statement"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sensray.generate",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text to continue (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=int, default=40, metavar="N", help="tokens to generate (default 40)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="never end the text early: end-of-text is forbidden until --max-new-tokens "
                             "(a damaged model often ends at once), and special tokens are shown")
    parser.add_argument("--model", help="alias (python -m sensray.sweep --list-models), HF id or local directory "
                        "(default: sensray-tiny)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="weight dtype (default float32; with --run, the run's)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"],
                        help="where to run (default: the spec's, else auto)")
    parser.add_argument("--perturb", metavar="KIND",
                        help="perturbation kind (python -m sensray.sweep --list-perturbations)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of --perturb, value parsed as YAML (repeatable), "
                             "e.g. --param target=blocks.3")
    parser.add_argument("--run", metavar="RUN_DIR",
                        help="a finished run: its model, and with --trial one of its trials")
    parser.add_argument("--trial", metavar="TRIAL_ID",
                        help="trial id (or a unique prefix) from the run's trials.parquet")
    parser.add_argument("--adversarial", metavar="RUN_DIR",
                        help="a finished `sensray adversarial` run: every attack's clean vs adversarial continuation")
    parser.add_argument("--attack", metavar="ATTACK_DIR",
                        help="an attack's directory (sensray attack): its model, clean beside its committed flips")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with the model (needed when its spec says trust_remote_code)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    if args.adversarial:
        return _adversarial(args)
    if args.attack:
        return _attacked(args)
    model_spec, kind, params, about = _plan(args)
    from sensray.models import load_model, load_tokenizer, pick_device

    device = pick_device(model_spec)
    print(f"loading {model_spec.name} [{model_spec.dtype}, {device}]", file=sys.stderr)
    model, tokenizer = load_model(model_spec, device), load_tokenizer(model_spec)
    clean = greedy(model, tokenizer, args.prompt, args.max_new_tokens, args.ignore_eos)
    if kind is None:
        print(f"prompt: {args.prompt!r}\n\n{args.prompt}{clean}")
        return 0
    with perturbed(model, kind, params) as report:
        damaged = greedy(model, tokenizer, args.prompt, args.max_new_tokens, args.ignore_eos)
    print(f"prompt: {args.prompt!r}\nperturbation: {about}\nchanged:\n{textwrap.indent(report['changed'], '  ')}\n")
    print(compare_texts("unperturbed", clean, "perturbed", damaged, _width()))
    print(f"\n{report['restored']}")
    return 0


def _adversarial(args: argparse.Namespace) -> int:
    """Each attack of an adversarial run: the model's continuation of the clean and of the attacked input."""
    import polars as pl

    from sensray.adversarial.attack import problem_of
    from sensray.adversarial.objective import prompt
    from sensray.adversarial.store import AttackRun
    from sensray.models import load_model, load_tokenizer, pick_device
    from sensray.spec import check_remote_code

    if args.run or args.perturb or args.param:
        raise SpecError("--adversarial", "shows an adversarial run's inputs; drop --run/--trial/--perturb/--param")
    run = AttackRun.open(args.adversarial)
    if not run.table.is_file():
        raise SpecError("--adversarial", f"{run.path} has no attacks.parquet: the attack has not finished")
    spec, cases = run.spec(), {c.index: c for c in run.cases()}
    model_spec = spec.model.model_copy(update={k: v for k, v in (("name", args.model), ("dtype", args.dtype),
                                                                 ("device", args.device)) if v})
    check_remote_code(model_spec, args.trust_remote_code)
    model, tokenizer = load_model(model_spec, pick_device(model_spec)), load_tokenizer(model_spec)
    if args.model and tokenizer.get_vocab() != load_tokenizer(spec.model).get_vocab():
        raise SpecError("--model", f"{args.model} has another tokenizer than {spec.model.name}, which was attacked")
    for r in pl.read_parquet(run.table).iter_rows(named=True):
        problem = problem_of(cases[r["case"]], spec)
        clean, attacked = (greedy(model, tokenizer, prompt(problem, edit), args.max_new_tokens, args.ignore_eos)
                           for edit in (problem.clean, r["ids"]))
        print(f"case {r['case']} ({r['source']}), budget {r['budget']} on {model_spec.name}\n"
              f"prompt: {r['prompt']!r}\nadversarial edit: {r['text']!r}\n")
        print(compare_texts("clean input", clean, "adversarial input", attacked, _width()) + "\n")
    return 0


def _attacked(args: argparse.Namespace) -> int:
    """Clean text beside the text of the model with an attack's committed flips (reverted and verified after)."""
    from pathlib import Path

    from sensray.attack.state import committed_changes, read_flips
    from sensray.committed import committed
    from sensray.models import load_model, load_tokenizer, pick_device
    from sensray.spec import check_remote_code

    if args.run or args.perturb or args.param or args.model or args.dtype:
        raise SpecError("--attack", "the model and its flips come from the attack's directory; drop "
                                    "--run/--trial/--perturb/--param/--model/--dtype")
    if not (Path(args.attack) / "spec.yaml").is_file():
        raise SpecError("--attack", f"{args.attack} is not an attack's directory (no spec.yaml)")
    spec, flips = read_flips(args.attack)
    check_remote_code(spec.model, args.trust_remote_code)
    model_spec = spec.model.model_copy(update={"device": args.device} if args.device else {})
    model, tokenizer = load_model(model_spec, pick_device(model_spec)), load_tokenizer(model_spec)
    clean = greedy(model, tokenizer, args.prompt, args.max_new_tokens, args.ignore_eos)
    with committed(model, committed_changes(flips)):
        attacked = greedy(model, tokenizer, args.prompt, args.max_new_tokens, args.ignore_eos)
    more = f"\n  ... {len(flips) - 8} more" if len(flips) > 8 else ""
    said = "\n".join(f"  {element(f)}" for f in flips[:8]) + more
    print(f"prompt: {args.prompt!r}\nattack: {args.attack}, {len(flips)} committed flips:\n{said}\n")
    print(compare_texts("clean", clean, f"after {len(flips)} flips", attacked, _width()))
    print("\nflips reverted; weights verified bit-exact against the checksum taken before")
    return 0


def _plan(args: argparse.Namespace):
    """(model spec, kind class or None, parsed params, a one-line description) from the arguments."""
    from sensray.spec import ModelSpec, check_remote_code

    if args.trial and not args.run:
        raise SpecError("--trial", "needs --run RUN_DIR (the run the trial belongs to)")
    if args.run and (args.perturb or args.param):
        raise SpecError("--run", "give a trial of a run (--run, --trial) or an inline perturbation "
                                 "(--perturb, --param), not both")
    if args.param and not args.perturb:
        raise SpecError("--param", "needs --perturb KIND")
    device = {"device": args.device} if args.device else {}
    if args.run:
        if args.model or args.dtype:
            raise SpecError("--run", "the model and dtype come from the run's spec.yaml; drop --model/--dtype")
        model_spec, kind_name, raw, about = trial_perturbation(args.run, args.trial)
        check_remote_code(model_spec, args.trust_remote_code)
        model_spec = model_spec.model_copy(update=device)
    else:
        model_spec = ModelSpec(name=args.model or "sensray-tiny", dtype=args.dtype or "float32",
                               trust_remote_code=args.trust_remote_code, **device)
        kind_name, raw = args.perturb, parse_params(args.param)
        about = f"{kind_name} " + " ".join(f"{k}={v}" for k, v in raw.items()) if kind_name else ""
    if not kind_name:
        return model_spec, None, None, ""
    kind = _kind(kind_name)
    return model_spec, kind, _parse(kind, raw), about


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """['target=blocks.3', 'seed=1'] -> {'target': 'blocks.3', 'seed': 1} (values as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError("--param", f"expected KEY=VALUE (e.g. target=blocks.3), got {pair!r}")
        try:
            out[key] = safe_yaml.load(value)
        except SpecError:
            out[key] = value  # `target=*` is not valid YAML (an alias) but is a fine pattern
    return out


def _kind(name: str):
    from sensray.perturbations import PERTURBATIONS

    if name not in PERTURBATIONS:
        raise SpecError("--perturb", PERTURBATIONS.unknown(name))
    return PERTURBATIONS.get(name)


def _parse(kind, raw: dict[str, Any]):
    from sensray.perturbations import ParamError

    known = list(kind.Params.model_fields)
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SpecError(f"--param {key}", f"not a parameter of {kind.name}; {hint}(parameters: {', '.join(known)})")
    try:
        return kind.parse(raw)
    except ParamError as err:
        raise SpecError(f"--param {err.param}" if err.param else "--param", str(err)) from None


def trial_perturbation(run_path: str, trial: str | None):
    """The run's model spec and, for a trial id (or unique prefix), its kind and recorded params."""
    from pathlib import Path

    from sensray.results import RunDir

    if not (Path(run_path) / "spec.yaml").is_file():
        raise SpecError("--run", f"{run_path} is not a sensray run directory (no spec.yaml)")
    run = RunDir.open(run_path)
    try:
        spec = run.spec()
    except SpecError as err:
        raise err.located(str(run.path / "spec.yaml")) from None
    if trial is None:
        return spec.model, None, {}, ""
    row, params = find_trial(run.table, trial)
    recorded = (f"in the sweep: ppl ×{row['delta_ppl']:.4g} of the baseline" if row.get("delta_ppl") is not None
                else "failed in the sweep")
    about = (f"trial {row['trial_id']} of {run.path} ({recorded}): {row['kind']} "
             + " ".join(f"{k}={v}" for k, v in params.items() if v is not None))
    return spec.model, row["kind"], {k: v for k, v in params.items() if v is not None}, about


def find_trial(table, trial: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The row of `trial` (an id or a unique prefix) and its parameters exactly as the sweep ran them."""
    import polars as pl

    from sensray.results import LAST_COLUMNS, PROVENANCE, is_task_column
    from sensray.space import trial_id

    if not table.is_file():
        raise SpecError("--run", "no trials.parquet: the sweep has not finished (finish it with --resume)", str(table))
    trials = pl.read_parquet(table)
    rows = trials.filter(pl.col("trial_id").str.starts_with(trial))
    if len(rows) != 1:
        ids = trials["trial_id"].to_list()
        close = difflib.get_close_matches(trial, ids, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else f" ({len(ids)} trials, e.g. {ids[0]})"
        what = "matches several trials" if len(rows) > 1 else "is not a trial of this run"
        raise SpecError("--trial", f"{trial!r} {what}{hint}", str(table))
    row = rows.row(0, named=True)
    # Every column between the ids and what-changed is a parameter (target too).
    not_params = {"trial_id", "kind", "sample", *PROVENANCE, *LAST_COLUMNS}
    params = {c: row[c] for c in trials.columns if c not in not_params and not is_task_column(c)}
    if trial_id(row["kind"], params) != row["trial_id"]:  # the id hashes the params: a cheap proof of a faithful read
        print(f"warning: the parameters read back from {table} hash to {trial_id(row['kind'], params)}, not "
              f"{row['trial_id']} (a column changed type?); applying them as read", file=sys.stderr)
    return row, params


@contextmanager
def perturbed(model, kind, params) -> Iterator[dict[str, str]]:
    """Apply `params` of `kind` in place; on exit restore, verify bit for bit, and re-checksum."""
    from sensray.checksum import weights_checksum
    from sensray.perturbations import ParamError

    from sensray.changes import describe

    before = weights_checksum(model)
    try:
        kind.check(model, params)
        undo = kind.apply(model, params)
    except ParamError as err:
        raise SpecError(f"--param {err.param}" if err.param else "--param", str(err)) from None
    report: dict[str, str] = {"changed": "\n".join(describe(undo.provenance(), limit=8))}
    try:
        yield report
    finally:
        undo.restore()
        after = weights_checksum(model)
        if not undo.verify() or after != before:
            raise RestoreError(f"weights differ after restoring the perturbation (checksum {before} -> {after})")
        report["restored"] = f"weights restored and verified bit-exact (model checksum {before} before and after)"


def greedy(model, tokenizer, prompt: str | list[int], max_new_tokens: int, ignore_eos: bool = False) -> str:
    """The greedy continuation of `prompt` (text, or token ids taken as they are; no sampling: deterministic),
    decoded without the prompt. With `ignore_eos`, exactly `max_new_tokens` tokens, none of them end-of-text,
    special ones shown."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    if isinstance(prompt, str):
        encoded = tokenizer(prompt, return_tensors="pt").to(device)
        # Some tokenizers add token_type_ids, which decoder-only models reject.
        batch = {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}
    else:  # ids: an adversarial input is its tokens; its text may encode to others
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # A fresh config: the model's own may ask for sampling (temperature, top_p), which greedy must not inherit.
    # ignore_eos forbids end-of-text until the last token (min_new_tokens): what would it say if it could not stop?
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                              min_new_tokens=max_new_tokens if ignore_eos else 0,
                              pad_token_id=pad[0] if isinstance(pad, list) else pad)
    with torch.no_grad():
        out = model.generate(**batch, generation_config=config)  # (1, prompt + new tokens)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=not ignore_eos)


def compare_texts(left_title: str, left: str, right_title: str, right: str, width: int) -> str:
    """Two texts side by side in columns when `width` allows (>= 90), else one after the other."""
    left, right = _visible(left), _visible(right)
    if width < 90:
        return f"--- {left_title} ---\n{left}\n\n--- {right_title} ---\n{right}"
    col = (width - 3) // 2
    a, b = _wrap(left, col), _wrap(right, col)
    a, b = a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b))
    lines = [f"{left_title:<{col}} │ {right_title}", f"{'─' * col}─┼─{'─' * col}"]
    return "\n".join(lines + [f"{x:<{col}} │ {y}".rstrip() for x, y in zip(a, b)])


def _visible(text: str) -> str:
    """A continuation that is empty or only whitespace (a broken model often gives one) said in words."""
    if not text:  # at least one token was generated: all of them were special (end-of-text, ...)
        return "(no text: the model emitted only special tokens, such as end-of-text)"
    return text if text.strip() else f"(nothing visible: {len(text)} whitespace character{'s' * (len(text) != 1)})"


def _wrap(text: str, width: int) -> list[str]:
    out = []
    for paragraph in text.split("\n"):
        out += textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=False) or [""]
    return [line.replace("\t", " ") for line in out]


def _width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


if __name__ == "__main__":
    sys.exit(main())
