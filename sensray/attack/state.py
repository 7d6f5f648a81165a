"""An attack's run directory: its journals while it runs, its tables once it is done.

    results/<name>/<run id>/
        spec.yaml          the attack spec, every default filled in
        baseline.json      the clean model's metrics (and utility ppl), checksums, versions
        random.jsonl       the random-flip baseline's trials (run first, on the clean model)
        candidates.jsonl   every candidate evaluated, with its step and predicted damage
        flips.jsonl        the committed flips, one line per step: THE committed state
        flips.parquet, candidates.parquet, random.parquet, damage.png, report.md, attack.json   (at the end)

Every journal line is one write, flushed and fsynced (sensray.results.Journal), so a driver that dies
loses at most the trials in flight. `--resume` replays flips.jsonl onto fresh replicas (sensray.committed
checks every bit it overwrites), reuses the candidates already evaluated at the step in progress, and
continues: the same flips in the same order as a run that never stopped. attack.json marks it done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sensray.attack.spec import AttackSpec, load_attack_spec
from sensray.errors import SensrayError
from sensray.results import RunDir, _atomic_write, read_journal


class AttackRun(RunDir):
    """A run directory (sensray.results.RunDir: created, opened and its baseline written the same way) whose
    spec is an attack spec and whose journals are the attack's."""

    def spec(self, overrides: list[str] = ()) -> AttackSpec:
        return load_attack_spec(self.path / "spec.yaml", overrides)

    def journal_of(self, name: str) -> Path:
        return self.path / f"{name}.jsonl"

    def journal_rows(self, name: str) -> list[dict[str, Any]]:
        """A journal's rows (a line a crash cut short is left out)."""
        path = self.journal_of(name)
        return read_journal(path) if path.is_file() else []

    def flips(self) -> list[dict[str, Any]]:
        """The committed flips in step order; each step once, and no gaps (else the journal is not this run's)."""
        flips = sorted(self.journal_rows("flips"), key=lambda row: row["step"])
        if [f["step"] for f in flips] != list(range(len(flips))):
            raise SensrayError(f"{self.journal_of('flips')}: steps {[f['step'] for f in flips]} are not 0, 1, 2, ...; "
                               "the committed sequence is broken (restore the file, or start a new attack)")
        return flips

    @property
    def finished(self) -> bool:
        return (self.path / "attack.json").is_file()

    def baseline(self) -> dict[str, Any]:
        return json.loads((self.path / "baseline.json").read_text(encoding="utf-8"))

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.path / "attack.json", json.dumps(summary, indent=2, default=str) + "\n")

    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / "attack.json").read_text(encoding="utf-8"))


def committed_changes(flips: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every element change of the committed flips, in commit order (what a replica replays)."""
    return [change for flip in flips for change in flip["changes"]]


def read_flips(path: str | Path) -> tuple[AttackSpec, list[dict[str, Any]]]:
    """An attack directory's spec and committed flips (from flips.parquet when finished, else its journal)."""
    run = AttackRun.open(path)
    table = run.path / "flips.parquet"
    if table.is_file():
        import polars as pl

        return run.spec(), pl.read_parquet(table).sort("step").to_dicts()
    return run.spec(), run.flips()
