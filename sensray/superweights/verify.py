"""Verify candidates as a sweep: zero each one, and as many random or largest weights of its tensor.

    spec = verification_spec(name=..., model=ModelSpec(...), data=DataSpec(...),
                             target="blocks.1.mlp.down.weight", coords=[[2533, 7890]], seeds=8, ...)
    ... sensray's sweep runs it (one run directory, trials.parquet) ...
    verdicts = judge(pl.read_parquet(run / "trials.parquet"), pairs)

One spec per tensor: the space is `coords` (each candidate alone) x `pick` (coords, top, random)
x `seed`, for the `zero` kind. The effect of a trial is its KL divergence from the unperturbed
model's predictions (the sweep's `kl` column, nats per token): it is large whenever the model is
changed, whichever way its perplexity moves. A candidate is
  - `super weight`: outsized, and zeroing it at least doubles perplexity (or makes it non-finite);
  - `outsized`: its KL is >= EFFECT_RATIO x that of every random control, >= that of the
    top-magnitude control and >= MATERIAL_KL, but perplexity less than doubles (a modest effect);
  - `ordinary`: anything else: within the controls, or above them by a negligible amount.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import polars as pl

from sensray.spec import DataSpec, ExperimentSpec, ModelSpec, ResourcesSpec
from sensray.superweights.discovery import Pair

EFFECT_RATIO = 10.0  # a candidate's KL must be this many times the largest random control's
MATERIAL_KL = 0.01  # nats/token: below this the predictions barely move, whatever the ratio to random
DESTRUCTIVE = 2.0  # delta_ppl at which removal counts as destroying the model (the analysis module's catastrophic)


def verification_spec(*, name: str, model: ModelSpec, data: DataSpec, target: str, coords: list[list[int]],
                      seeds: int, output_dir: str, resources: ResourcesSpec, description: str = "") -> ExperimentSpec:
    """The sweep that zeroes each of `coords` (one per trial) and the controls, in `target`."""
    each = [[list(c)] for c in coords]
    space = {
        "target": target,
        "coords": each[0] if len(each) == 1 else {"grid_search": each},
        "pick": {"grid_search": ["coords", "top", "random"]},
        "seed": {"grid_search": list(range(seeds))},
    }
    return ExperimentSpec(name=name, description=description, model=model, data=data, perturbation="zero",
                          space=space, num_samples=1, seed=0, output_dir=output_dir, resources=resources)


@dataclass(frozen=True)
class Effect:
    """One condition's trials: median delta_ppl and KL, their range, and how many went non-finite."""

    n: int
    delta_ppl: float
    delta_min: float
    delta_max: float
    kl: float
    kl_max: float
    nonfinite: int

    @classmethod
    def of(cls, rows: list[dict]) -> "Effect | None":
        if not rows:
            return None
        deltas = [_num(r["delta_ppl"]) for r in rows]
        kls = [max(_num(r["kl"]), 0.0) for r in rows]  # a KL of -1e-12 is rounding, not a gain
        return cls(len(rows), statistics.median(deltas), min(deltas), max(deltas), statistics.median(kls),
                   max(kls), sum(bool(r["nonfinite"]) for r in rows))


@dataclass(frozen=True)
class Verdict:
    pair: Pair
    candidate: Effect | None  # zeroing the pair's weight
    random: Effect | None  # zeroing as many random weights of the tensor, one trial per seed
    top: Effect | None  # zeroing as many of the tensor's largest weights
    verdict: str  # "super weight", "outsized", "ordinary", or "failed"

    @property
    def top_includes_candidate(self) -> bool:
        return self.pair.magnitude_rank < 1  # each candidate is verified alone: top-1


def judge(trials: pl.DataFrame, pairs: list[Pair]) -> list[Verdict]:
    """Compare each pair's trial with its tensor's controls (failed trials are left out)."""
    rows = [r for r in trials.to_dicts() if r["error"] is None]
    out = []
    for pair in pairs:
        mine = [r for r in rows if r["target"] == pair.target]
        # coords and top ignore the seed (their repeats are identical): one row each; random once per seed
        cand = [r for r in mine if r["pick"] == "coords" and r["coords"] == [[pair.row, pair.col]]][:1]
        random = list({r["seed"]: r for r in mine if r["pick"] == "random"}.values())
        top = [r for r in mine if r["pick"] == "top"][:1]
        effects = Effect.of(cand), Effect.of(random), Effect.of(top)
        out.append(Verdict(pair, *effects, verdict=_verdict(*effects)))
    return out


def _verdict(cand: Effect | None, random: Effect | None, top: Effect | None) -> str:
    if cand is None or random is None or top is None:
        return "failed"
    outsized = cand.kl > random.kl_max and cand.kl >= EFFECT_RATIO * random.kl_max and cand.kl >= top.kl
    if not outsized or cand.kl < MATERIAL_KL:
        return "ordinary"
    return "super weight" if cand.nonfinite or cand.delta_ppl >= DESTRUCTIVE else "outsized"


def _num(value) -> float:
    return math.inf if value is None else float(value)
