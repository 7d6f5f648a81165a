"""Which lm-eval tasks a spec names, and whether sensray can score them here (the dry-run checks).

    catalog = Catalog(["sensray-pydoc-choice", "arc_easy"])
    catalog.check("eval.tasks")       # unknown name, unscorable output type, Hub data while offline or unreachable
    tasks = catalog.load()            # lm-eval's TaskDict: datasets loaded, ready to evaluate

sensray's shipped tasks need no index: with only those, lm-eval's TaskManager is built without
its ~15,000 built-in task files (instant instead of seconds). Names are looked up in the index
before anything is loaded, so a name is never read as a file path (lm-eval would load a YAML
file of that name, and a task file can run code).

Output types: sensray scores tasks by likelihood (`loglikelihood`, `loglikelihood_rolling`,
`multiple_choice`), one forward pass per request on the resident model. `generate_until` tasks
(gsm8k, ...) are refused: a damaged model generates to the length limit on every document, so a
trial would cost hundreds of forward passes per document, and greedy text from a broken model
is scored as wrong anyway.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, Iterator

from sensray.errors import SensrayError, SpecError
from sensray.tasks.shipped import DATA_PPL, config, data_config, shipped_names

LM_EVAL_VERSION = "0.4.13"  # the version sensray is tested with (pyproject's `tasks` extra)
INSTALL = f"pip install 'sensray[tasks]' (or pip install lm-eval=={LM_EVAL_VERSION})"
SCORABLE = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders that read data_files
FEWSHOT_SEED = 1234  # lm-eval's default fewshot seed (simple_evaluate's), so few-shot contexts match its CLI's


def require_lm_eval() -> None:
    """lm-eval is an optional dependency: say how to install it when a spec asks for tasks."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SensrayError(f"lm-eval tasks need lm-evaluation-harness, which is not installed: {INSTALL}") from None


class Catalog:
    def __init__(self, names: list[str], data_text: str | None = None):
        """`data_text`: what sensray-data-ppl scores (the run's eval windows as text); needed to load it."""
        require_lm_eval()
        self.names, self.shipped, self.data_text = list(names), set(shipped_names()), data_text
        self.manager = task_manager(builtin=any(name not in self.shipped for name in self.names))

    def check(self, key: str, data: bool = True) -> None:
        """Every name known, every task scorable; with `data`, every dataset reachable from here."""
        for name in self.names:
            for task, cfg in self._leaves(name, key):
                if cfg is None:
                    continue  # a task defined in Python: its output type shows when it is loaded
                check_output_type(task, cfg.get("output_type", "generate_until"), key)
                if data:
                    check_dataset(task, cfg, key)

    def load(self, key: str = "eval.tasks") -> dict:
        """lm-eval's TaskDict {tasks, groups, group_map} for the names, each leaf task set up as
        lm-eval's own simple_evaluate sets it up (zero-shot unless the task says otherwise)."""
        specs = [self._spec(name) for name in self.names]
        try:
            loaded = self.manager.load(specs)
        except (OSError, ValueError, KeyError, ConnectionError) as err:  # datasets' and lm-eval's many failures
            raise SensrayError(f"{key}: lm-eval could not load {', '.join(self.names)}: {first_line(err)}") from None
        for name, task in loaded["tasks"].items():
            check_output_type(name, task.OUTPUT_TYPE, key)
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        return loaded

    def _spec(self, name: str) -> str | dict:
        if name == DATA_PPL:
            if self.data_text is None:
                raise SensrayError(f"{DATA_PPL} scores the run's own eval text, and none was given")
            return data_config(self.data_text)
        return config(name) if name in self.shipped else name

    def _leaves(self, name: str, key: str) -> list[tuple[str, dict | None]]:
        """(task name, its config) of every task `name` stands for (a group or tag stands for several)."""
        if name in self.shipped:
            return [(name, config(name))]
        index = self.manager.task_index
        if name not in index:
            raise SpecError(key, unknown(name, [*self.shipped, *index]))
        return list(_expand(index, name, depth=0))


