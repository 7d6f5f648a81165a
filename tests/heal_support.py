"""What the heal tests share: a pruned export of the shipped model, and `sensray heal` run in-process small."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sensray.heal.cli import main

# 2 windows of 32 tokens per step, judged on 2 windows of 32 tokens: a step takes milliseconds.
SMALL = ["--batch-size", "2", "--seq-len", "32", "--set", "eval.num_sequences=2", "--set", "eval.seq_len=32",
         "--set", "eval.batch_size=2"]


def prune(out: Path, model: str = "sensray-tiny", *extra: str) -> Path:
    from sensray.prune import main as prune_main

    assert prune_main(["--model", model, "--method", "wanda", "--sparsity", "0.5", "--calib-sequences", "4",
                       "--output-dir", str(out), *extra]) == 0
    return out


def heal(capsys, model: Path, out: Path, method: str = "lora", steps: int = 3, *extra: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process `sensray heal`."""
    code = main(["--model", str(model), "--method", method, "--steps", str(steps), "--output-dir", str(out),
                 *SMALL, *map(str, extra)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))
