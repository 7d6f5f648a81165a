"""The `evaluate` stage: every listed model measured on the study's eval text, against the dense model.

    - {name: evaluation, kind: evaluate, models: [dense, pruned-uniform, healed-lora]}

Written as a run directory (spec.yaml, baseline.json, trials.parquet), one row per model, so
`sensray analyze` and the study's report read it like a sweep's: the baseline is the study's own
(dense) model through a Replica, and each model's row holds sensray's perplexity, exact KL and
top-1 agreement against the dense model's predictions on the same token windows (metrics.py),
and the sparsity counted in its weights. One model is resident at a time (with the dense model's
reference predictions), so a 7B study evaluates on one GPU; with `executor: ray` the stage runs as
a Ray task on a GPU node. `tasks:` adds lm-eval task scores (sensray.tasks) to each model's row,
scored on that model as it is resident (columns `<task>/<metric>`, as in a sweep's rows).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from pydantic import Field

from sensray.errors import SpecError
from sensray.spec import DataSpec, Frozen, ModelSpec
from sensray.study.stages import DENSE, Stage, StageContext, StageResult, register


class EvaluateParams(Frozen):
    models: list[str] = Field(min_length=1, description="earlier stages that make models, or dense")
    tasks: list[str] = Field([], description="lm-eval tasks scored on every model (sensray list: sensray evaluate "
                                             "--list-tasks); none: perplexity, KL and top-1 only")
    limit: Optional[int] = Field(None, ge=1, description="at most this many documents per task")


@register
class Evaluate(Stage):
    kind, produces = "evaluate", "evaluation"
    summary = "ppl, KL and top-1 agreement of each model against the dense model (a run directory)"
    Params = EvaluateParams
    needs = {"models": ("model",)}
    uses_eval = True

    def check(self, ctx: StageContext) -> None:
        if self.params.tasks:  # names, output types and data, before any stage runs
            from sensray.tasks import Catalog

            Catalog(self.params.tasks).check(f"{self.key}.tasks")
        names = self.params.models
        if len(set(names)) != len(names):
            raise SpecError(f"{self.key}.models", f"lists a model twice: {names}")

    def run(self, ctx: StageContext) -> StageResult:
        sources = {name: ctx.model_name(name) for name in self.params.models}
        kinds = {name: "dense" if name == DENSE else ctx.stage_named(name).kind for name in self.params.models}
        rows = ctx.on_cluster(evaluate_models, ctx.spec.model.model_dump(), ctx.spec.eval.model_dump(), sources,
                              kinds, str(ctx.dir), self.params.tasks, self.params.limit)
        summary = {row["target"]: {k: row[k] for k in ("ppl", "kl", "top1_agreement", "sparsity")} for row in rows}
        return StageResult(ctx.dir, summary, None)


@dataclass(frozen=True)
class Scoring:
    """The lm-eval tasks scored on every model (none: the metrics only), with the tokenizer every model shares
    (_measure checks it) and the eval windows' text that `sensray-data-ppl` reads: both made once per stage."""

    tasks: list[str]
    limit: int | None
    tokenizer: Any = None
    text: str | None = None


