"""The attack's run directory: what it found, step by step, and what transfer measured.

    results/<name>/<run id>/
        spec.yaml            the resolved adversarial spec
        baseline.json        model, checksum, ppl on spec.data, versions
        cases.json           every case's token ids (before, after, target): what was attacked, exactly
        steps.jsonl          the journal: one row per attack step, fsynced as it lands (resume reads it)
        steps.parquet        the same rows (loss per step), written when the search ends; the journal goes
        attacks.parquet      one row per attack (case x budget): ids, text, clean vs attacked, success
        budgets.parquet      success rate (Wilson 95%) and mean NLL, clean and attacked, per budget
        summary.json, loss.png, success.png, continuations.md
        transfer.jsonl       one row per weight condition (trial of a run, or an exported model), kept
        transfer.parquet     its rows per condition x attack; transfer-summary.parquet, transfer.png

Like a sweep's run directory (sensray.results.RunDir, reused here): the journal is the record while
the search runs, the tables are written atomically at the end, and attacks.parquet marks a finished
search. transfer.jsonl accumulates across `--transfer` invocations; its tables are rewritten from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sensray.adversarial.cases import Case
from sensray.adversarial.spec import AdversarialSpec, load_adversarial_spec
from sensray.errors import SensrayError
from sensray.results import RunDir, _atomic_write, read_journal


class AttackRun(RunDir):
    @classmethod
    def create(cls, spec: AdversarialSpec) -> "AttackRun":  # RunDir.create reads name, output_dir, resolved()
        return cls(RunDir.create(spec).path)

    @classmethod
    def open(cls, path: str | Path) -> "AttackRun":
        run = cls(Path(path))
        if not (run.path / "spec.yaml").is_file():
            raise SensrayError(f"{path} is not an adversarial run directory (no spec.yaml)")
        return run

    def spec(self, overrides: list[str] = ()) -> AdversarialSpec:
        return load_adversarial_spec(self.path / "spec.yaml", overrides)

    @property
    def journal(self) -> Path:
        return self.path / "steps.jsonl"

    @property
    def table(self) -> Path:  # a finished search has its attacks table
        return self.path / "attacks.parquet"

    @property
    def transfer_journal(self) -> Path:
        return self.path / "transfer.jsonl"

    def write_cases(self, cases: list[Case]) -> None:
        _atomic_write(self.path / "cases.json", json.dumps([c.to_json() for c in cases], indent=1) + "\n")

    def cases(self) -> list[Case]:
        path = self.path / "cases.json"
        try:
            return [Case.from_json(raw) for raw in json.loads(path.read_text(encoding="utf-8"))]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SensrayError(f"{path}: cannot read the attacked cases ({type(err).__name__}: {err})") from None

    def baseline(self) -> dict[str, Any]:
        return json.loads((self.path / "baseline.json").read_text(encoding="utf-8"))

    def rows(self) -> list[dict[str, Any]]:
        """Every journaled step so far (or, once finished, the steps table)."""
        if (self.path / "steps.parquet").is_file():
            return read_table(self.path / "steps.parquet")
        return read_journal(self.journal, key="attack") if self.journal.is_file() else []

    def transfer_rows(self) -> list[dict[str, Any]]:
        return read_journal(self.transfer_journal, key="condition") if self.transfer_journal.is_file() else []

    def write_table(self, name: str, frame) -> Path:
        """`name`.parquet, written atomically."""
        path = self.path / f"{name}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        frame.write_parquet(tmp)
        os.replace(tmp, path)
        return path


def read_table(path: Path) -> list[dict[str, Any]]:
    import polars as pl

    try:
        return pl.read_parquet(path).to_dicts()
    except (OSError, pl.exceptions.PolarsError) as err:
        raise SensrayError(f"{path}: not a readable Parquet table ({type(err).__name__})") from None

