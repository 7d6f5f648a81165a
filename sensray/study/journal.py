"""The study journal: each finished stage with the hash of its inputs, so --resume knows what is done.

    results/<study>/<study id>/journal.jsonl      one line per finished stage, fsynced (results.Journal)
    results/<study>/<study id>/<stage>/stage.json   written when a stage starts: its input hash

A stage's input hash covers its kind, its resolved parameters, what else it reads (an experiment
file's content; the study's model, and the eval text when it uses it) and the input hashes of
the stages it reads. A changed upstream stage therefore changes the hash of everything after it:
those stages run again, and the ones whose inputs are unchanged are skipped. A stage that started
with the same hash but has no journal line was interrupted, and continues (a sweep resumes its
run, a heal its checkpoints); one whose hash changed starts over in a clean directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sensray.results import Journal, read_journal
from sensray.study.stages import Record, Stage

JOURNAL = "journal.jsonl"
STARTED = "stage.json"


def input_hash(study, stage: Stage, hashes: dict[str, str]) -> str:
    """sha256 of everything the stage's output depends on (16 hex digits, like trial ids)."""
    from sensray.study.stages import StageContext

    upstream = [s.name for s in study.stages[: stage.index]] if stage.reads_all else stage.upstream()
    content = {
        "kind": stage.kind,
        "params": stage.params.model_dump(mode="json"),
        "model": study.spec.model.model_dump(mode="json"),
        "eval": study.spec.eval.model_dump(mode="json") if stage.uses_eval else None,
        "reads": stage.hashed(StageContext(study, stage, Path(), {})),
        "upstream": {name: hashes[name] for name in sorted(set(upstream))},
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def records(root: Path) -> dict[str, Record]:
    """The latest journal line of each stage (a stage run again supersedes its earlier line)."""
    path = root / JOURNAL
    if not path.is_file():
        return {}
    return {row["trial_id"]: Record(**row["record"]) for row in read_journal(path)}


def append(root: Path, record: Record) -> None:
    # results.Journal rows are keyed by trial_id: here the stage name (one journal format in sensray).
    with Journal(root / JOURNAL) as journal:
        journal.append({"trial_id": record.stage, "record": asdict(record)})


def started(stage_dir: Path) -> str | None:
    """The input hash a stage directory was started with, if it was."""
    path = stage_dir / STARTED
    try:
        return json.loads(path.read_text(encoding="utf-8"))["input_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_started(stage_dir: Path, stage: Stage, digest: str) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / STARTED).write_text(json.dumps({"stage": stage.name, "kind": stage.kind, "input_hash": digest})
                                     + "\n", encoding="utf-8")


def summary_of(record: Record | None) -> dict[str, Any]:
    return record.summary if record is not None else {}
