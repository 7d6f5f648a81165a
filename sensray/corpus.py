"""The text the shipped model was trained and evaluated on: Python's own pydoc topics.

`pydoc_data.topics` ships with every CPython, so this text exists offline on any machine. Its
held-out part is the bundled eval corpus (`assets/corpus/pydoc_heldout.txt`); its training part
is `corpus: bundled-train`, the calibration text for pruning and super-weight discovery (never
the eval text: calibrating on what is then measured would flatter every method).
"""

from __future__ import annotations

from pydoc_data.topics import topics


def load_splits() -> tuple[str, str, list[str]]:
    """Split the pydoc topics deterministically into (train, held-out) text.

    Keys are sorted so the split does not depend on dict order; topic i is
    held out when i % 10 == 5 (8 of the 79 topics, ~36 KB).

    The topics overlap: "specialnames" embeds "customization" and
    "attribute-access" verbatim, "compound" embeds "for", and so on.  A naive
    split would train on most of the held-out text (held-out ppl ~4, i.e.
    memorisation).  So every paragraph that also occurs in the held-out text is
    removed from the training topics.
    """
    keys = sorted(topics)
    heldout_keys = [k for i, k in enumerate(keys) if i % 10 == 5]
    train_keys = [k for i, k in enumerate(keys) if i % 10 != 5]
    heldout_text = "\n\n".join(topics[k] for k in heldout_keys)
    heldout_paragraphs = set(heldout_text.split("\n\n"))
    train_text = "\n\n".join(
        "\n\n".join(p for p in topics[k].split("\n\n") if p not in heldout_paragraphs)
        for k in train_keys
    )
    return train_text, heldout_text, heldout_keys
