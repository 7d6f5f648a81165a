"""A checksum of every weight's bytes, to prove a sweep left the model as it found it."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from sensray.perturbations.base import as_bits
from sensray.quantized.storage import buffers


def weights_checksum(model: nn.Module) -> str:
    """blake2b over every parameter and buffer (name, dtype, shape, raw bytes), in a stable order.

    A quantized model's parameters hold its codes; its scales and tables live in bitsandbytes'
    own state (`buffers`), so they are added by name: the checksum covers every stored bit."""
    digest = hashlib.blake2b(digest_size=16)
    tensors = dict(model.named_parameters(remove_duplicate=True)) | dict(model.named_buffers()) | buffers(model)
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        # bfloat16 has no numpy dtype; its bits as int16 are the same bytes.
        raw = as_bits(tensor).contiguous().cpu()
        digest.update((raw.to(torch.uint8) if raw.dtype == torch.bool else raw).numpy())
    return digest.hexdigest()
