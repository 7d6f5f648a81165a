"""The attack's replica: a Replica that also ranks candidate flips by gradient and measures utility text.

    factory = AttackFactory(gradient=None, utility={"corpus": "bundled-train", "num_sequences": 8})
    replica = factory(spec.trials(), "local-0")          # what both executors build per replica
    replica.candidates(request)                          # asked by the driver (executor.ask)
    replica.run_trial(trial)                             # + utility_ppl, utility_ratio with a utility text

The factory is a small picklable object: Ray ships it to each actor, which builds the replica there
(so the model never leaves the replica). Candidates are ranked on the replica's committed state, so
whichever replica is asked gives the same ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sensray.data import eval_batches
from sensray.errors import RestoreError
from sensray.metrics import evaluate
from sensray.models import load_tokenizer
from sensray.perturbations import PERTURBATIONS
from sensray.replica import Replica
from sensray.space import Trial
from sensray.spec import DataSpec, ExperimentSpec


class AttackReplica(Replica):
    questions = ("candidates", "utility_baseline")

    def __init__(self, spec: ExperimentSpec, replica_id: str = "local-0", model=None,
                 gradient: DataSpec | None = None, utility: DataSpec | None = None):
        tokenizer = load_tokenizer(spec.model)
        super().__init__(spec, replica_id, model=model, tokenizer=tokenizer)
        self.gradient_batches = self.batches if gradient is None else self._batches(gradient, tokenizer)
        self.utility_batches = None if utility is None else self._batches(utility, tokenizer)
        self.utility_ppl = None if utility is None else evaluate(self.model, self.utility_batches).ppl

    def _batches(self, data: DataSpec, tokenizer) -> list:
        return [b.to(self.device) for b in eval_batches(data, tokenizer)]

    def candidates(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """The flips predicted to raise the attack text's loss most, on the committed state (best first)."""
        from sensray.attack.rank import rank

        return rank(self.model, self.gradient_batches, request)

    def utility_baseline(self) -> float | None:
        return self.utility_ppl

    def run_trial(self, trial: Trial) -> dict:
        row = super().run_trial(trial)
        if self.utility_batches is not None:
            ppl = self._utility(trial) if row["error"] is None else None
            row.update(utility_ppl=ppl, utility_ratio=None if ppl is None else ppl / self.utility_ppl)
        return row

    def _utility(self, trial: Trial) -> float:
        """The trial's ppl on the utility text: applied again, evaluated, restored and verified."""
        kind = PERTURBATIONS.get(trial.kind)
        edits = kind.apply(self.model, kind.parse(trial.params))
        try:
            ppl = evaluate(self.model, self.utility_batches).ppl
        finally:
            edits.restore()
            if not edits.verify():
                raise RestoreError(f"trial {trial.trial_id}: weights differ from their originals after the "
                                   "utility text")
        return ppl if math.isfinite(ppl) else math.inf


@dataclass(frozen=True)
class AttackFactory:
    """Builds an AttackReplica inside each replica (Ray actor or this process). Plain data: it pickles."""

    gradient: dict | None = None  # DataSpec as a mapping
    utility: dict | None = None

    def __call__(self, spec: ExperimentSpec, replica_id: str) -> AttackReplica:
        model = None
        if spec.resources.gpus >= 2:
            from sensray.executors.actor import load_sharded

            model = load_sharded(spec.model)
        return AttackReplica(spec, replica_id, model=model,
                             gradient=None if self.gradient is None else DataSpec.model_validate(self.gradient),
                             utility=None if self.utility is None else DataSpec.model_validate(self.utility))
