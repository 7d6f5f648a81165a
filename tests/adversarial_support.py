"""What the adversarial tests share: a tiny model whose tokenizer round-trips text, and spec text for it.

The tokenizer is one token per character with a decoder that joins them back (so decode -> encode
gives the same ids, as a real tokenizer does for most text); the model is the tiny random Llama of
sensray.testing (2 blocks, hidden 64, vocab 128, context 128).
"""

from __future__ import annotations

from pathlib import Path

CORPUS = "\n\n".join(
    f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i} of a tiny corpus for attacks\n" for i in range(120))


def build(root: Path, drop_control: bool = False) -> tuple[Path, Path]:
    """(model dir, corpus file) under `root`. `drop_control`: the tokenizer's normalizer deletes DEL (0x7f), as
    many real ones delete control characters (so a text of DELs tokenizes to nothing)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sensray.testing import tiny_model

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)} | {"[UNK]": len(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    if drop_control:
        tok.normalizer = normalizers.Replace("\x7f", "")
    model_dir = root / "tiny-adv"
    tiny_model("llama", seed=3).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    return model_dir, corpus


def spec_text(model: Path, corpus: Path, out: Path, attack: dict | None = None, inputs: dict | None = None,
              **top) -> str:
    """Two corpus windows (12 + 6 tokens) attacked at budgets 1 and 3, 4 GCG steps of 8 candidates;
    `attack`, `inputs` and other top-level keys override."""
    import yaml

    spec = {"name": "adv-test", "model": {"name": str(model)},
            "attack": {"method": "gcg", "objective": "nll", "budgets": [1, 3], "steps": 4, "top_k": 8, "init": "x",
                       "candidates": 8} | (attack or {}),
            "inputs": {"corpus": str(corpus), "cases": 2, "prompt_tokens": 12, "continuation_tokens": 6} | (inputs or {}),
            "data": {"corpus": str(corpus), "seq_len": 32, "num_sequences": 2}, "output_dir": str(out)} | top
    return yaml.safe_dump(spec, sort_keys=False)


def spec_of(text: str):
    from sensray.adversarial.spec import parse_adversarial_spec

    return parse_adversarial_spec(text)