def evaluate_models(model: dict, data: dict, sources: dict[str, str], kinds: dict[str, str], out: str,
                    tasks: list[str] = (), limit: int | None = None) -> list[dict]:
    """Measure every model in `sources` (label -> name or path) against `model`, with the lm-eval `tasks`
    scored on each; write the run directory."""
    from sensray.replica import Replica
    from sensray.results import RunDir
    from sensray.spec import ExperimentSpec

    dense_spec, data_spec, out = ModelSpec(**model), DataSpec(**data), Path(out)
    spec = ExperimentSpec(name=out.name, model=dense_spec, data=data_spec, perturbation="zero", space={},
                          reuse={"prefix": False}, output_dir=str(out.parent))
    replica = Replica(spec)
    scoring = Scoring(list(tasks), limit)
    if scoring.tasks:
        from sensray.data import batches_text
        from sensray.models import load_tokenizer

        tokenizer = load_tokenizer(dense_spec)
        scoring = Scoring(scoring.tasks, limit, tokenizer, batches_text(tokenizer, replica.batches))
    rows = {DENSE: _row(DENSE, dense_spec.name, kinds.get(DENSE, "dense"), replica, replica.model, scoring)}
    replica.model = None  # only the reference predictions are needed from here on: one model resident at a time
    for label, source in sources.items():
        if label != DENSE:
            rows[label] = _measure(label, source, kinds[label], replica, dense_spec, scoring)
    ordered = [rows[label] for label in sources]
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.resolved() | {"models": sources}, sort_keys=False),
                                   encoding="utf-8")
    run = RunDir(out)
    run.write_baseline(asdict(replica.baseline))
    run.finish(ordered)
    return ordered


def _measure(label: str, source: str, kind: str, replica, dense: ModelSpec, scoring: Scoring) -> dict[str, Any]:
    """One model's row; a model whose tokenizer cuts the eval text differently is an error row (no KL)."""
    from sensray.data import eval_batches
    from sensray.models import load_model, load_tokenizer

    start = time.perf_counter()
    spec = dense.model_copy(update={"name": source})
    batches = eval_batches(replica.spec.data, load_tokenizer(spec))
    if len(batches) != len(replica.batches) or not all(torch.equal(a.cpu(), b.cpu())
                                                       for a, b in zip(batches, replica.batches)):
        error = f"its tokenizer splits the eval text differently from {dense.name}'s: KL is undefined"
        return _row(label, source, kind, replica, None, scoring, error, start)
    model = load_model(spec, replica.device)
    try:
        return _row(label, source, kind, replica, model, scoring, None, start)
    finally:
        del model
        if replica.device.type == "cuda":
            torch.cuda.empty_cache()


def _row(label: str, source: str, kind: str, replica, model, scoring: Scoring, error: str | None = None,
         start: float | None = None) -> dict[str, Any]:
    from sensray.metrics import evaluate

    start = time.perf_counter() if start is None else start
    row = {"trial_id": label, "kind": "evaluate", "sample": 0, "target": label, "model": source, "stage_kind": kind,
           "sparsity": None, "tokens": None, "ppl": None, "nll": None, "delta_ppl": None, "kl": None,
           "top1_agreement": None, "nonfinite": None}
    if model is not None:
        scores = evaluate(model, replica.batches, replica.reference)
        row |= {"ppl": scores.ppl, "nll": scores.nll, "delta_ppl": scores.ppl / replica.baseline.ppl,
                "kl": scores.kl, "top1_agreement": scores.top1_agreement, "nonfinite": scores.nonfinite,
                "tokens": scores.tokens, "sparsity": _sparsity(model)}
        row |= _task_columns(model, scoring)
    return row | {"seconds": time.perf_counter() - start, "replica": "local-0", "error": error}


def _task_columns(model, scoring: Scoring) -> dict[str, Any]:
    """lm-eval scores of `model` on the stage's tasks (nothing when it lists none)."""
    if not scoring.tasks:
        return {}
    from sensray.results import TASK_SECONDS
    from sensray.tasks import TaskScorer

    result = TaskScorer(model, scoring.tokenizer, scoring.tasks, scoring.limit, data_text=scoring.text).score()
    return result.columns | {TASK_SECONDS: result.seconds}


def _sparsity(model) -> float:
    """Share of exact zeros over every weight matrix of the decoder blocks."""
    from sensray.heal.masks import achieved, block_matrices

    return achieved(model, [param for _, param in block_matrices(model)])["overall"]


def read_evaluation(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, baseline) of an evaluation run directory."""
    import polars as pl

    rows = pl.read_parquet(path / "trials.parquet").to_dicts()
    return rows, json.loads((path / "baseline.json").read_text(encoding="utf-8"))
