"""Transfer: the inputs an attack found, evaluated under damaged weights (`transfer`).

    sensray adversarial --resume results/adversarial/<run> --transfer results/prune/<run> --trials top:5
    sensray adversarial experiments/adversarial.yaml --transfer data/tiny-wanda50
    transfer("results/adversarial/<run>", ["results/prune/<run>", "data/tiny-wanda50"], trials="spread:8")

A source is a finished sweep run on the same model (its trials are re-applied exactly, by
`Perturbation.apply` with the parameters read back from their rows, one at a time on a replica,
and restored and verified after) or an exported model directory (pruned, quantized, healed: loaded
as it is). Under each weight condition, and under the undamaged model ("baseline"), every attack's
clean and adversarial inputs are measured afresh, success is judged by the attack's own criterion
on that model, and the model's ppl on the spec's `data` gives its damage (delta_ppl = ppl / the
attacked model's). Rows carry the sweep's `trial_id`, so they join to the run's trials.parquet.

Which trials (`--trials`): `top:K` the K most damaging by delta_ppl, `spread:K` K spread evenly over
the range of damage, `all`, or ids (unique prefixes) separated by commas. top/spread/all take trials
that finished with a finite ppl: a model that outputs NaN has no robustness left to measure.
Each condition is journaled (transfer.jsonl) as it lands; a rerun skips the conditions recorded.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sensray.errors import SensrayError, SpecError

GROUP = 2  # conditions per replica in flight between journal writes


@dataclass(frozen=True)
class Condition:
    """One set of weights the found inputs are evaluated under."""

    condition: str  # the journal key: "baseline", "<run dir>#<trial id>", "<model dir>"
    source_kind: str  # baseline | trial | model
    source: str = ""
    trial_id: str | None = None
    kind: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    run_delta_ppl: float | None = None


def parse_selection(text: str) -> tuple[str, Any]:
    """'top:5' -> ('top', 5); 'spread:8'; 'all'; 'id1,id2' -> ('ids', [...])."""
    how, sep, count = text.partition(":")
    if how in ("top", "spread"):
        if not (sep and count.isdigit() and int(count) >= 1):
            raise SpecError("--trials", f"{text!r}: expected {how}:K with K a whole number >= 1")
        return how, int(count)
    if text == "all":
        return "all", None
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids or sep:
        raise SpecError("--trials", f"{text!r}: expected top:K, spread:K, all, or trial ids separated by commas")
    return "ids", ids


def select_rows(rows: list[dict], selection: tuple[str, Any], where: str) -> list[dict]:
    """The rows a selection names, most damaging first for top, by damage for spread, else table order."""
    how, arg = selection
    if how == "ids":
        return [_by_id(rows, wanted, where) for wanted in arg]
    finite = [r for r in rows if r.get("error") is None and _finite(r.get("delta_ppl"))]
    if how == "all":
        return finite
    ranked = sorted(finite, key=lambda r: (r["delta_ppl"], r["trial_id"]), reverse=how == "top")
    if how == "top":
        return ranked[:arg]
    picks = np.unique(np.linspace(0, len(ranked) - 1, min(arg, len(ranked))).round().astype(int)) if ranked else []
    return [ranked[i] for i in picks]


def _by_id(rows: list[dict], wanted: str, where: str) -> dict:
    found = [r for r in rows if r["trial_id"].startswith(wanted)]
    if len(found) != 1:
        what = "matches several trials" if found else "is not a trial"
        raise SpecError("--trials", f"{wanted!r} {what} of {where}")
    return found[0]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and np.isfinite(x)


def trial_params(row: dict, kind) -> dict[str, Any]:
    """A trial's parameters as the sweep ran them: its kind's parameter columns that are set."""
    from sensray.space import trial_id

    params = {name: row[name] for name in kind.Params.model_fields if row.get(name) is not None}
    if trial_id(row["kind"], params) != row["trial_id"]:  # the id hashes the params: proof of a faithful read
        raise SensrayError(f"trial {row['trial_id']}: its parameters read back from the table hash to "
                           f"{trial_id(row['kind'], params)}; the table was changed after the sweep")
    return params


def plan_transfer(spec, sources: list[str], trials: str, meta, tokenizer) -> list[Condition]:
    """Every weight condition of the sources, checked without loading weights (--dry-run runs this)."""
    selection = parse_selection(trials)
    conditions = [Condition("baseline", "baseline")]
    for source in sources:
        path = Path(source)
        if (path / "spec.yaml").is_file():
            conditions += run_conditions(spec, path, selection, meta)
        elif (path / "config.json").is_file():
            check_model_source(spec, path, tokenizer)
            conditions.append(Condition(str(path.resolve()), "model", str(path)))
        else:
            raise SpecError("--transfer", f"{source} is neither a sweep run directory (spec.yaml) nor a model "
                                          "directory (config.json)")
    return conditions


def run_conditions(spec, path: Path, selection, meta) -> list[Condition]:
    """The selected trials of a finished sweep run on the attacked model, checked on its meta model."""
    from sensray.models import resolve_name
    from sensray.perturbations import PERTURBATIONS, ParamError
    from sensray.results import RunDir
    from sensray.spec import load_spec

    run = RunDir.open(path)
    if not run.table.is_file():
        raise SpecError("--transfer", f"{path} has no trials.parquet: the sweep has not finished (--resume it)")
    model = load_spec(path / "spec.yaml").model
    if (resolve_name(model.name), model.dtype) != (resolve_name(spec.model.name), spec.model.dtype):
        raise SpecError("--transfer", f"{path} ran on {model.name} [{model.dtype}], the attack on "
                                      f"{spec.model.name} [{spec.model.dtype}]: its trials are for another model")
    rows = select_rows(run.rows(), selection, str(path))
    if not rows:
        raise SpecError("--trials", f"no finished trial with a finite ppl in {path}")
    out = []
    for row in rows:
        kind = PERTURBATIONS.get(row["kind"])
        params = trial_params(row, kind)
        try:
            kind.check(meta, kind.parse(params))
        except ParamError as err:
            raise SpecError("--transfer", f"trial {row['trial_id']} of {path}: {err}") from None
        out.append(Condition(f"{path.resolve()}#{row['trial_id']}", "trial", str(path), row["trial_id"],
                             row["kind"], params, row.get("delta_ppl")))
    return out


def check_model_source(spec, path: Path, tokenizer) -> None:
    """An exported model: its weights read, and its tokenizer is the attacked model's (ids transfer as ids)."""
    from sensray.models import check_weights, load_tokenizer

    source = spec.model.model_copy(update={"name": str(path), "revision": None})
    try:
        check_weights(source)
        theirs = load_tokenizer(source)
    except SensrayError as err:
        raise SpecError("--transfer", str(err).removeprefix("model.name: ")) from None
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise SpecError("--transfer", f"{path} has another tokenizer than {spec.model.name}: the attack's token "
                                      "ids would mean other text there")


