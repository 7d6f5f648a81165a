"""The lm-eval tasks sensray ships (sensray/assets/tasks/), loadable with no network.

    shipped_names()                  # ['sensray-data-ppl', 'sensray-pydoc-choice', 'sensray-pydoc-ppl', ...]
    config("sensray-pydoc-choice")   # the task's YAML as a dict, its data file's path made absolute
    data_config(text)                # sensray-data-ppl: lm-eval's rolling perplexity of the run's own eval text

Each task is an ordinary lm-eval task YAML beside its JSON-lines data file, both written by
scripts/make_tasks.py from the held-out pydoc text. lm-eval needs absolute data paths, which a
file inside an installed package cannot hold, so the YAML names its data file relative to itself
and `config` hands lm-eval the task as a config dict with the path made absolute: nothing is
written at run time, and the package can live anywhere.

`sensray-data-ppl` has no file: it is lm-eval's loglikelihood_rolling over the text of the very
windows sensray evaluates (`data.*` of the spec, decoded back to text as one document), so
lm-eval's perplexity protocol and sensray's can be read side by side on any corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sensray import safe_yaml
from sensray.errors import SensrayError

TASKS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tasks"
DATA_PPL = "sensray-data-ppl"
ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def shipped_names() -> list[str]:
    return sorted([DATA_PPL, *(path.stem for path in TASKS_DIR.glob("*.yaml"))])


def data_config(text: str) -> dict[str, Any]:
    """sensray-data-ppl over `text` (one document), as an lm-eval config dict."""

    def dataset(**_):
        import datasets

        return {"test": datasets.Dataset.from_list([{"text": text}])}

    return {"task": DATA_PPL, "custom_dataset": dataset, "test_split": "test", "output_type": "loglikelihood_rolling",
            "doc_to_text": "", "doc_to_target": "text", "metric_list": [{"metric": m} for m in ROLLING_METRICS],
            "metadata": {"version": 1.0}}


def config(name: str) -> dict[str, Any]:
    """The shipped task `name` as an lm-eval config dict, with absolute data paths."""
    if name == DATA_PPL:
        return {"task": DATA_PPL, "output_type": "loglikelihood_rolling"}  # what the checks read; data_config runs it
    path = TASKS_DIR / f"{name}.yaml"
    try:
        cfg = safe_yaml.load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SensrayError(f"{path}: cannot read the shipped task ({err.strerror or err}); reinstall sensray, "
                           "or rebuild it with python scripts/make_tasks.py") from None
    files = cfg.get("dataset_kwargs", {}).get("data_files", {})
    absolute = {split: str(TASKS_DIR / file) for split, file in files.items()}
    missing = [file for file in absolute.values() if not Path(file).is_file()]
    if missing:
        raise SensrayError(f"{missing[0]}: the data of the shipped task {name!r} is missing; rebuild it with "
                           "python scripts/make_tasks.py")
    return cfg | {"dataset_kwargs": cfg["dataset_kwargs"] | {"data_files": absolute}}
