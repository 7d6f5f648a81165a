"""The gradient of the eval loss with respect to every weight of a resident model, consumed as it is made.

    def consume(name, weight, grad): ...            # called once per parameter, grad then freed
    loss = backward_pass(model, batches, consume)   # one backward of the mean NLL over all their tokens

Memory. `loss.backward()` followed by reading `param.grad` holds a second copy of the model (13.5 GB
for a 7B model in bf16). Here every parameter gets a post-accumulate-grad hook: autograd runs a
parameter's AccumulateGrad node once per backward, after summing every use of it (tied embeddings
included), so the hook sees the parameter's complete gradient, hands it to `consume`, and sets
`param.grad = None` at once. At most the gradients autograd is still propagating are alive: peak
memory is weights + activations, never weights + a gradient per weight.

All batches go into ONE backward (their token-summed losses added first), so the gradient is that of
the mean NLL over every token, exactly what `sensray.metrics` reports as `nll`. Their activations
are alive together; `checkpoint=True` keeps only each decoder block's input and recomputes the
block during the backward (torch.utils.checkpoint), for large texts on large models.

Quantized weights (bitsandbytes int8, nf4, fp4) have integer codes and no gradient of their own: each
gets a ghost leaf of its dequantized shape (sensray.quantized.gradients) whose gradient is dL/dW, handed
to `consume` with the dequantized weight under the weight's name, exactly like a float parameter's.

`naive_gradients` is the ordinary way (backward per batch, `.grad` accumulated and kept): the
benchmark and the tests compare its memory and its scores with this one's.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

from sensray.architectures import decoder_blocks
from sensray.patching import forwards_replaced

Consumer = Callable[[str, torch.Tensor, torch.Tensor], None]  # (parameter name, weight, its gradient)


def parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Each float parameter once (tied embeddings: under their first name), in the model's order."""
    return [(name, p) for name, p in model.named_parameters(remove_duplicate=True) if p.dtype.is_floating_point]


def token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The summed next-token NLL of one (batch, seq) batch, in float32 (float64 for a float64 model)."""
    logits = model(input_ids=batch, use_cache=False).logits  # (batch, seq, vocab)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")


def backward_pass(model: nn.Module, batches: list[torch.Tensor], consume: Consumer, checkpoint: bool = False) -> float:
    """One backward of the mean NLL over every token of `batches`; `consume(name, weight, grad)` once per
    parameter as soon as its gradient is complete (then freed). Returns the loss."""
    named = parameters(model)
    was = [p.requires_grad for _, p in named]
    handles = []
    try:
        for name, param in named:
            param.requires_grad_(True)
            handles.append(param.register_post_accumulate_grad_hook(_hand_over(name, consume)))
        with torch.enable_grad(), _quantized(model, consume), \
                _checkpointed(model) if checkpoint else contextlib.nullcontext():
            tokens = sum(batch[:, 1:].numel() for batch in batches)
            loss = torch.stack([token_loss(model, batch) for batch in batches]).sum() / tokens
            loss.backward()
        return float(loss.detach())
    finally:
        for handle, (_, param), flag in zip(handles, named, was):
            handle.remove()
            param.grad = None
            param.requires_grad_(flag)


def _hand_over(name: str, consume: Consumer, weight: Callable[[], torch.Tensor] | None = None
               ) -> Callable[[nn.Parameter], None]:
    def hook(param: nn.Parameter) -> None:
        consume(name, param.detach() if weight is None else weight(), param.grad)
        param.grad = None  # the gradient is spent: free it before the next one is made

    return hook


@contextlib.contextmanager
def _quantized(model: nn.Module, consume: Consumer) -> Iterator[None]:
    """Quantized weights (bitsandbytes) get their gradient through a ghost leaf each
    (sensray.quantized.gradients); `consume` sees the dequantized weight and dL/dW under the weight's name."""
    from sensray.quantized.storage import is_quantized, quantized_weights

    if not is_quantized(model):
        yield
        return
    from sensray.quantized.gradients import dequantized, taps

    modules = quantized_weights(model)
    with taps(model) as ghosts:  # the ghosts (and their hooks) are dropped when it ends
        for name, ghost in ghosts.items():
            ghost.register_post_accumulate_grad_hook(_hand_over(name, consume, lambda m=modules[name]: dequantized(m)))
        yield


def naive_gradients(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ordinary way: a backward per batch accumulating `.grad`, every gradient kept (a model's worth)."""
    named = parameters(model)
    was = [p.requires_grad for _, p in named]
    tokens = sum(batch[:, 1:].numel() for batch in batches)
    try:
        for _, param in named:
            param.requires_grad_(True)
            param.grad = None
        with torch.enable_grad():
            for batch in batches:
                (token_loss(model, batch) / tokens).backward()
        return {name: param.grad for name, param in named}
    finally:
        for (_, param), flag in zip(named, was):
            param.grad = None
            param.requires_grad_(flag)


def _checkpointed(model: nn.Module):
    """Inside, every decoder block keeps only its input and recomputes itself during the backward."""
    return forwards_replaced((block, functools.partial(recompute, block.forward, use_reentrant=False))
                             for block in decoder_blocks(model))


def require_gradients(model: nn.Module, model_spec, key: str = "model") -> None:
    """Gradients need float weights or bitsandbytes' quantized storage (differentiated through its dequantized
    weight); integer weights of any other kind are a clear error, not a crash."""
    from sensray.errors import SpecError
    from sensray.quantized.storage import quantized_weights

    known = quantized_weights(model)
    codes = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point and name not in known]
    if codes:
        raise SpecError(f"{key}.name", f"{model_spec.name!r} stores {codes[0]} as {_dtype(model, codes[0])}, which "
                                       "sensray cannot differentiate; load it in a float dtype or with "
                                       "model.quantization (bitsandbytes)")


def _dtype(model: nn.Module, name: str) -> str:
    return str(model.get_parameter(name).dtype).removeprefix("torch.")
