"""Everything a sweep can check before it loads a weight or writes a file.

    preflight(spec, replicas_here=True)                 # a new run: its output directory must be creatable
    preflight(spec, replicas_here=True, run=run.path)   # a resumed run: its directory must be writable

`--dry-run` runs exactly these checks and the real run runs them first, so a mistake that a
dry run passes cannot fail a real run later for a reason that was knowable up front:

- the corpus reads, and tokenizes (the tokenizer is cheap) into enough windows of `seq_len`;
  early-stopping rungs fall on distinct batches of it (when the replicas run on this machine);
- the model directory has its weights, and every safetensors header reads and covers its file
  (a truncated copy fails here, not in each replica);
- the device asked for exists (`cuda` on a machine without one), and the installed bitsandbytes can
  run a quantized model's format on it, when the replicas run here;
- the output directory can be created, without creating anything: its nearest existing parent is
  a writable directory and the new names fit the filesystem;
- lm-eval tasks (`eval:`): lm-eval is installed, every name is a task it (or sensray) knows, each
  is scored by likelihood, and its data is reachable (a Hub dataset while the Hub is switched off
  must be in the local cache), all without loading a dataset.

Errors are the same `SensrayError`s the replicas would raise, so the message does not depend on
where a check happened. (Targets, parameters and the model's context are checked by the plan.)
"""

from __future__ import annotations

import os
from pathlib import Path

from sensray.errors import SpecError
from sensray.spec import ExperimentSpec

RUN_ID_LENGTH = 22  # results.new_run_id(): YYYYmmdd-HHMMSS-xxxxxx


def preflight(spec: ExperimentSpec, replicas_here: bool, run: Path | None = None) -> None:
    """Raise the first problem found; return quietly when everything checks out."""
    from sensray.models import check_weights, pick_device

    # On a cluster (--address) the replicas' nodes, not the driver's, hold the GPUs and the corpus (in
    # their caches): the replicas check those, and their errors cross Ray as the same one line.
    if replicas_here:
        from sensray.quantized.loading import check_device

        check_device(spec.model, pick_device(spec.model))  # bitsandbytes can run the quantization there
        check_data(spec)
    check_weights(spec.model)
    if spec.eval is not None:  # names, output types; where the replicas run here, their data too
        from sensray.tasks import Catalog

        Catalog(spec.eval.tasks).check("eval.tasks", data=replicas_here)
    if run is None:
        check_creatable(Path(spec.output_dir) / spec.name, "output_dir", RUN_ID_LENGTH)
    else:
        check_writable(run)


def check_data(spec: ExperimentSpec) -> int:
    """The eval windows build from the corpus as a replica builds them; returns how many batches."""
    from sensray.data import load_text, token_windows
    from sensray.early_stop import rung_batches
    from sensray.models import load_tokenizer

    windows = token_windows(load_tokenizer(spec.model), load_text(spec.data), spec.data.seq_len,
                            spec.data.max_sequences)
    batches = -(-len(windows) // spec.data.batch_size)
    if spec.early_stop is not None:
        rung_batches(spec.early_stop.rungs, batches)
    return batches


def check_creatable(path: Path, key: str, extra: int = 0) -> None:
    """`path` (and a child name of `extra` bytes) could be made with mkdir -p; nothing is created."""
    path = Path(os.path.abspath(path))
    if "\0" in str(path):
        raise SpecError(key, f"{str(path)!r} contains a NUL byte, which no file name can")
    limit = _name_max(Path(path.anchor))
    for name in path.parts:
        if len(os.fsencode(name)) > limit:
            raise SpecError(key, f"the name {name[:40]!r}... is {len(os.fsencode(name))} bytes; this "
                                 f"filesystem allows {limit}")
    if len(os.fsencode(str(path))) + extra + 1 >= _path_max(Path(path.anchor)):
        raise SpecError(key, f"{str(path)[:60]}... is too long a path for this filesystem")
    try:
        parent = path
        while not parent.exists():
            parent = parent.parent
    except OSError as err:  # e.g. a directory on the way that this user may not search
        raise SpecError(key, f"cannot use {path}: {err.strerror or err}") from None
    if not parent.is_dir():
        raise SpecError(key, f"{parent} is a file, not a directory, so {path} cannot be created")
    _require_writable(parent, key)


def check_writable(directory: Path) -> None:
    """An existing run directory: new rows and the final table must be writable there."""
    _require_writable(directory, "--resume")


def _require_writable(directory: Path, key: str) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SpecError(key, f"{directory} is not writable by this user")
    try:
        read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
    except OSError:
        read_only = False
    if read_only:
        raise SpecError(key, f"{directory} is on a read-only filesystem")


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _path_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096
