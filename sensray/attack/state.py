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

import yaml

from sensray.attack.spec import AttackSpec, load_attack_spec
from sensray.errors import SensrayError, SpecError
from sensray.results import _atomic_write, new_run_id, read_journal, versions


class AttackRun:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, spec: AttackSpec) -> "AttackRun":
        run = cls(Path(spec.output_dir) / spec.name / new_run_id())
        try:
            run.path.mkdir(parents=True)
        except (OSError, ValueError) as err:
            raise SpecError("output_dir", f"cannot create the run directory {run.path}: "
                                          f"{getattr(err, 'strerror', None) or err}") from None
        _atomic_write(run.path / "spec.yaml", yaml.safe_dump(spec.resolved(), sort_keys=False))
        return run

    @classmethod
    def open(cls, path: str | Path) -> "AttackRun":
        run = cls(Path(path))
        if not (run.path / "spec.yaml").is_file():
            raise SensrayError(f"{path} is not a sensray attack directory (no spec.yaml)")
        return run

    def spec(self, overrides: list[str] = ()) -> AttackSpec:
        return load_attack_spec(self.path / "spec.yaml", overrides)

    def journal(self, name: str) -> Path:
        return self.path / f"{name}.jsonl"

    def rows(self, name: str) -> list[dict[str, Any]]:
        """A journal's rows (a line a crash cut short is left out)."""
        path = self.journal(name)
        return read_journal(path) if path.is_file() else []

    def flips(self) -> list[dict[str, Any]]:
        """The committed flips in step order; each step once, and no gaps (else the journal is not this run's)."""
        flips = sorted(self.rows("flips"), key=lambda row: row["step"])
        if [f["step"] for f in flips] != list(range(len(flips))):
            raise SensrayError(f"{self.journal('flips')}: steps {[f['step'] for f in flips]} are not 0, 1, 2, ...; "
                               "the committed sequence is broken (restore the file, or start a new attack)")
        return flips

    @property
    def finished(self) -> bool:
        return (self.path / "attack.json").is_file()

    def write_baseline(self, baseline: dict[str, Any]) -> None:
        _atomic_write(self.path / "baseline.json", json.dumps(baseline | {"versions": versions()}, indent=2) + "\n")

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