def transfer(attack_dir: str | Path, sources: list[str], trials: str = "top:5", executor: str | None = None,
             address: str | None = None, replicas=None, log: Callable[[str], None] | None = None) -> Path:
    """Evaluate a finished attack's inputs under every condition of `sources`; returns transfer.parquet's path."""
    from sensray.adversarial.plan import make_attack_plan
    from sensray.adversarial.pool import default_executor
    from sensray.adversarial.store import AttackRun

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    run = AttackRun.open(attack_dir)
    if not run.table.is_file():
        raise SensrayError(f"{attack_dir}: the search has not finished (no attacks.parquet); --resume it first")
    spec = run.spec()
    plan = make_attack_plan(spec, cases=run.cases())  # the inputs as attacked, whatever the files say now
    conditions = plan_transfer(spec, sources, trials, plan.meta, _tokenizer(spec))
    done = {r["condition"] for r in run.transfer_rows()}
    todo = [c for c in conditions if c.condition not in done]
    log(f"transfer: {len(conditions)} conditions ({len(conditions) - len(todo)} recorded), "
        f"{len(run.cases())} cases x budgets {spec.attack.budgets}")
    executor = executor or default_executor(spec, address, replicas)
    _evaluate(run, spec, todo, dict(executor=executor, address=address, replicas=replicas), log)
    from sensray.adversarial.damage_report import write_transfer

    return write_transfer(run, spec)


