"""A replica: one resident model, its eval batches and baseline, running trials on demand.

    replica = Replica(spec)                 # loads the model once
    row = replica.run_trial(trial)          # perturb in place -> evaluate -> restore exactly

Pure Python with no Ray: executors (local loop, Ray actors) only move trials in and rows out.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from sensray.checksum import weights_checksum
from sensray.data import eval_batches
from sensray.errors import RestoreError
from sensray.metrics import Scores, evaluate, reference
from sensray.models import load_model, load_tokenizer, pick_device, resolve_name
from sensray.perturbations import PERTURBATIONS
from sensray.space import Trial
from sensray.spec import ExperimentSpec

METRICS = ("ppl", "nll", "delta_ppl", "kl", "top1_agreement", "nonfinite")


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


class Replica:
    def __init__(self, spec: ExperimentSpec, replica_id: str = "local-0", model=None, tokenizer=None):
        self.spec, self.replica_id = spec, replica_id
        self.device = pick_device(spec.model)
        self.model = model if model is not None else load_model(spec.model, self.device)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.model)
        self.batches = [b.to(self.device) for b in eval_batches(spec.data, tokenizer)]
        self.reference = reference(self.model, self.batches)
        scores = evaluate(self.model, self.batches)
        self.baseline = Baseline(
            model=spec.model.name,
            source=resolve_name(spec.model.name),
            dtype=spec.model.dtype,
            device=str(self.device),
            parameters=sum(p.numel() for p in self.model.parameters()),
            tokens=scores.tokens,
            sequences=sum(len(b) for b in self.batches),
            nll=scores.nll,
            ppl=scores.ppl,
            checksum_at_load=weights_checksum(self.model),
        )

    def run_trial(self, trial: Trial) -> dict:
        """One row of the trial table. A failing trial is recorded with its error, never raised,
        unless the weights could not be restored: then nothing after it could be trusted."""
        start = time.perf_counter()
        error, scores = None, None
        kind = PERTURBATIONS.get(trial.kind)
        params = kind.parse(trial.params)
        undo = None
        try:
            undo = kind.apply(self.model, params)
            scores = evaluate(self.model, self.batches, self.reference)
        except (RuntimeError, ValueError, MemoryError) as err:  # e.g. CUDA OOM: a result, not a crash
            error = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        finally:
            if undo is not None:
                undo.restore()
                if not undo.verify():
                    raise RestoreError(f"trial {trial.trial_id}: weights differ from their originals after restore")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return self._row(trial, scores, error, time.perf_counter() - start)

    def _row(self, trial: Trial, scores: Scores | None, error: str | None, seconds: float) -> dict:
        metrics = dict.fromkeys(METRICS)
        if scores is not None:
            metrics.update({k: v for k, v in asdict(scores).items() if k in metrics})
            metrics["delta_ppl"] = scores.ppl / self.baseline.ppl if math.isfinite(scores.ppl) else math.inf
        return {**trial.config(), **metrics, "seconds": seconds, "replica": self.replica_id, "error": error}

    def checksum(self) -> str:
        return weights_checksum(self.model)
