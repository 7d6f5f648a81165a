"""A replica: one resident model, its eval batches and baseline, running trials on demand.

    replica = Replica(spec)                 # loads the model once
    row = replica.run_trial(trial)          # perturb in place -> evaluate -> restore exactly

Pure Python with no Ray: executors (local loop, Ray actors) only move trials in and rows out.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import asdict, dataclass, replace

import torch

from sensray.checksum import weights_checksum
from sensray.committed import apply_changes
from sensray.data import batches_text, eval_batches
from sensray.early_stop import RungCheck, rung_batches
from sensray.errors import RestoreError
from sensray.metrics import Scores, evaluate, reference
from sensray.models import load_model, load_tokenizer, pick_device, resolve_name
from sensray.perturbations import PERTURBATIONS
from sensray.prefix import PrefixCache, default_budget
from sensray.quantized.storage import parameter_count
from sensray.results import PROVENANCE, TASK_SECONDS
from sensray.space import Trial
from sensray.spec import ExperimentSpec

METRICS = ("ppl", "nll", "delta_ppl", "kl", "top1_agreement", "nonfinite", "seq_nll")


@dataclass(frozen=True)
class Baseline:
    model: str
    source: str
    dtype: str
    device: str
    parameters: int
    tokens: int
    sequences: int
    nll: float
    ppl: float
    checksum_at_load: str
    vocab_size: int | None = None  # a uniform guess over it scores ppl = vocab_size: the damage ceiling
    seq_nll: tuple[float, ...] | None = None  # per eval sequence, for bootstrap intervals (metrics.Scores)
    tasks: dict | None = None  # lm-eval task scores of the unperturbed model (spec `eval:`)
    quantization: str = "none"  # how the weights are stored (model.quantization and its settings)


class Replica:
    def __init__(self, spec: ExperimentSpec, replica_id: str = "local-0", model=None, tokenizer=None):
        self.spec, self.replica_id = spec, replica_id
        self.committed: list[dict] = []  # changes every trial starts from and restores to (sensray.committed)
        self.device = pick_device(spec.model)
        self.model = model if model is not None else load_model(spec.model, self.device)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.model)
        self.batches = [b.to(self.device) for b in eval_batches(spec.data, tokenizer)]
        self.reference = reference(self.model, self.batches)
        self.prefix = self._record_prefix() if spec.reuse.prefix else None
        partial: dict[int, Scores] = {}  # batches done -> the baseline's scores on them

        def keep_partial(done: int, scores: Scores) -> bool:
            partial[done] = scores
            return False

        scores = evaluate(self.model, self.batches, stop=keep_partial)
        # The baseline ppl on the tokens evaluated so far: a trial stopped early compares like with like.
        self.partial_ppl = {s.tokens: s.ppl for s in partial.values()} | {scores.tokens: scores.ppl}
        if spec.early_stop is not None:
            self.rungs = rung_batches(spec.early_stop.rungs, len(self.batches))
            self.rung_ppls = [partial[n].ppl for n in self.rungs]
        self.baseline = Baseline(
            model=spec.model.name,
            source=resolve_name(spec.model.name),
            dtype=spec.model.dtype,
            device=str(self.device),
            parameters=parameter_count(self.model),
            tokens=scores.tokens,
            sequences=sum(len(b) for b in self.batches),
            nll=scores.nll,
            ppl=scores.ppl,
            checksum_at_load=weights_checksum(self.model),
            vocab_size=self.reference.logits[0].shape[-1],
            seq_nll=scores.seq_nll,
            quantization=spec.model.storage if spec.model.quantization != "none" else "none",
        )
        self.tasks = self._task_scorer(tokenizer) if spec.eval is not None else None
        if self.tasks is not None:
            self.baseline_tasks = self.tasks.score()
            self.baseline = replace(self.baseline, tasks=self.baseline_tasks.columns)

    def run_trial(self, trial: Trial) -> dict:
        """One row of the trial table. A failing trial is recorded with its error, never raised,
        unless the weights could not be restored: then nothing after it could be trusted."""
        start = time.perf_counter()
        error, scores, check, changes, tasks = None, None, None, {}, None
        kind = PERTURBATIONS.get(trial.kind)
        params = kind.parse(trial.params)
        edits = None
        try:
            edits = kind.apply(self.model, params)  # restores what it wrote itself if it fails half-way
            changes = edits.provenance()
            first = self.prefix.start_for(edits) if self.prefix is not None else 0
            check = self._rung_check(trial)
            scores = evaluate(self.model, self.batches, self.reference, self.prefix, first, check)
            tasks = self._tasks(trial, scores, edits)
        except (RuntimeError, ValueError, MemoryError) as err:  # e.g. CUDA OOM: a result, not a crash
            error = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        finally:
            if edits is not None:
                edits.restore()
                if not edits.verify():
                    raise RestoreError(f"trial {trial.trial_id}: weights differ from their originals after restore")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        row = self._row(trial, changes, scores, error, time.perf_counter() - start)
        if check is not None:
            row.update(check.row_fields(), tokens=scores.tokens if scores is not None else None)
        if tasks is not None:
            row.update(tasks.columns, **{TASK_SECONDS: tasks.seconds})
        return row

    def _task_scorer(self, tokenizer):
        from sensray.tasks import TaskScorer

        e = self.spec.eval
        return TaskScorer(self.model, tokenizer, e.tasks, e.limit, e.batch_size, e.bootstrap_iters,
                          batches_text(tokenizer, self.batches))

    def _tasks(self, trial: Trial, scores: Scores, edits):
        """lm-eval task scores of the perturbed model, for a trial the spec selects (not one stopped early).
        A trial that changed nothing has the baseline's scores, without scoring them again."""
        if self.tasks is None or scores.tokens != self.baseline.tokens:
            return None
        if not (trial.tasks or self.spec.eval.selection[0] == "all"):
            return None
        return self.tasks.score() if edits.touches() else self.baseline_tasks

    def _rung_check(self, trial: Trial) -> RungCheck | None:
        if self.spec.early_stop is None:
            return None
        return RungCheck(self.spec.early_stop, self.rungs, self.rung_ppls, trial.bounds)

    def _record_prefix(self) -> PrefixCache:
        max_gb = self.spec.reuse.max_gb
        budget = int(max_gb * 2**30) if max_gb is not None else default_budget(self.device)
        return PrefixCache.record(self.model, self.batches, budget)

    def _row(self, trial: Trial, changes: dict, scores: Scores | None, error: str | None, seconds: float) -> dict:
        metrics = dict.fromkeys(METRICS)
        if scores is not None:
            metrics.update({k: v for k, v in asdict(scores).items() if k in metrics})
            if scores.seq_nll is not None:  # a row is JSON as it stands: the journal reads back what was written
                metrics["seq_nll"] = list(scores.seq_nll)
            baseline_ppl = self.partial_ppl[scores.tokens]  # all tokens, unless early stopping cut the trial short
            metrics["delta_ppl"] = scores.ppl / baseline_ppl if math.isfinite(scores.ppl) else math.inf
        provenance = dict.fromkeys(PROVENANCE) | changes
        return {**trial.config(), **provenance, **metrics, "seconds": seconds, "replica": self.replica_id,
                "error": error}

    def checksum(self) -> str:
        return weights_checksum(self.model)

    def commit(self, changes: list[dict]) -> None:
        """Make `changes` (raw-bit edits recorded like a row's provenance) part of the state every later trial
        starts from and restores to. The baseline and reference stay the loaded model's, so rows keep measuring
        against the clean model; the prefix recordings are retaken (blocks after a change compute otherwise)."""
        apply_changes(self.model, changes)
        self.committed.extend(changes)
        if self.prefix is not None:
            self.prefix = self._record_prefix()