def _tokenizer(spec):
    from sensray.models import load_tokenizer

    return load_tokenizer(spec.model)


def _evaluate(run, spec, todo: list[Condition], options: dict, log) -> None:
    """Measure every condition to do, journaling each as it lands: the attacked model's on its pool, each
    exported model on its own."""
    from sensray.adversarial.pool import open_pool
    from sensray.results import Journal

    items = measure_items(run, spec)
    baseline_ppl = run.baseline()["ppl"]
    with Journal(run.transfer_journal) as journal:
        same = [c for c in todo if c.source_kind != "model"]
        if same:
            with open_pool(spec, **options) as pool:
                _check_same_weights(run, pool)
                _on_pool(pool, same, items, baseline_ppl, journal, log)
        for c in (c for c in todo if c.source_kind == "model"):
            export = spec.model_copy(update={"model": spec.model.model_copy(update={"name": c.source,
                                                                                     "revision": None})})
            with open_pool(export, **options) as pool:
                _on_pool(pool, [c], items, baseline_ppl, journal, log)


def measure_items(run, spec) -> tuple[list[tuple[str, int, int | None]], list]:
    """What every condition measures: each case's clean input, then each attack's adversarial one."""
    import polars as pl

    from sensray.adversarial.attack import problem_of

    problems = {c.index: problem_of(c, spec) for c in run.cases()}
    attacks = pl.read_parquet(run.table).select("attack", "case", "budget", "ids").to_dicts()
    keys = [("clean", case, None) for case in problems] + [(a["attack"], a["case"], a["budget"]) for a in attacks]
    edits = [(p, list(p.clean)) for p in problems.values()] + [(problems[a["case"]], a["ids"]) for a in attacks]
    return keys, edits


def _check_same_weights(run, pool) -> None:
    expected = run.baseline()["checksum_at_load"]
    if pool.baseline.checksum_at_load != expected:
        raise SensrayError(f"the model loaded now (checksum {pool.baseline.checksum_at_load}) is not the one "
                           f"attacked ({expected}): transfer needs the same weights")


def _on_pool(pool, conditions: list[Condition], items, baseline_ppl: float, journal, log) -> None:
    from sensray.adversarial.replica import Work

    keys, edits = items
    for start in range(0, len(conditions), GROUP * pool.replicas):
        group = conditions[start: start + GROUP * pool.replicas]
        works = [Work(f"t-{i}", "transfer", edits=edits, options={"kind": c.kind, "params": c.params})
                 for i, c in enumerate(group)]
        for c, result in zip(group, pool.map(works)):
            row = condition_row(c, keys, result, baseline_ppl)
            journal.append(row)
            log(f"  {c.condition}: ppl x{row['delta_ppl']:.4g}" if row["error"] is None else
                f"  {c.condition}: failed ({row['error']})")


def condition_row(c: Condition, keys, result: dict, baseline_ppl: float) -> dict:
    """The journal row of one condition: what was applied, its damage, and every measured input."""
    measured = [dict(m, attack=k, case=case, budget=b) for (k, case, b), m in zip(keys, result["measured"])]
    ppl = result["ppl"]
    return {"condition": c.condition, "source_kind": c.source_kind, "source": c.source, "trial_id": c.trial_id,
            "kind": c.kind, "params": json.dumps(c.params) if c.params else None, "run_delta_ppl": c.run_delta_ppl,
            "ppl": ppl, "delta_ppl": ppl / baseline_ppl if ppl is not None else None, "error": result["error"],
            "measured": measured}
