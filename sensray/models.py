"""Which model a spec names, and loading it through transformers.

A name is an alias (`--list-models`), a Hugging Face id, or a local directory in HF format.
Weights load from safetensors when the checkpoint has them and otherwise only through
`torch.load(weights_only=True)`: a model is never unpickled. `HF_TOKEN` is read from the
environment or a `.env` file and handed to the Hub client only; it is never logged or
written. `HF_HUB_OFFLINE=1` is honoured by the Hub client itself.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from sensray.errors import SensrayError
from sensray.spec import ModelSpec

BUNDLED_MODEL = Path(__file__).parent / "assets" / "tiny-llama"

# The seed framework's models, plus the one sensray ships.
ALIASES: dict[str, str] = {
    "sensray-tiny": str(BUNDLED_MODEL),
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "gpt-neo-125m": "EleutherAI/gpt-neo-125m",
    "gpt-neo-1.3b": "EleutherAI/gpt-neo-1.3B",
    "gpt-j-6b": "EleutherAI/gpt-j-6b",
    "opt-350m": "facebook/opt-350m",
    "opt-1.3b": "facebook/opt-1.3b",
    "bloom-560m": "bigscience/bloom-560m",
    "bloom-1b1": "bigscience/bloom-1b1",
    "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-410m": "EleutherAI/pythia-410m",
    "falcon-rw-1b": "tiiuae/falcon-rw-1b",
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Where configs keep the longest sequence the model takes, by family (GPT-J/GPT-2 say n_positions).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def resolve_name(name: str) -> str:
    """Alias -> HF id or path; anything else passes through."""
    return ALIASES.get(name, name)


def hub_token(env_file: Path = Path(".env")) -> str | None:
    """HF_TOKEN from the environment, else from a `.env` file in the working directory."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    if env_file.is_file():
        for line in env_file.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.strip().removeprefix("export ").partition("=")
            if sep and key.strip() == "HF_TOKEN":
                return value.strip().strip("'\"") or None
    return None


def _hub_kwargs(spec: ModelSpec) -> dict:
    source = resolve_name(spec.name)
    kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if Path(source).is_dir():
        kwargs["local_files_only"] = True
    else:
        kwargs["token"] = hub_token()
    return {k: v for k, v in kwargs.items() if v is not None}


def load_config(spec: ModelSpec):
    from transformers import AutoConfig

    source = resolve_name(spec.name)
    try:
        return AutoConfig.from_pretrained(source, **_hub_kwargs(spec))
    except (OSError, ValueError) as err:
        raise SensrayError(f"model.name: cannot load config of {spec.name!r} ({source}): {_first_line(err)}") from None


def meta_model(spec: ModelSpec) -> nn.Module:
    """The model's structure with no weights (meta device): resolves targets without loading anything."""
    from transformers import AutoModelForCausalLM

    from sensray.quantized.loading import quantize_meta

    config = load_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code
        )
    return quantize_meta(model, spec).eval()  # a quantized spec: the bitsandbytes modules loading builds


def pick_device(spec: ModelSpec) -> torch.device:
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise SensrayError("model.device: 'cuda' was asked for but no CUDA device is available")
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec.device)


def load_model(spec: ModelSpec, device: torch.device | None = None, device_map: str | None = None) -> nn.Module:
    """Load weights once, in eval mode, on one device (or spread over a node's GPUs: device_map="auto").

    A quantized spec loads through transformers' BitsAndBytesConfig, quantizing as the weights are
    placed (`device_map`), then sensray.quantized.loading.prepare settles where its bits live."""
    from transformers import AutoModelForCausalLM

    from sensray.quantized.loading import check_device, config, prepare

    device = device or pick_device(spec)
    quantization = config(spec)
    if quantization is not None:
        check_device(spec, device)
        device_map = device_map or {"": str(device)}  # a bitsandbytes model is quantized where it is placed
    source = resolve_name(spec.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[spec.dtype], weights_only=True, quantization_config=quantization,
            device_map=device_map, **_hub_kwargs(spec)
        )
    except (OSError, ValueError, pickle.UnpicklingError, SafetensorError) as err:  # a .bin holding more than
        # tensors; a truncated or corrupt .safetensors
        raise SensrayError(f"model.name: cannot load {spec.name!r} ({source}): {_first_line(err)}") from None
    model = model if device_map is not None else model.to(device)
    return prepare(model).eval()


def context_length(config) -> tuple[str, int] | None:
    """(config key, the longest sequence the model takes), or None for a family without a limit (ALiBi)."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def check_weights(spec: ModelSpec) -> None:
    """A local checkpoint's weight files are there and their safetensors headers read, without loading them.

    safe_open reads the header and checks that it covers the file exactly, so a truncated or
    overwritten file fails here, in a second, instead of in every replica after the driver has
    started. A Hub id is checked by the Hub client when the weights are fetched.
    """
    source = Path(resolve_name(spec.name))
    if not source.is_dir():
        return
    shards = _listed_shards(source)
    missing = [name for name in shards if not (source / name).is_file()]
    if missing:
        raise SensrayError(f"model.name: {source} is missing {missing[0]} (listed in its index; "
                           f"{len(missing)} of {len(shards)} shards missing)")
    files = sorted(source.glob("*.safetensors"))
    if not files and not any(source.glob("*.bin")):
        raise SensrayError(f"model.name: {source} has no weights (*.safetensors or *.bin)")
    for path in files:
        _check_safetensors(path)


def _listed_shards(source: Path) -> list[str]:
    import json

    index = source / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise SensrayError(f"model.name: {index}: not a readable shard index ({_first_line(err)})") from None


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            file.keys()
    except (OSError, SafetensorError) as err:
        raise SensrayError(f"model.name: {path}: not a readable safetensors file "
                           f"({_first_line(err)}; truncated or corrupt? copy it again)") from None


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    source = resolve_name(spec.name)
    try:
        return AutoTokenizer.from_pretrained(source, **_hub_kwargs(spec))
    except (OSError, ValueError) as err:
        raise SensrayError(f"model.name: cannot load tokenizer of {spec.name!r}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
