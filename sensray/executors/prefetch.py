"""Fill this node's Hugging Face cache, once, before any replica starts: weights, tokenizer, corpus.

    python -m sensray.executors.prefetch experiments/llama2-7b-*.yaml experiments/mistral-7b-*.yaml
    python -m sensray.executors.prefetch --config-only experiments/llama2-7b-*.yaml   # the head: plans only

cluster.yaml runs this in every node's setup; Ray is then started with HF_HUB_OFFLINE=1, so the
replicas load from the cache and never reach the Hub. Without it, every replica on a node with a
cold cache would download the same 13 GB at once and race on the cache's files. Arguments are
spec files or model names (aliases, Hub ids). HF_TOKEN comes from the environment or ./.env,
as everywhere in sensray, and is handed to the Hub client only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

WEIGHTS = ["*.safetensors", "*.safetensors.index.json"]
FALLBACK_WEIGHTS = ["*.bin", "*.bin.index.json"]  # only for checkpoints without safetensors
SMALL_FILES = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


def targets(args: list[str]) -> list[tuple[str, str | None, str | None]]:
    """(model name, revision, hf corpus or None) for each spec file or model name given."""
    from sensray.spec import load_spec

    out = []
    for arg in args:
        if arg.endswith((".yaml", ".yml")):
            spec = load_spec(arg)
            corpus = spec.data.corpus if spec.data.corpus.startswith("hf:") else None
            out.append((spec.model.name, spec.model.revision, corpus and f"{corpus}|{spec.data.split}"))
        else:
            out.append((arg, None, None))
    return list(dict.fromkeys(out))


def fetch_model(name: str, revision: str | None = None, config_only: bool = False) -> str:
    """Download what from_pretrained needs (safetensors only, when the repo has them) into the cache."""
    from huggingface_hub import snapshot_download

    from sensray.models import hub_token, resolve_name

    source = resolve_name(name)
    if Path(source).is_dir():
        return source  # a local checkpoint: nothing to fetch
    patterns = SMALL_FILES if config_only else SMALL_FILES + WEIGHTS
    path = snapshot_download(source, revision=revision, allow_patterns=patterns, token=hub_token())
    if not config_only and not any(Path(path).glob("*.safetensors")):
        path = snapshot_download(source, revision=revision, allow_patterns=SMALL_FILES + FALLBACK_WEIGHTS,
                                 token=hub_token())
    return path


def fetch_corpus(corpus: str) -> None:
    """Load an `hf:` corpus once, so that datasets caches it for the offline replicas."""
    from datasets import load_dataset

    source, _, split = corpus.partition("|")
    name, _, config = source.removeprefix("hf:").partition("/")
    load_dataset(name, config or None, split=split)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sensray.executors.prefetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="spec files (experiments/*.yaml) or model names")
    parser.add_argument("--config-only", action="store_true", help="config and tokenizer only (the driver's node)")
    args = parser.parse_args(argv)
    for name, revision, corpus in targets(args.models):
        print(f"prefetch: {name} -> {fetch_model(name, revision, args.config_only)}", file=sys.stderr, flush=True)
        if corpus and not args.config_only:
            fetch_corpus(corpus)
            print(f"prefetch: corpus {corpus.partition('|')[0]}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
