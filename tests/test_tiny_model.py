"""The tiny Llama shipped in sensray/assets/tiny-llama (built by scripts/train_tiny_model.py).

Loads it exactly as a user would (from_pretrained on the package directory, offline) and
checks that it is small, that its tokenizer is lossless, and that it is a trained model:
its perplexity on the bundled held-out corpus is far below the uniform guess (2048).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sensray

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_DIR = Path(sensray.__file__).parent / "assets" / "tiny-llama"
HELDOUT = Path(sensray.__file__).parent / "assets" / "corpus" / "pydoc_heldout.txt"
SEQ_LEN = 128
WINDOWS = 16
# Measured when the model was built: 16-window ppl 43.18 (full held-out ppl 50.51, in
# sensray.json). Uniform guessing over the 2048-token vocabulary would give 2048.
PPL_THRESHOLD = 50.0


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()


def test_files_are_present_and_small():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "sensray.json"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config.get("dtype", config.get("torch_dtype")) == "float32"


def test_model_matches_its_metadata(model):
    meta = json.loads((MODEL_DIR / "sensray.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"]
    assert model.config.vocab_size == 2048 and model.config.num_hidden_layers == 8
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tokenizer_round_trips(tokenizer):
    text = 'The "for" statement iterates over a sequence.  Non-ASCII: héllo ✓ 🐍\n\tx = 1\n'
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # BPE merges actually compress
    assert max(ids) < 2048


def test_heldout_perplexity(model, tokenizer):
    text = HELDOUT.read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])
    assert len(ids) >= WINDOWS * SEQ_LEN
    windows = ids[: WINDOWS * SEQ_LEN].view(WINDOWS, SEQ_LEN)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))
    ppl = math.exp(nll.item())
    assert ppl < PPL_THRESHOLD, ppl
