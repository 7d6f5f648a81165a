"""Build sensray's offline lm-eval tasks from the held-out pydoc text (sensray/assets/tasks/).

    python scripts/make_tasks.py            # (re)write the task files
    python scripts/make_tasks.py --check    # exit 1 if the shipped files differ from what this builds

Two ordinary lm-eval task definitions (YAML beside a JSON-lines data file), built only from
`sensray/assets/corpus/pydoc_heldout.txt`, the text the shipped model never trained on, so they
run with no network on any machine:

* `sensray-pydoc-choice` (multiple_choice, metric `acc`): a passage's first words, and four
  continuations: the real next words and three shuffles of those same words. A model that has
  learned English word order picks the real one; a damaged model drifts toward chance (0.25).
  The distractors are shuffles, not other sentences: a 2M-parameter model cannot tell one topic's
  sentence from another's (measured: chance), but it can tell prose from word salad, and how well
  it still can is what a perturbation damages.
* `sensray-pydoc-swap` (multiple_choice, `acc`): the same spans, but each distractor is the real
  continuation with one pair of neighbouring words swapped: harder (the shipped model scores
  ~0.79, not ~0.98), so milder damage shows before the easy task moves.
* `sensray-pydoc-ppl` (loglikelihood_rolling): each held-out topic is one document; lm-eval's
  rolling-window perplexity (word_perplexity, byte_perplexity, bits_per_byte), the protocol
  papers quote for wikitext.

Everything is deterministic (no clock, no global random state): the same text gives the same
files byte for byte. The YAML names its data file relative to itself; sensray makes the path
absolute when it loads the task (lm-eval needs absolute paths).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "sensray" / "assets" / "corpus" / "pydoc_heldout.txt"
OUT = ROOT / "sensray" / "assets" / "tasks"

CONTEXT_WORDS = 16  # words of the passage the model reads
CONTINUATION_WORDS = 8  # words it must tell apart from their shuffles
DISTRACTORS = 3
HEADING = re.compile(r"^(?P<title>\S[^\n]*)\n\*+$", re.M)  # a topic's title, underlined with '*'

PPL_YAML = """\
# sensray's held-out pydoc topics as documents: lm-eval's rolling-window perplexity.
# Built by scripts/make_tasks.py; the data path is relative to this file (sensray makes it absolute).
task: sensray-pydoc-ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: sensray-pydoc-ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

CHOICE_YAML = """\
# Which continuation of a held-out pydoc passage is the real one? {about}
# Built by scripts/make_tasks.py; the data path is relative to this file (sensray makes it absolute).
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def documents(text: str) -> list[dict]:
    """One document per held-out topic: the text from one underlined title to the next."""
    starts = [m.start() for m in HEADING.finditer(text)]
    if not starts or starts[0] != 0:
        raise SystemExit(f"{HELDOUT}: expected the text to open with an underlined topic title")
    bounds = zip(starts, starts[1:] + [len(text)])
    return [{"title": HEADING.match(text, a).group("title"), "text": text[a:b].strip("\n")} for a, b in bounds]


def shuffled(words: list[str], rng: random.Random) -> list[str]:
    return rng.sample(words, len(words))


def swapped(words: list[str], rng: random.Random) -> list[str]:
    """The words with one pair of neighbours swapped."""
    i = rng.randrange(len(words) - 1)
    return words[:i] + [words[i + 1], words[i]] + words[i + 2:]


def choice_items(text: str, distractor=shuffled, context: int = CONTEXT_WORDS,
                 continuation: int = CONTINUATION_WORDS) -> list[dict]:
    """Non-overlapping (context, continuation) spans of every paragraph long enough for one, each
    with DISTRACTORS distinct variants of the continuation made by `distractor(words, rng)`.

    Words are whitespace-split and joined with single spaces, so indentation and line breaks of
    the pydoc layout never tell the real continuation apart. A span that cannot give enough
    distinct variants (repeated words) is left out.
    """
    items = []
    for p, paragraph in enumerate(text.split("\n\n")):
        words = paragraph.split()
        for start in range(0, len(words) - context - continuation + 1, context + continuation):
            head = words[start: start + context]
            tail = words[start + context: start + context + continuation]
            item = _item(head, tail, distractor, random.Random(f"{p}:{start}"))
            if item is not None:
                items.append(item)
    return items


def _item(head: list[str], tail: list[str], distractor, rng: random.Random) -> dict | None:
    real = " ".join(tail)
    options = [real]
    for _ in range(100):  # a span with enough distinct words needs a handful of draws
        variant = " ".join(distractor(tail, rng))
        if variant not in options:
            options.append(variant)
        if len(options) == DISTRACTORS + 1:
            break
    else:
        return None
    rng.shuffle(options)  # the real continuation's position is uniform, not always first
    return {"context": " ".join(head), "choices": options, "label": options.index(real)}


def files() -> dict[str, str]:
    """File name -> content of every shipped task file."""
    text = HELDOUT.read_text(encoding="utf-8")
    return {
        "sensray-pydoc-ppl.yaml": PPL_YAML,
        "sensray-pydoc-ppl.jsonl": _jsonl(documents(text)),
        "sensray-pydoc-choice.yaml": CHOICE_YAML.format(name="sensray-pydoc-choice",
                                                        about="The other three are its words shuffled."),
        "sensray-pydoc-choice.jsonl": _jsonl(choice_items(text, shuffled)),
        "sensray-pydoc-swap.yaml": CHOICE_YAML.format(name="sensray-pydoc-swap",
                                                      about="Each other one swaps two neighbouring words."),
        "sensray-pydoc-swap.jsonl": _jsonl(choice_items(text, swapped)),
    }


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files; write nothing")
    args = parser.parse_args(argv)
    built = files()
    if args.check:
        stale = [name for name, text in built.items() if not (OUT / name).is_file()
                 or (OUT / name).read_text(encoding="utf-8") != text]
        print(f"differ from this script's output: {', '.join(stale)}" if stale else "up to date")
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in built.items():
        (OUT / name).write_text(text, encoding="utf-8")
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
