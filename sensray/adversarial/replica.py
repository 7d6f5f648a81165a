"""The attack's replica: one resident model answering work items (gradients, candidate losses, transfer).

    replica = AttackReplica(spec)                      # loads the model once, measures its ppl on spec.data
    replica.run_trial(Work("g-0", "gradient", problem, edit))   -> {"trial_id": "g-0", "result": (E, V) tensor}

It has the shape sweeps' replicas have (`run_trial(item) -> row`, `checksum()`, a `baseline`
dataclass), so the Ray executor's pool runs it unchanged: `sensray.adversarial.pool` hands
`build_replica` to `RayExecutor(replica_factory=...)` and feeds it `Work` items instead of trials.
A `transfer` item applies one weight trial exactly (`Perturbation.apply` with the row's parameters),
measures the adversarial inputs and the eval text under it, and restores and verifies the weights.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from sensray.adversarial.objective import Problem, Scorer
from sensray.errors import RestoreError


@dataclass(frozen=True)
class Work:
    """One item for a replica. `trial_id` is unique within a batch (the pool joins results by it)."""

    trial_id: str
    op: str  # losses | gradient | measure | generate | transfer
    problem: Problem | None = None
    edits: Any = None  # (B, E) or (E,) token ids; transfer: [(problem, edit), ...]; generate: [ids, ...]
    options: dict = field(default_factory=dict)  # transfer: kind, params; generate: max_new_tokens

    def config(self) -> dict:
        """What a row says about its item (the Ray pool's row for a replica that died running it)."""
        return {"trial_id": self.trial_id, "kind": self.op}


@dataclass(frozen=True)
class AttackBaseline:
    model: str
    source: str
    dtype: str
    device: str
    parameters: int
    checksum_at_load: str
    nll: float  # on spec.data: what transfer compares a damaged model's ppl with
    ppl: float
    tokens: int


class AttackReplica:
    def __init__(self, spec, replica_id: str = "local-0", model=None, tokenizer=None):
        from sensray.checksum import weights_checksum
        from sensray.data import eval_batches
        from sensray.metrics import evaluate
        from sensray.models import load_model, load_tokenizer, pick_device, resolve_name

        self.spec, self.replica_id = spec, replica_id
        self.device = pick_device(spec.model)
        self.model = model if model is not None else load_model(spec.model, self.device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.model)
        self.scorer = Scorer(self.model, spec.attack.batch_size)
        self.batches = [b.to(self.device) for b in eval_batches(spec.data, self.tokenizer)]
        scores = evaluate(self.model, self.batches)
        self.baseline = AttackBaseline(
            model=spec.model.name, source=resolve_name(spec.model.name), dtype=spec.model.dtype,
            device=str(self.device), parameters=sum(p.numel() for p in self.model.parameters()),
            checksum_at_load=weights_checksum(self.model), nll=scores.nll, ppl=scores.ppl, tokens=scores.tokens)

    def run_trial(self, work: Work) -> dict:
        start = time.perf_counter()
        result = getattr(self, f"_{work.op}")(work)
        return {"trial_id": work.trial_id, "result": result, "seconds": time.perf_counter() - start,
                "replica": self.replica_id, "error": None}

    def checksum(self) -> str:
        from sensray.checksum import weights_checksum

        return weights_checksum(self.model)

    def _losses(self, work: Work) -> torch.Tensor:
        return self.scorer.losses(work.problem, torch.as_tensor(work.edits, dtype=torch.long))

    def _gradient(self, work: Work) -> torch.Tensor:
        return self.scorer.gradient(work.problem, torch.as_tensor(work.edits, dtype=torch.long))

    def _measure(self, work: Work) -> list[dict]:
        """Each (problem, edit) of the item measured in full."""
        return [self.scorer.measure(p, torch.as_tensor(e, dtype=torch.long)) for p, e in work.edits]

    def _generate(self, work: Work) -> list[str]:
        from sensray.generate import greedy

        n, ignore_eos = work.options["max_new_tokens"], work.options.get("ignore_eos", False)
        return [greedy(self.model, self.tokenizer, list(ids), n, ignore_eos) for ids in work.edits]

    def _transfer(self, work: Work) -> dict:
        """Apply one weight trial (kind None: none), measure every (problem, edit) and the eval text's ppl,
        restore exactly."""
        from sensray.metrics import evaluate
        from sensray.perturbations import PERTURBATIONS

        kind = PERTURBATIONS.get(work.options["kind"]) if work.options["kind"] is not None else None
        edits, measured, ppl, error = None, [], None, None
        try:
            if kind is not None:  # None: the undamaged model
                edits = kind.apply(self.model, kind.parse(work.options["params"]))
            self.scorer = Scorer(self.model, self.spec.attack.batch_size)  # clean log-probs change with the weights
            measured = self._measure(work)
            ppl = evaluate(self.model, self.batches).ppl
        except (RuntimeError, ValueError, MemoryError) as err:  # e.g. CUDA OOM: a result, not a crash
            error = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        finally:
            self.scorer = Scorer(self.model, self.spec.attack.batch_size)
            if edits is not None:
                edits.restore()
                if not edits.verify():
                    raise RestoreError(f"transfer of trial {work.trial_id}: weights differ from their originals "
                                       "after restore")
        return {"measured": measured, "ppl": ppl, "error": error}


def build_replica(spec_json: dict, _pool_spec, replica_id: str) -> AttackReplica:
    """The Ray pool's replica factory (bound to the adversarial spec with functools.partial)."""
    from sensray.adversarial.spec import AdversarialSpec
    from sensray.spec import validate

    return AttackReplica(validate(spec_json, AdversarialSpec), replica_id)
