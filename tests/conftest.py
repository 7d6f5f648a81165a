"""Shared fixtures: tiny in-process models (no network), spec files in temp dirs, one local Ray."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

# No test may reach a model hub; loading code must work from local files alone.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a shared machine lose much to them: threads that
    wait on each other stall every op (a local sweep of the shipped model: 13.8 s with torch's 2 threads
    on 2 busy cores, 1.4 s with one). Ray replicas and subprocesses set their own."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_spec(tmp_path):
    """Write a YAML spec (dedented) into tmp_path and return its path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def char_tokenizer():
    """One token per character (printable ASCII + newline), built in-process."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)} | {"[UNK]": len(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model dir, corpus): a random tiny Llama with a character tokenizer on disk (tests/ray_support.py)."""
    from ray_support import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def _shared_ray():
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray(_shared_ray):
    """One local Ray for every test that asks for it, started the way the executor starts it (bound to
    127.0.0.1) on first use and stopped at the end of the session. Starting Ray costs seconds; a test
    that needs its own (a multi-node Cluster) shuts this one down, and the next test here restarts it."""
    import ray

    from sensray.executors.ray import connect

    if not ray.is_initialized():
        connect(None, num_cpus=2)
    return ray
