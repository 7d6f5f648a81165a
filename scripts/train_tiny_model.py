"""Train the tiny Llama model that sensray ships inside its package.

sensray needs a real (if small) causal LM to run its sweeps and tests on
without network access.  This script builds one from scratch, on a CPU, in a
few minutes:

* Text: ``pydoc_data.topics.topics``, the ~465 KB of English prose about Python
  that ships with every CPython.  Topic keys are sorted; every 10th topic
  (index ``i % 10 == 5``) is held out for evaluation, the rest is training
  text.  Topics are joined with blank lines.  Topics quote each other
  verbatim, so paragraphs of the held-out text are removed from the training
  topics (see `load_splits`).
* Tokenizer: a byte-level BPE (vocab 2048) trained with ``tokenizers``, with a
  single special token ``<|endoftext|>`` used as bos/eos/unk/pad.  No special
  tokens are added on encode, so ``decode(encode(text)) == text``.
* Model: a ``LlamaConfig`` model (8 layers, hidden 128, 4 heads, ~2M params,
  tied embeddings) trained with AdamW and a cosine schedule with warmup on
  random 128-token windows of the training tokens.  ~110k training tokens
  are few for 2M parameters: unregularised, the held-out loss turns up after
  ~500 steps (~9 epochs).  The defaults (800 steps of 16 windows, weight
  decay 1.0, attention dropout 0.2) were chosen by watching the held-out
  loss; they take ~5 minutes on 2 idle CPU cores.  (Tried: 600-1800 steps, weight decay 0.1-2.0, attention dropout
  0-0.3; held-out ppl 50-138.)
* Evaluation: held-out perplexity with the standard protocol: the held-out
  text is tokenized whole, cut into non-overlapping 128-token windows (the
  tail is dropped), and the token-weighted mean NLL is exponentiated.

Outputs (all under ``sensray/assets/``):

* ``tiny-llama/``: config.json, generation_config.json, model.safetensors
  (float32), tokenizer files, and ``sensray.json`` with training metadata.
* ``corpus/pydoc_heldout.txt``: the held-out text, sensray's default eval
  corpus.  The training text is not shipped.

Runs are reproducible on the same machine (fixed seeds, fixed thread count).
Note that ``pydoc_data`` follows the CPython version, so a different Python
gives a (slightly) different corpus; the version used is recorded.

Example:

    python scripts/train_tiny_model.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from sensray.corpus import load_splits

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "sensray" / "assets" / "tiny-llama"
HELDOUT_PATH = REPO_ROOT / "sensray" / "assets" / "corpus" / "pydoc_heldout.txt"

SPECIAL_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 2048
SEQ_LEN = 128
MAX_FILE_BYTES = 10 * 1024 * 1024

# Every file save_pretrained may write into MODEL_DIR; cleared before saving
# so that no stale file from an older run survives.
ASSET_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sensray.json",
)


def parse_args() -> argparse.Namespace:
    """Command-line knobs; the defaults are the settings of the shipped model."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=60, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=1.0)
    p.add_argument("--attention-dropout", type=float, default=0.2,
                   help="dropout on attention probabilities (training only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100, help="held-out eval period")
    p.add_argument("--log-every", type=int, default=50, help="train-loss print period")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-save", action="store_true", help="train and evaluate only")
    return p.parse_args()


def train_tokenizer(text: str) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE on `text`.

    All 256 byte symbols are in the initial alphabet, so any string encodes
    without unknown tokens.  No post-processor: encode adds no bos/eos.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    assert tok.token_to_id(SPECIAL_TOKEN) == 0
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw `tokenizers` object so transformers can save and load it."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        model_max_length=256,  # = max_position_embeddings
    )


def check_round_trip(tokenizer, texts: list[str]) -> None:
    """decode(encode(text)) must give back `text` exactly."""
    for text in texts:
        ids = tokenizer(text, verbose=False)["input_ids"]  # default call: adds no bos/eos
        assert tokenizer.decode(ids) == text, "tokenizer does not round-trip"


