"""Evaluation corpora, tokenized once per replica into fixed token windows.

    data: {corpus: bundled}                                   # the shipped held-out pydoc text
    data: {corpus: bundled-train}                             # the shipped model's training text (calibration)
    data: {corpus: notes/eval.txt}                            # a local text file
    data: {corpus: eval.jsonl, text_field: text}              # one JSON object per line
    data: {corpus: "hf:wikitext/wikitext-2-raw-v1", split: test}   # datasets.load_dataset

Every corpus follows the wikitext-2 perplexity protocol: documents joined with a blank line,
tokenized as one stream, cut into non-overlapping windows of `seq_len`, the tail dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sensray.corpus import load_splits
from sensray.errors import SpecError
from sensray.spec import DataSpec

BUNDLED_CORPUS = Path(__file__).parent / "assets" / "corpus" / "pydoc_heldout.txt"


def load_text(spec: DataSpec) -> str:
    """The corpus as one string (documents joined with "\\n\\n")."""
    if spec.corpus == "bundled":
        return BUNDLED_CORPUS.read_text(encoding="utf-8")
    if spec.corpus == "bundled-train":
        return load_splits()[0]
    if spec.corpus.startswith("hf:"):
        return _hf_text(spec)
    path = Path(spec.corpus)
    if not path.is_file():
        raise SpecError("data.corpus", f"no such file {spec.corpus!r} (or use 'bundled' or 'hf:<dataset>[/<config>]')")
    if path.suffix == ".jsonl":
        text = "\n\n".join(_jsonl_texts(path, spec.text_field))
    else:
        text = read_text(path, "data.corpus")
    if not text.strip():
        raise SpecError("data.corpus", f"{path} is empty (no text to evaluate on)")
    return text


def read_text(path: Path, key: str) -> str:
    """A text file as UTF-8; unreadable or undecodable is a SpecError naming the file and the byte."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SpecError(key, f"cannot read {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SpecError(key, f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                             "convert the corpus to UTF-8") from None


def _jsonl_texts(path: Path, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(read_text(path, "data.corpus").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpecError("data.corpus", f"{path}:{number}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise SpecError("data.corpus", f"{path}:{number}: JSON nested too deeply to read") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise SpecError("data.text_field", f"{path}:{number}: no string field {field!r}")
        texts.append(record[field])
    return texts


def _hf_text(spec: DataSpec) -> str:
    from datasets import load_dataset

    name, _, config = spec.corpus.removeprefix("hf:").partition("/")
    try:
        dataset = load_dataset(name, config or None, split=spec.split, data_files=spec.data_files)
    except Exception as err:  # datasets raises many types; all mean "cannot load this corpus"
        raise SpecError("data.corpus", f"cannot load dataset {spec.corpus!r}: {err}") from None
    if spec.text_field not in dataset.column_names:
        raise SpecError("data.text_field", f"{spec.corpus!r} has no column {spec.text_field!r} ({dataset.column_names})")
    return "\n\n".join(dataset[spec.text_field])


def token_windows(tokenizer, text: str, seq_len: int, max_sequences: int | None) -> torch.Tensor:
    """(num_windows, seq_len) token ids: non-overlapping windows of one token stream, tail dropped."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    available = ids.numel() // seq_len
    if available == 0:
        raise SpecError("data.seq_len", f"the corpus has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_sequences is not None and max_sequences > available:
        raise SpecError(
            "data.num_sequences",
            f"asked for {max_sequences} windows of {seq_len} tokens, the corpus has {available} ({ids.numel()} tokens)",
        )
    count = max_sequences or available
    return ids[: count * seq_len].view(count, seq_len)


def eval_batches(spec: DataSpec, tokenizer) -> list[torch.Tensor]:
    """The evaluation batches: (batch_size, seq_len) each, the last one possibly smaller."""
    windows = token_windows(tokenizer, load_text(spec), spec.seq_len, spec.max_sequences)
    return list(windows.split(spec.batch_size))


def batches_text(tokenizer, batches: list[torch.Tensor]) -> str:
    """The text of the eval batches, decoded back: what lm-eval's `sensray-data-ppl` task scores, so its
    rolling perplexity reads the very windows sensray's own ppl does."""
    return tokenizer.decode(torch.cat([b.flatten().cpu() for b in batches]).tolist())
