"""Early stopping for worst-case hunts: successive halving against the current top-k.

    early_stop: {top_k: 10, rungs: [0.25, 0.5], metric: delta_ppl, mode: max}

A trial is evaluated batch by batch. At each rung (a fraction of the eval batches) its partial
score (the metric on the batches so far) is compared with a bound: the weakest partial score, at
that same rung, of any trial now in the top-k by final score. A trial below the bound stops
there: every trial now in the top-k looked at least that damaging at this point. Until k trials
have finished in full there are no bounds and nothing stops.

This is ASHA's rule (compare each trial with the others' results at the same rung, as they
arrive, never waiting for a rung to fill) with the promotion quantile replaced by "could it still
be in the top-k": the study wants the k worst perturbations exactly, not a ranking of the rest.
It is a heuristic, like every successive-halving scheduler: a trial whose damage shows only in
the last batches can be stopped. `benchmarks/early_stopping.py` checks the top-k against the
exhaustive one and counts the token evaluations saved.

Roles: the driver keeps the `Board` (fed every finished row, in the journal order, so `--resume`
rebuilds it from the journal) and stamps each trial with the current bounds as it is dispatched
(`EarlyStopFeed`); the replica evaluates with a `RungCheck`, which stops the trial and records
its partial scores. A trial keeps the bounds it was dispatched with. Bounds mostly rise as trials
finish, but fall when a trial that looked mild at a rung and finished worst joins the top-k: a
trial sent earlier is then judged against the top-k of a moment before, as in ASHA, whose rungs
also fill while other trials run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from sensray.errors import SpecError
from sensray.metrics import Scores
from sensray.space import Trial
from sensray.spec import EarlyStopSpec


def rung_batches(rungs: list[float], num_batches: int) -> list[int]:
    """After how many batches each rung is checked; every rung must fall before the last batch."""
    counts = [max(1, math.floor(fraction * num_batches)) for fraction in rungs]
    if counts[-1] >= num_batches or len(set(counts)) != len(counts):
        raise SpecError(
            "early_stop.rungs",
            f"rungs {rungs} need distinct batch boundaries before the last of the {num_batches} eval batches "
            "(lower data.batch_size so there are more batches)",
        )
    return counts


def score(spec: EarlyStopSpec, scores: Scores, baseline_ppl: float) -> float:
    """The metric of (partial) scores, signed so that larger is always more damaging."""
    value = {
        "ppl": scores.ppl,
        "nll": scores.nll,
        "delta_ppl": scores.ppl / baseline_ppl if math.isfinite(scores.ppl) else math.inf,
        "kl": scores.kl,
        "top1_agreement": scores.top1_agreement,
    }[spec.metric]
    return value if spec.mode == "max" else -value


class RungCheck:
    """The replica's side for one trial: called after every batch, says whether to stop."""

    def __init__(self, spec: EarlyStopSpec, rungs: list[int], baseline_ppls: list[float], bounds):
        self.spec, self.rungs, self.baseline_ppls = spec, rungs, baseline_ppls
        self.bounds = bounds or (None,) * len(rungs)
        self.scores: list[float] = []  # the partial score at each rung reached
        self.stopped_rung: int | None = None

    def __call__(self, batches_done: int, partial: Scores) -> bool:
        if batches_done not in self.rungs:
            return False
        rung = self.rungs.index(batches_done)
        value = score(self.spec, partial, self.baseline_ppls[rung])
        self.scores.append(value)
        bound = self.bounds[rung]
        if bound is not None and value < bound:
            self.stopped_rung = rung
            return True
        return False

    def row_fields(self) -> dict:
        return {"rung_scores": self.scores, "stopped_rung": self.stopped_rung}


class Board:
    """The driver's side: finished trials' final and rung scores, and the bounds they set."""

    def __init__(self, spec: EarlyStopSpec, baseline_ppl: float):
        self.spec, self.baseline_ppl = spec, baseline_ppl
        self.complete: list[tuple[float, str, list[float]]] = []  # (final score, trial id, rung scores)

    def tell(self, row: dict) -> None:
        if row.get("error") is not None or row.get("stopped_rung") is not None or row.get("rung_scores") is None:
            return
        final = score(self.spec, _scores_of(row), self.baseline_ppl)
        if math.isnan(final):
            return
        self.complete.append((final, row["trial_id"], list(row["rung_scores"])))

    def top(self) -> list[tuple[float, str, list[float]]]:
        """The current top-k by final score (ties broken by trial id, so the choice is stable)."""
        return sorted(self.complete, key=lambda entry: (-entry[0], entry[1]))[: self.spec.top_k]

    def bounds(self) -> tuple[float | None, ...]:
        top = self.top()
        if len(top) < self.spec.top_k:
            return (None,) * len(self.spec.rungs)
        return tuple(min(rungs[r] for _, _, rungs in top) for r in range(len(self.spec.rungs)))


def _scores_of(row: dict) -> Scores:
    return Scores(nll=row["nll"], ppl=row["ppl"], kl=row["kl"], top1_agreement=row["top1_agreement"],
                  nonfinite=row["nonfinite"], tokens=row.get("tokens") or 0)


class EarlyStopFeed:
    """Any feed (a plan's trials or a search), each trial stamped with the board's bounds."""

    def __init__(self, feed, board: Board, done_rows: list[dict] = ()):
        self.feed, self.board = feed, board
        for row in done_rows:
            board.tell(row)

    def poll(self) -> Trial | None:
        trial = self.feed.poll()
        return None if trial is None else dataclasses.replace(trial, bounds=self.board.bounds())

    def finished(self) -> bool:
        return self.feed.finished()

    def __len__(self) -> int:
        return len(self.feed)

    def tell(self, row: dict) -> None:
        self.board.tell(row)
        if hasattr(self.feed, "tell"):
            self.feed.tell(row)

    def __iter__(self) -> Iterator[Trial]:
        while not self.finished():
            trial = self.poll()
            if trial is None:
                return
            yield trial


def savings(rows: list[dict], tokens_per_trial: int) -> tuple[int, int]:
    """(token evaluations spent, token evaluations a full evaluation of every trial would spend)."""
    spent = sum(row.get("tokens") or tokens_per_trial for row in rows if row.get("error") is None)
    return spent, tokens_per_trial * sum(row.get("error") is None for row in rows)