def build_model(seed: int, attention_dropout: float = 0.0) -> LlamaForCausalLM:
    """A freshly initialised ~2M-parameter Llama (float32).

    Llama has no residual/MLP dropout; attention dropout is its only dropout
    and is inactive in eval mode, so it does not affect sweeps or evaluation.
    """
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attention_dropout=attention_dropout,
        dtype="float32",  # transformers 5.x name; 4.x called it torch_dtype
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (the tied embedding / lm_head counts once)."""
    return sum(p.numel() for p in model.parameters())


def sample_batch(ids: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of SEQ_LEN tokens from the 1-D tensor `ids`."""
    starts = torch.randint(0, len(ids) - SEQ_LEN + 1, (batch_size,), generator=gen)
    return torch.stack([ids[s : s + SEQ_LEN] for s in starts.tolist()])


def lm_loss(model: LlamaForCausalLM, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: token t predicts token t+1 within each window."""
    logits = model(input_ids=batch).logits[:, :-1]
    targets = batch[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction
    )


@torch.no_grad()
def heldout_nll(
    model: LlamaForCausalLM, ids: torch.Tensor, max_windows: int | None = None
) -> tuple[float, int]:
    """Token-weighted mean NLL over non-overlapping SEQ_LEN windows of `ids`.

    The tail shorter than a window is dropped.  Returns (mean NLL in nats,
    number of predicted tokens); each window predicts SEQ_LEN - 1 tokens.
    """
    was_training = model.training
    model.eval()
    n_windows = len(ids) // SEQ_LEN
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * SEQ_LEN].view(n_windows, SEQ_LEN)
    total, count = 0.0, 0
    for chunk in windows.split(16):
        total += lm_loss(model, chunk, reduction="sum").item()
        count += chunk.numel() - chunk.size(0)
    model.train(was_training)
    return total / count, count


def train(model, train_ids, heldout_ids, args) -> dict:
    """AdamW + cosine-with-warmup on random windows; returns a loss history."""
    params_decay = [p for p in model.parameters() if p.dim() >= 2]
    params_no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm gains
    optimizer = torch.optim.AdamW(
        [
            {"params": params_decay, "weight_decay": args.weight_decay},
            {"params": params_no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    history = {"step": [], "heldout_nll": []}
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        loss = lm_loss(model, sample_batch(train_ids, args.batch_size, gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if step % args.log_every == 0:
            elapsed = time.perf_counter() - start
            tok_s = step * args.batch_size * SEQ_LEN / elapsed
            print(f"step {step:5d}  train loss {running / args.log_every:.4f}  "
                  f"lr {scheduler.get_last_lr()[0]:.2e}  {tok_s:,.0f} tok/s  {elapsed:.0f}s", flush=True)
            running = 0.0
        if step % args.eval_every == 0 or step == args.steps:
            nll, _ = heldout_nll(model, heldout_ids)
            history["step"].append(step)
            history["heldout_nll"].append(round(nll, 4))
            print(f"step {step:5d}  held-out loss {nll:.4f}  ppl {math.exp(nll):.2f}", flush=True)
    model.eval()
    return history


def save_assets(model, tokenizer, heldout_text: str, metadata: dict) -> None:
    """Write the model, tokenizer, metadata and held-out corpus into the package."""
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        (MODEL_DIR / name).unlink(missing_ok=True)
    model.save_pretrained(MODEL_DIR)  # safetensors is the default (only, in 5.x) format
    tokenizer.save_pretrained(MODEL_DIR)
    patch_tokenizer_config()
    for path in MODEL_DIR.iterdir():
        path.chmod(0o644)  # save_pretrained may leave 0600 files; packaged assets must be world-readable
    size = (MODEL_DIR / "model.safetensors").stat().st_size
    assert size <= MAX_FILE_BYTES, f"model.safetensors is {size} bytes"
    metadata["files"]["model.safetensors_bytes"] = size
    (MODEL_DIR / "sensray.json").write_text(json.dumps(metadata, indent=2) + "\n")
    HELDOUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    HELDOUT_PATH.write_text(heldout_text, encoding="utf-8")


def patch_tokenizer_config() -> None:
    """Keep the tokenizer loadable by transformers 4.x as well as 5.x.

    5.x writes tokenizer_class "TokenizersBackend", a name 4.x does not know;
    "PreTrainedTokenizerFast" is an alias of it in 5.x and the real class in
    4.x.  4.x also reads special_tokens_map.json, which 5.x no longer writes.
    """
    path = MODEL_DIR / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    special = {k: SPECIAL_TOKEN for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (MODEL_DIR / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def verify_saved(expected_nll: float) -> None:
    """Reload the saved assets like a user would and re-check them."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = LlamaForCausalLM.from_pretrained(MODEL_DIR)
    text = HELDOUT_PATH.read_text(encoding="utf-8")
    check_round_trip(tokenizer, [text])
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])  # as sensray.data does
    nll, _ = heldout_nll(model, ids)
    assert abs(nll - expected_nll) < 1e-4, (nll, expected_nll)
    print(f"reloaded from {MODEL_DIR}: held-out ppl {math.exp(nll):.2f} (matches)")


