"""The training text of a heal: token windows, a fixed order of batches, and a guard against eval text.

    windows = training_windows(recipe.train, tokenizer)        # (n, seq_len) token ids
    rows = batch_rows(len(windows), batch_size=8, seed=0, step=41)   # the 8 windows of step 41

A heal that trains on the text it is then judged on measures memorisation, not recovery, so the
training corpus may never be the eval corpus: the same name, file or dataset split, the same
text, or a local text that holds most of the eval text's paragraphs is refused before anything
loads. (Two Hub datasets are compared by name, config, split and files, not fetched.)

The order of windows is a function of (seed, step) alone: a resumed heal draws exactly the
batches the interrupted one would have, and each worker takes its rows of the same global batch.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from sensray.data import load_text, token_windows
from sensray.errors import SpecError
from sensray.perturbations.base import keyed_torch_generator
from sensray.spec import DataSpec

# Paragraphs shorter than this are boilerplate (headings, "Example:") that any two texts may share.
MIN_PARAGRAPH = 40
MAX_SHARED = 0.5  # refuse when more than this share of the eval text's paragraphs occur in the training text


def training_windows(spec: DataSpec, tokenizer) -> torch.Tensor:
    """(windows, seq_len) token ids of the training corpus (every window, or num_sequences of them)."""
    try:
        return token_windows(tokenizer, load_text(spec), spec.seq_len, spec.max_sequences)
    except SpecError as err:
        raise SpecError(err.path.replace("data.", "train."), err.message) from None


def check_not_eval(train: DataSpec, eval_: DataSpec, key: str = "") -> None:
    """SpecError when the training text is, or mostly contains, the eval text."""
    if corpus_identity(train) == corpus_identity(eval_):
        raise SpecError(f"{key}train.corpus", f"{train.corpus!r} is also the eval text: a heal must never train on "
                                              "the text that measures it (the shipped model trains on bundled-train)")
    if train.corpus.startswith("hf:") or eval_.corpus.startswith("hf:"):
        return  # datasets differ by name, config, split or files (above); their text is not fetched to compare
    train_text, eval_text = _text(train, f"{key}train"), _text(eval_, f"{key}eval")
    shared = shared_share(train_text, eval_text)
    if train_text == eval_text or shared > MAX_SHARED:
        raise SpecError(f"{key}train.corpus", f"{train.corpus!r} holds {shared:.0%} of the eval text's paragraphs "
                                              f"({eval_.corpus!r}): a heal must never train on the text that "
                                              "measures it")


def shared_share(train_text: str, eval_text: str) -> float:
    """Share of the eval text's paragraphs (of at least MIN_PARAGRAPH characters) found verbatim in training."""
    paragraphs = [p.strip() for p in eval_text.split("\n\n") if len(p.strip()) >= MIN_PARAGRAPH]
    if not paragraphs:
        return 1.0 if train_text.strip() == eval_text.strip() else 0.0
    known = {p.strip() for p in train_text.split("\n\n")}
    return sum(p in known for p in paragraphs) / len(paragraphs)


def corpus_identity(spec: DataSpec) -> tuple:
    """What a corpus is, whatever it is called: a file by its real path, a dataset by name and split."""
    path = Path(spec.corpus)
    if spec.corpus not in ("bundled", "bundled-train") and not spec.corpus.startswith("hf:") and path.exists():
        return ("file", str(path.resolve()), spec.text_field)
    return (spec.corpus, spec.split if spec.corpus.startswith("hf:") else None, spec.data_files)


def _text(spec: DataSpec, key: str) -> str:
    try:
        return load_text(spec)
    except SpecError as err:
        raise SpecError(f"{key}.{err.path.removeprefix('data.')}", err.message) from None


def batch_rows(windows: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The window indices of step `step`'s global batch: epochs of seeded permutations, read in order."""
    first = step * batch_size
    positions = torch.arange(first, first + batch_size)
    epochs = positions // windows
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        here = epochs == epoch
        out[here] = _order(windows, seed, epoch)[positions[here] % windows]
    return out


@lru_cache(maxsize=4)
def _order(windows: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(windows, generator=keyed_torch_generator(seed, "heal-order", epoch))
