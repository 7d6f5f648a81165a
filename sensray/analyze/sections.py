"""The report's sections: each analysis module contributes its own, in a fixed order.

    from sensray.analyze.sections import Context, Section, section

    @section(order=50)
    def my_analysis(ctx: Context) -> Section | None:      # None: nothing to say about this run
        table = ...                                       # from ctx.trials (annotated), ctx.seq (bootstrap)
        return Section("mine", "My analysis", [Table.of(table)], answers=["..."], data={"mine": table})

A section brings its blocks (tables, figures, paragraphs), the sentences it adds to the reading
(`answers` first: they answer the question the study asks; `findings` after), and the numbers it
adds to summary.json (`data`). The report (report.py) puts them between the reading and the
generic tables, in `order`; a provider module is imported from `MODULES` only when it exists, so an
analysis (the quantized formats study, lm-eval tasks) plugs in by defining providers in its module.
Order bands: 10-39 the perturbation kind's own sections, 40-69 other analyses, 70-99 every run.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import polars as pl

from sensray.analyze.render import Block
from sensray.analyze.run import Run
from sensray.analyze.stats import Sequences

MODULES = (
    "sensray.analyze.faults", "sensray.analyze.dose", "sensray.analyze.ablations", "sensray.analyze.pruning",
    "sensray.analyze.formats", "sensray.analyze.tasks", "sensray.analyze.overview",
)
TOP = 10  # rows of the ranked tables in the report and on the terminal


@dataclass
class Context:
    """What every provider reads: the run, its annotated trials, the threshold, the bootstrap."""

    run: Run
    trials: pl.DataFrame
    threshold: float

    @cached_property
    def seq(self) -> Sequences | None:
        return Sequences.of(self.run.trials, self.run.baseline)

    @property
    def kind(self) -> str:
        return self.run.kind

    @property
    def baseline_ppl(self) -> float:
        return float(self.run.baseline["ppl"])

    @property
    def vocab(self) -> int | None:
        return self.run.baseline.get("vocab_size")

    @property
    def ceiling(self) -> float | None:
        """ppl / baseline of a uniform guess over the vocabulary (ppl = vocabulary size)."""
        return self.vocab / self.baseline_ppl if self.vocab else None

    @property
    def caption_context(self) -> str:
        """One line under every figure title: which model, which run, which baseline."""
        b = self.run.baseline
        return f"{b['model']} [{b.get('dtype', '?')}] · baseline ppl {b['ppl']:.2f} · {self.run.name}/{self.run.run_id}"


@dataclass
class Section:
    key: str  # anchor in report.html, key in summary.json
    title: str
    blocks: list[Block]
    answers: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # polars frames become lists of rows in summary.json
    replaces: frozenset[str] = frozenset()  # generic findings this section answers better (reading.GENERIC)


Provider = Callable[[Context], "Section | None"]
_PROVIDERS: list[tuple[float, str, Provider]] = []


def section(order: float) -> Callable[[Provider], Provider]:
    """Register a provider of one section; lower `order` comes first."""
    def register(provider: Provider) -> Provider:
        name = f"{provider.__module__}.{provider.__qualname__}"
        _PROVIDERS[:] = [p for p in _PROVIDERS if p[1] != name]  # a reloaded module replaces its own
        _PROVIDERS.append((order, name, provider))
        return provider
    return register


def load() -> None:
    """Import the provider modules that exist (importing registers their sections)."""
    for module in MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def collect(ctx: Context) -> list[Section]:
    """Every section with something to say about this run, in order."""
    load()
    made = (provider(ctx) for _, _, provider in sorted(_PROVIDERS, key=lambda p: (p[0], p[1])))
    return [s for s in made if s is not None]