def build_metadata(args, model, history, nll, n_tokens, n_heldout, n_train, timing) -> dict:
    """The human-readable record stored as tiny-llama/sensray.json."""
    return {
        "description": "Tiny Llama trained from scratch by scripts/train_tiny_model.py "
        "on CPython's pydoc_data.topics (English prose about Python).",
        "parameters": count_params(model),
        "data": {
            "source": "pydoc_data.topics.topics",
            "split": "sorted topic keys; keys[i] with i % 10 == 5 held out; topics joined with '\\n\\n'; "
            "paragraphs that occur in the held-out text removed from the training topics",
            "heldout_topics": load_splits()[2],
            "train_tokens": n_train,
            "heldout_tokens": n_heldout,
            "heldout_file": "sensray/assets/corpus/pydoc_heldout.txt",
        },
        "tokenizer": {"type": "byte-level BPE", "vocab_size": VOCAB_SIZE,
                      "special_token": SPECIAL_TOKEN, "adds_special_tokens": False},
        "training": {
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": SEQ_LEN,
            "tokens_seen": args.steps * args.batch_size * SEQ_LEN,
            "optimizer": "AdamW(betas=(0.9, 0.95)), grad clip 1.0, no decay on norms",
            "lr": args.lr, "warmup_steps": args.warmup, "schedule": "cosine with warmup",
            "weight_decay": args.weight_decay, "attention_dropout": args.attention_dropout,
            "seed": args.seed, "threads": args.threads,
            **timing, "heldout_nll_history": history,
        },
        "eval": {
            "protocol": f"held-out text tokenized whole (no special tokens), non-overlapping "
            f"{SEQ_LEN}-token windows, tail dropped, token-weighted mean NLL",
            "heldout_nll": round(nll, 6), "heldout_ppl": round(math.exp(nll), 4),
            "heldout_predicted_tokens": n_tokens,
            "note": "hyperparameters (steps, weight decay, dropout) were chosen by watching this "
            "held-out loss, so the number is mildly optimistic",
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "files": {},
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    train_text, heldout_text, heldout_keys = load_splits()
    print(f"train {len(train_text):,} chars; held-out {len(heldout_text):,} chars "
          f"({len(heldout_keys)} topics: {', '.join(heldout_keys)})")

    tokenizer = wrap_tokenizer(train_tokenizer(train_text))
    check_round_trip(tokenizer, [train_text, heldout_text, "Héllo, wörld! ✓ 🐍\n\tx = 1"])
    encode = lambda text: torch.tensor(tokenizer(text, verbose=False)["input_ids"])
    train_ids, heldout_ids = encode(train_text), encode(heldout_text)
    print(f"tokens: train {len(train_ids):,}; held-out {len(heldout_ids):,}")

    model = build_model(args.seed, args.attention_dropout)
    print(f"model: {count_params(model):,} parameters")
    start, cpu_start = time.perf_counter(), time.process_time()
    history = train(model, train_ids, heldout_ids, args)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # Wall time depends on what else runs on the machine; CPU time much less so.
    timing = {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}
    nll, n_tokens = heldout_nll(model, heldout_ids)
    print(f"done in {wall:.0f}s: held-out ppl {math.exp(nll):.2f} on {n_tokens:,} tokens")

    if args.no_save:
        return
    metadata = build_metadata(args, model, history, nll, n_tokens,
                              len(heldout_ids), len(train_ids), timing)
    save_assets(model, tokenizer, heldout_text, metadata)
    verify_saved(nll)


if __name__ == "__main__":
    main()
