"""lm-eval tasks scored on a resident model, as it is right now (perturbed or not).

    scorer = TaskScorer(model, tokenizer, ["sensray-pydoc-choice"], limit=50)   # once per replica
    result = scorer.score()        # after each perturbation: columns, per-document samples, seconds
    result.columns                 # {"sensray-pydoc-choice/acc": 0.98, "sensray-pydoc-choice/acc_stderr": 0.012}

lm-eval's `HFLM` wraps the live model object and tokenizer (never a copy, never reloaded), and
the tasks (datasets, prompts) are loaded once; each `score()` runs lm-eval's own evaluator on
whatever the weights are at that moment. Three things keep the answers those of the current
weights: lm-eval's response cache is never used (it would answer from before the perturbation),
the model is put in eval mode before every evaluation (HFLM does it only when it is built, and a
model left in train mode evaluates with dropout without any sign of it), and nothing is reused
between calls but the task definitions. Prefix reuse does not apply: task inputs are not the
eval windows whose block outputs were recorded, so every task request runs the full forward.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from sensray.tasks.catalog import Catalog

FILTER = "none"  # lm-eval's name for "no filter": the only one likelihood tasks have


@dataclass(frozen=True)
class TaskResult:
    columns: dict[str, float | None]  # "<task>/<metric>" and "<task>/<metric>_stderr"
    samples: dict[str, list[dict[str, Any]]]  # per task: doc_id, target, per-document metrics, responses
    seconds: float


class TaskScorer:
    def __init__(self, model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                 bootstrap_iters: int = 1000, data_text: str | None = None, key: str = "eval.tasks"):
        # lm-eval bootstraps some stderrs in a process pool of one worker per core; inside a replica
        # (a Ray actor, a core or two) that is a fork storm per trial. In-process is exact and enough.
        os.environ.setdefault("DISABLE_MULTIPROC", "1")
        catalog = Catalog(tasks, data_text)
        catalog.check(key)
        with quiet():
            self.tasks = catalog.load(key)
            from lm_eval.models.huggingface import HFLM

            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.model, self.limit, self.bootstrap_iters = model, limit, bootstrap_iters

    def score(self) -> TaskResult:
        """Every task on the model as it is now."""
        from lm_eval import evaluator

        self.model.eval()
        start = time.perf_counter()
        with quiet():
            out = evaluator.evaluate(lm=self.lm, task_dict=self.tasks, limit=self.limit,
                                     bootstrap_iters=self.bootstrap_iters, log_samples=True)
        seconds = time.perf_counter() - start
        logged = out.get("samples", {})
        found = columns(out["results"]) | self._token_perplexities(logged)
        order = list(out["results"])  # each task's columns together, in lm-eval's order
        ranked = sorted(found.items(), key=lambda kv: order.index(kv[0].split("/")[0]))
        return TaskResult(dict(ranked), samples(logged), seconds)

    def _token_perplexities(self, logged: dict[str, list[dict]]) -> dict[str, float]:
        """`<task>/token_perplexity` of every rolling task: exp(-sum of lm-eval's per-document
        loglikelihoods / their token count), the unit sensray's own ppl is in (lm-eval reports per
        word and per byte). Every token of a document is scored (the first given lm-eval's prefix token)."""
        out = {}
        for task, rows in logged.items():
            if self.tasks["tasks"][task].OUTPUT_TYPE != "loglikelihood_rolling" or not rows:
                continue
            nll = -math.fsum(float(row["filtered_resps"][0]) for row in rows)
            tokens = sum(len(self.lm.tok_encode(row["target"])) for row in rows)
            out[f"{task}/token_perplexity"] = math.exp(nll / tokens) if nll / tokens < 709 else math.inf
        return out


def columns(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """lm-eval's results {task: {"acc,none": 0.9, "acc_stderr,none": 0.01, ...}} as flat row columns.

    A metric under a filter other than "none" keeps it (`task/exact_match@strict-match`); a stderr
    lm-eval could not compute ("N/A") is None; `<task>/n` is how many documents were scored."""
    out: dict[str, float | None] = {}
    for task, metrics in results.items():
        if isinstance(metrics.get("sample_len"), int):
            out[f"{task}/n"] = metrics["sample_len"]
        for name, value in metrics.items():
            metric, sep, filter_ = name.partition(",")
            if not sep:
                continue  # "alias", "name", "sample_len": labels, not metrics
            column = f"{task}/{metric}" if filter_ == FILTER else f"{task}/{metric}@{filter_}"
            out[column] = _number(value)
    return out


def samples(logged: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per task, what each document scored: its id, target (a rolling task's is the document itself:
    left out), the model's responses and the per-document metrics."""
    def one(s: dict) -> dict:
        kept = {"doc_id": s["doc_id"], "filtered_resps": s["filtered_resps"]}
        if not isinstance(s.get("target"), str) or len(s["target"]) <= 200:
            kept["target"] = s.get("target")
        return kept | {m: s[m] for m in s.get("metrics", [])}

    return {task: [one(s) for s in rows] for task, rows in logged.items()}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # "N/A", or a label
    return float(value)


@contextlib.contextmanager
def quiet():
    """lm-eval's per-call chatter off (progress bars, INFO lines, and whatever else it prints to
    stderr meanwhile): a sweep calls it once per trial. Its errors still raise."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm writes its bars to sys.stderr
            yield
    finally:
        logger.setLevel(level)
