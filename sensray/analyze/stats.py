"""Intervals that match the design: a bootstrap over eval sequences (and over random draws).

    from sensray.analyze import stats
    seq = stats.Sequences.of(run.trials, run.baseline)   # None when the run recorded no per-sequence NLLs
    seq.baseline()                                       # (ppl, low, high): the eval set's own uncertainty
    seq.cells(trials, by=["target", "field"], random=True)   # 95% intervals of each cell's median
    seq.trials(trials)                                   # 95% interval of each trial's ppl / baseline

Why sequences: the eval text is a sample. Perplexity on 16 sequences of 128 tokens moves by several
percent from one such sample to the next, so the baseline itself gets an interval, and a change of
×1.00002 is read against it. A trial is compared with the baseline on the *same* resampled sequences
(paired), so the interval of its ratio is narrow when every sequence moves the same way and spans 1
when the change cannot be told apart from the baseline on this much text.

Why draws too: a cell of a random design (a seed picks the element, the bit, the noise) holds one
trial per draw, independent since draws are keyed by seed and target. Resampling the draws along with
the sequences gives the interval of the cell's median over both sources of chance. A census (one
ablation per component, a pruning grid) has no draws: only the sequences are resampled.

Every resample uses multinomial weights over sequences (a matrix product, not an index per token), so a
100k-trial run costs seconds. The generator is seeded: the same run always gives the same intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl

RESAMPLES = 1000
LEVEL = 0.95
CHUNK = 4096  # trials per block of the per-trial bootstrap: (CHUNK, RESAMPLES) float64 is 32 MiB


@dataclass(frozen=True)
class Sequences:
    """The baseline's per-sequence NLLs and a seeded resampling of the sequences."""

    base: np.ndarray  # (S,) mean NLL per eval sequence, nats/token
    weights: np.ndarray  # (RESAMPLES, S): each resample's share of every sequence (rows sum to 1)

    @classmethod
    def of(cls, trials: pl.DataFrame, baseline: dict, resamples: int = RESAMPLES) -> "Sequences | None":
        """None when the run predates per-sequence NLLs (no `seq_nll` in baseline.json or the table)."""
        base = baseline.get("seq_nll")
        if not base or "seq_nll" not in trials.columns or len(base) < 2:
            return None
        base = np.asarray(base, dtype=float)
        rng = np.random.default_rng(0)
        counts = rng.multinomial(len(base), np.full(len(base), 1 / len(base)), size=resamples)
        return cls(base, counts / len(base))

    @property
    def count(self) -> int:
        return len(self.base)

    def baseline(self) -> tuple[float, float, float]:
        """The baseline perplexity and its 95% interval over resampled eval sequences."""
        return math.exp(self.base.mean()), *_quantiles(np.exp(self.weights @ self.base))

    def matrix(self, trials: pl.DataFrame) -> np.ndarray:
        """(trials, S) per-sequence NLLs: +inf for a non-finite trial, NaN where not recorded in full
        (a failed trial, or one stopped early on fewer sequences)."""
        out = np.full((len(trials), self.count), np.nan)
        nonfinite = trials["nonfinite"].fill_null(False).to_numpy()
        for i, row in enumerate(trials["seq_nll"].to_list()):
            if nonfinite[i]:
                out[i] = np.inf
            elif row is not None and len(row) == self.count:
                out[i] = row
        return out

    def log_ratios(self, matrix: np.ndarray) -> np.ndarray:
        """(trials, RESAMPLES): log(ppl / baseline ppl) of every trial on every resample, paired."""
        finite = np.isfinite(matrix).all(axis=1)
        out = np.where(np.isnan(matrix).any(axis=1), np.nan, np.inf)[:, None].repeat(len(self.weights), axis=1)
        out[finite] = matrix[finite] @ self.weights.T - self.weights @ self.base
        return out

    def trials(self, trials: pl.DataFrame) -> pl.DataFrame:
        """Per trial: `ratio_low`, `ratio_high`, the 95% interval of its ppl / baseline ppl."""
        low, high = np.full(len(trials), np.nan), np.full(len(trials), np.nan)
        for start in range(0, len(trials), CHUNK):
            part = self.log_ratios(self.matrix(trials.slice(start, CHUNK)))
            # exp is monotone and the quantiles pick resamples (no interpolation): take them on the logs
            low[start: start + len(part)], high[start: start + len(part)] = np.exp(_quantiles(part, axis=1))
        return pl.DataFrame({"ratio_low": low, "ratio_high": high}, nan_to_null=True)

    def cells(self, trials: pl.DataFrame, by: Sequence[str], random: bool) -> pl.DataFrame:
        """Per group of `by`: 95% intervals of the median ppl / baseline (`median_low`, `median_high`) and
        of the median perplexity itself (`ppl_low`, `ppl_high`); null where a trial lacks its NLLs."""
        rows = []
        draw = np.random.default_rng(1)
        for keys, part in trials.group_by(list(by), maintain_order=True):
            part = part.filter(pl.col("error").is_null())
            ratios = self.log_ratios(self.matrix(part)) if len(part) else np.full((0, 1), np.nan)
            rows.append(dict(zip(by, keys)) | _cell(ratios, self.weights @ self.base, random, draw))
        schema = {**{k: trials.schema[k] for k in by}, **dict.fromkeys(_CELL, pl.Float64)}
        return pl.DataFrame(rows, schema=schema).fill_nan(None)


    def versus(self, a: pl.DataFrame, b: pl.DataFrame) -> tuple[float, float, float] | None:
        """Trial `a` against trial `b` on the same resampled sequences: the ratio ppl_a / ppl_b and its 95%
        interval (paired, so much narrower than the two trials' own intervals); None unless each is one
        finished trial with its per-sequence NLLs."""
        if len(a) != 1 or len(b) != 1:
            return None
        matrix = self.matrix(pl.concat([a.select("seq_nll", "nonfinite"), b.select("seq_nll", "nonfinite")]))
        if not np.isfinite(matrix).all():
            return None
        diff = (matrix[0] - matrix[1]) @ self.weights.T
        return math.exp(matrix[0].mean() - matrix[1].mean()), *_quantiles(np.exp(diff))


_CELL = ("median_low", "median_high", "ppl_low", "ppl_high")


def _cell(log_ratios: np.ndarray, base: np.ndarray, random: bool, draw: np.random.Generator) -> dict:
    """The intervals of one cell from its trials' paired log ratios (trials, resamples)."""
    if len(log_ratios) == 0 or np.isnan(log_ratios).any():
        return dict.fromkeys(_CELL)
    trials, resamples = log_ratios.shape
    if random and trials > 1:  # resample the draws too: which trials make up each replicate's cell
        picks = draw.integers(0, trials, size=(trials, resamples))
        log_ratios = np.take_along_axis(log_ratios, picks, axis=0)
    with np.errstate(invalid="ignore"):  # inf - inf never occurs: base is finite
        ratio = np.median(np.exp(log_ratios), axis=0)
        ppl = np.median(np.exp(log_ratios + base), axis=0)
    return dict(zip(_CELL, (*_quantiles(ratio), *_quantiles(ppl))))


def _quantiles(values: np.ndarray, axis: int | None = None) -> tuple:
    """The central 95% of resampled values (percentile bootstrap); inf stays inf."""
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(values, [tail, 1 - tail], axis=axis, method="inverted_cdf")
    return (float(low), float(high)) if axis is None else (low, high)


def distinguishable(low: float | None, high: float | None) -> bool | None:
    """Does the interval of a ratio exclude 1 (the baseline)? None without an interval."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return None
    return low > 1 or high < 1
