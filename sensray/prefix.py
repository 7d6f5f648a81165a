"""Prefix reuse: a trial that changes only blocks >= L recomputes only blocks L..end.

The eval batches are fixed, so what blocks 0..L-1 compute on them is the same in every trial
that leaves those blocks alone. A replica records each block's output once, during the
baseline forward, and a trial whose perturbation touches nothing before block L runs the model
with blocks 0..L-1 replaced by their recorded outputs:

    cache = PrefixCache.record(model, batches, budget_bytes)    # once, with unperturbed weights
    start = cache.start_for(undo)                                # first block the trial can change
    with cache.resume_at(start, batch_index):                    # blocks < start return recordings
        logits = model(input_ids=batch).logits

Why skip blocks instead of calling blocks L..end ourselves: the model's own forward still builds
what every family hands its blocks (causal masks, rotary tables, ALiBi, position ids), so
blocks L..end receive exactly what a full forward gives them, with no per-family glue. The
embedding lookup still runs (a gather, negligible); everything before block L is skipped.

Which block a trial touches comes from its undo record (`Undo.touches()`): tensors are mapped to
blocks through their storage (so fused q/k/v views and tied embeddings resolve correctly: a
tied embedding/lm_head is used before block 0, so such a trial runs in full), hooked modules
through the block that contains them. Anything unrecognised runs the full forward.

Memory: tokens x hidden x dtype bytes per recorded block. When the budget does not hold every
block, evenly spaced blocks are recorded and a trial resumes at the nearest recorded one
before its first touched block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from sensray.adapters import adapter_for
from sensray.architectures import components, decoder_blocks
from sensray.patching import forwards_replaced


def block_positions(model: nn.Module) -> tuple[dict[int, int], dict[int, int]]:
    """(storage address -> position, module id -> position) where the position is the index of
    the first decoder block that uses it: 0..n-1 for blocks, 0 for what runs before the blocks,
    n for the tail (final norm, output projection, head)."""
    blocks = decoder_blocks(model)
    n = len(blocks)
    tail = {slot.kind for slot in adapter_for(model.config).tail}
    storages: dict[int, int] = {}

    def note(tensor: torch.Tensor, position: int) -> None:
        key = tensor.untyped_storage().data_ptr()
        storages[key] = min(position, storages.get(key, position))

    for comp in components(model).values():
        position = comp.layer if comp.layer is not None else (n if comp.kind in tail else 0)
        for ref in comp.tensors:  # resolved: a quantized weight's statistics are storage of their own
            note(ref.resolve(model), position)
    for i, block in enumerate(blocks):  # parameters no canonical component names (raw HF ones)
        for param in block.parameters():
            note(param, i)
    for param in model.parameters():  # anything else: assume it runs before block 0
        storages.setdefault(param.untyped_storage().data_ptr(), 0)
    modules = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    return storages, modules


@dataclass
class PrefixCache:
    """Recorded outputs of decoder blocks on the eval batches, and where trials may resume."""

    blocks: nn.ModuleList
    storages: dict[int, int]
    modules: dict[int, int]
    starts: tuple[int, ...]  # blocks a trial may start at (>= 1): the previous block was recorded
    outputs: list[dict[int, Any]] = field(default_factory=list)  # per batch: block index -> its output

    @classmethod
    def record(cls, model: nn.Module, batches: list[torch.Tensor], budget_bytes: int | None) -> "PrefixCache":
        """Run the baseline forward once and keep what the budget allows (None: every block)."""
        blocks = decoder_blocks(model)
        storages, modules = block_positions(model)
        hidden = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim
        per_block = sum(b.numel() for b in batches) * hidden * next(model.parameters()).element_size()
        starts = _spaced_starts(len(blocks), budget_bytes // per_block if budget_bytes is not None else len(blocks))
        cache = cls(blocks, storages, modules, starts)
        kept = {s - 1 for s in starts}
        current: dict[int, Any] = {}

        def keep(index: int):
            def hook(module, args, output):
                current[index] = output

            return hook

        handles = [blocks[i].register_forward_hook(keep(i)) for i in sorted(kept)]
        try:
            with torch.inference_mode():
                for batch in batches:
                    current = {}
                    model(input_ids=batch, use_cache=False)
                    cache.outputs.append(current)
        finally:
            for handle in handles:
                handle.remove()
        return cache

    @property
    def bytes(self) -> int:
        return sum(_nbytes(out) for outputs in self.outputs for out in outputs.values())

    def first_touched(self, undo: Any) -> int:
        """The first block the perturbation behind `undo` can change (0: run in full)."""
        touches = getattr(undo, "touches", None)
        if touches is None:
            return 0
        first = len(self.blocks)
        for thing in touches():
            if isinstance(thing, nn.Module):
                first = min(first, self.modules.get(id(thing), 0))
            else:
                first = min(first, self.storages.get(thing.untyped_storage().data_ptr(), 0))
        return first

    def start_for(self, undo: Any) -> int:
        """The recorded block to resume at: the latest one not after the first touched block."""
        first = self.first_touched(undo)
        return max((s for s in self.starts if s <= first), default=0)

    @contextlib.contextmanager
    def resume_at(self, start: int, batch_index: int) -> Iterator[None]:
        """Inside, blocks 0..start-1 return what they returned at baseline on that batch."""
        if start == 0:
            yield
            return
        boundary = self.outputs[batch_index][start - 1]
        # Only the last skipped block's output feeds the live blocks; it is cloned so that a block that
        # updates its input in place can never corrupt the recording.
        replacements = [(self.blocks[i], _returning(_clone(boundary) if i == start - 1 else boundary))
                        for i in range(start)]
        with forwards_replaced(replacements):
            yield


def default_budget(device: torch.device) -> int:
    """A quarter of the device's free memory: the recordings must never crowd out the trials."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 2**30  # not Linux: assume 4 GiB are free


def _returning(output: Any):
    def forward(*args, **kwargs):
        return output

    return forward


def _spaced_starts(n: int, affordable: int) -> tuple[int, ...]:
    """Up to `affordable` resume points among blocks 1..n, spread evenly (all when affordable)."""
    if affordable >= n:
        return tuple(range(1, n + 1))
    if affordable <= 0:
        return ()
    # Resume points at fractions k/(m+1) of the depth maximise the blocks skipped by a trial
    # whose first touched block is uniform over the depth.
    return tuple(sorted({max(1, round(n * k / (affordable + 1))) for k in range(1, affordable + 1)}))


def _clone(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_clone(o) for o in output)
    return output


def _nbytes(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, tuple):
        return sum(_nbytes(o) for o in output)
    return 0