def _expand(index: dict, name: str, depth: int) -> Iterator[tuple[str, dict | None]]:
    entry = index.get(name)
    kind = entry.kind.name if entry is not None else "UNKNOWN"
    if kind == "TASK" or depth > 8:  # groups nest a few levels; deeper is a cycle, left to lm-eval
        yield name, entry.cfg if entry is not None else None
        return
    if kind == "TAG":
        children: list[Any] = sorted(entry.tags)
    elif kind == "GROUP":
        children = list(entry.cfg.get("task", []))
    else:  # a Python task, or a name only lm-eval's loader resolves
        yield name, None
        return
    for child in children:
        if isinstance(child, str):
            yield from _expand(index, child, depth + 1)
        elif isinstance(child, dict):  # an inline task; its output type may come from an `include` not seen here
            yield str(child.get("task", name)), child if "output_type" in child else None


@functools.cache
def task_manager(builtin: bool):
    """lm-eval's TaskManager, built once per process: indexing its built-in tasks reads ~15,000 YAML
    files (seconds), and a dry run, the run after it and every replica's load would each do it again."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=builtin)


def unknown(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"unknown lm-eval task {name!r}{hint} (sensray ships {', '.join(shipped_names())}; "
            f"`lm-eval ls tasks` lists lm-eval's)")


def check_output_type(task: str, output_type: str, key: str) -> None:
    if output_type not in SCORABLE:
        raise SpecError(key, f"task {task!r} is a {output_type} task; sensray scores tasks by likelihood "
                             f"({', '.join(SCORABLE)}), not generated text")


def check_dataset(task: str, cfg: dict, key: str) -> None:
    """A local data file must exist; a Hub dataset must be in the local cache when the Hub is off."""
    path = cfg.get("dataset_path")
    if path in LOCAL_BUILDERS:
        for file in _data_files(cfg.get("dataset_kwargs", {}).get("data_files")):
            if not Path(file).is_file():
                raise SpecError(key, f"task {task!r} reads {file}, which does not exist")
        return
    if not path or Path(path).exists():
        return  # a local dataset directory
    if not hub_offline():
        unreachable = hub_unreachable()
        if unreachable:  # datasets would retry for minutes, then fail; say so now, in one line
            raise SpecError(key, f"task {task!r} needs the dataset {path!r} from the Hugging Face Hub, which "
                                 f"cannot be reached from here ({unreachable}): set HF_HUB_OFFLINE=1 to read "
                                 "the local datasets cache instead, or use sensray's offline tasks")
        return  # lm-eval downloads it when the run starts
    import datasets

    try:
        datasets.load_dataset_builder(path, cfg.get("dataset_name"))  # offline: answers from the cache alone
    except Exception:  # datasets raises many types here; all mean "not usable offline"
        name = f"{path}/{cfg['dataset_name']}" if cfg.get("dataset_name") else path
        raise SpecError(key, f"task {task!r} needs the dataset {name!r} from the Hugging Face Hub, which is "
                             f"switched off here (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) and it is not in the "
                             f"local datasets cache ({datasets.config.HF_DATASETS_CACHE}): run once where the network "
                             "reaches, or use sensray's offline tasks") from None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE as the datasets library reads them (at its import)."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


@functools.cache
def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be reached (None when it can): one TCP connection to its endpoint, once per
    process, where datasets' own retries on a machine without network take minutes."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    address = (url.hostname or "", url.port or (80 if url.scheme == "http" else 443))
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError as err:
        return f"{address[0]}:{address[1]}: {err.strerror or type(err).__name__}"
    return None


def _data_files(files: Any) -> list[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for value in files.values() for f in _data_files(value)]
    if isinstance(files, list):
        return [f for value in files for f in _data_files(value)]
    return []


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
