"""Gradients through quantized storage: d loss / d weight for every dequantized weight, and for every statistic.

    with taps(model) as ghosts:                 # weight name -> a leaf whose gradient is d loss / d W
        loss.backward()                         # (sensray.saliency.gradients.backward_pass does this)
    spaces = code_spaces(module, "blocks.3.mlp.down.weight", grad)   # canonical tensor -> FlipSpace

Integer codes have no gradient, but the weight they encode does: a bitsandbytes Linear computes
y = x W^T + b with W = dequantize(codes, statistics). Inside `taps`, each quantized Linear runs its own
forward (the exact output every metric sees) through an autograd Function whose backward returns
dL/dx = dL/dy W (W dequantized for that moment only) and dL/dW = dL/dy^T x into a *ghost*: a leaf of
W's shape whose storage is one element (a stride-0 view), so it costs nothing until autograd hands it
the gradient. Autograd sums every use of a leaf before it runs the leaf's AccumulateGrad once per
backward, so the post-accumulate hook sensray already puts on float parameters sees each quantized
weight's complete gradient too, and frees it: peak memory stays weights + activations.

From dL/dW everything bitsandbytes stores gets its gradient by the chain rule, in the decoded value of
each stored element (what a row's `changes` records as old -> new):

    int8      w[r, c] = q[r, c] * scale[r],  q = code / 127      dL/dscale[r]  = sum_c g[r, c] q[r, c]
    4-bit     w[i] = table[code[i]] * absmax[i // 64]           dL/dabsmax[j] = sum_(i in j) g[i] table[code[i]]
    double q. absmax[j] = scale_code[s[j]] * scale2[j // 256] + scale_offset
              dL/dscale2[m] = sum_(j in m) scale_code[s[j]] dL/dabsmax[j];  dL/dscale_offset = sum_j dL/dabsmax[j]
              dL/dscale_code[t] = sum_(j: s[j] = t) scale2[j // 256] dL/dabsmax[j]

so a flip of any stored bit predicts g * (new value - old value), as a float weight's flip does: a
code flip through the format's table (int8: two's complement), a float32 statistic's through its bits,
an 8-bit scale code's through the double-quantization table.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from sensray.patching import forwards_replaced
from sensray.quantized.elements import QUANTIZED_FIELDS, _table, signed8
from sensray.quantized.storage import NESTED_BLOCK, blocksize, format_of, nested, part_tensor, quantized_weights
from sensray.saliency.flips import FlipSpace, float_space


def dequantized(module: nn.Module) -> torch.Tensor:
    """The weight a quantized Linear multiplies by, [out, in] in float32 (on its device)."""
    if format_of(module) == "int8":
        return part_tensor(module, "").float() * (part_tensor(module, "scale").float()[:, None] / 127)
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(module.weight.data, module.weight.quant_state).float()


class _Tap(torch.autograd.Function):
    """bitsandbytes' forward; a backward that also gives the dequantized weight (the ghost) its gradient."""

    @staticmethod
    def forward(ctx, x, ghost, bias, module, forward):
        ctx.module = module
        ctx.save_for_backward(x)
        return forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).float()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ dequantized(ctx.module)).to(x.dtype).reshape(x.shape)
        grad_w = g.T @ x.reshape(-1, x.shape[-1]).float() if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0).to(ctx.module.bias.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


@contextlib.contextmanager
def taps(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside, every quantized Linear's weight has a ghost leaf (by the weight's name) that gets dL/dW."""
    modules = quantized_weights(model)
    ghosts = {name: _ghost(module) for name, module in modules.items()}
    with forwards_replaced((modules[name], _tapped(modules[name], ghost)) for name, ghost in ghosts.items()):
        yield ghosts


def _ghost(module: nn.Module) -> torch.Tensor:
    """A leaf of the weight's [out, in] shape over one float32 element (stride 0): it only collects dL/dW."""
    device = part_tensor(module, "").device
    shape = (module.out_features, module.in_features)
    return torch.zeros((), dtype=torch.float32, device=device).expand(shape).detach().requires_grad_(True)


def _tapped(module: nn.Module, ghost: torch.Tensor):
    original = module.forward  # the forward it runs now (an instance-level one accelerate installed, if any)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _Tap.apply(x, ghost, module.bias, module, original)

    return forward


# -- flip spaces of a quantized weight: its codes and each statistic ----------------------------------------


def spaces_of(model: nn.Module, name: str, weight: torch.Tensor, grad: torch.Tensor, refs) -> dict[str, FlipSpace]:
    """Canonical name -> FlipSpace of each selected tensor (TensorRef) stored in parameter `name`, given the
    (dequantized) weight and dL/dW a backward pass handed over: a float tensor or view as itself, a quantized
    weight's codes and statistics through the chain rule."""
    module = quantized_weights(model).get(name)
    if module is None:
        return {ref.name: float_space(ref.name, _view(ref, weight), _view(ref, grad)) for ref in refs}
    if any(ref.select is not None for ref in refs):  # the bitflip kind refuses these too, at --dry-run
        raise ValueError(f"{refs[0].name}: a slice of a fused quantized weight; target the fused weight")
    ref = refs[0]
    codes = ref.name if ref.part is None else ref.name[: -len(ref.part) - 1]  # blocks.3.mlp.down.weight[.scale]
    return code_spaces(module, codes, grad)


def _view(ref, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if ref.select is None else ref.select(tensor)


def code_spaces(module: nn.Module, name: str, grad: torch.Tensor) -> dict[str, FlipSpace]:
    """Canonical tensor name -> its FlipSpace, for the codes (`name`) and every statistic (`name.scale`, ...),
    given dL/dW ([out, in]) of the quantized weight `name`."""
    g = grad.reshape(-1).double()
    if format_of(module) == "int8":
        return _int8_spaces(module, name, g)
    return _4bit_spaces(module, name, g)


def _int8_spaces(module: nn.Module, name: str, g: torch.Tensor) -> dict[str, FlipSpace]:
    codes = part_tensor(module, "").reshape(-1).view(torch.uint8)
    scale = part_tensor(module, "scale")
    columns = module.in_features
    wide = scale.double()

    def value(sl: slice, code: torch.Tensor) -> torch.Tensor:  # code * scale / 127 in float64, as a row records it
        rows = torch.arange(sl.start, sl.start + len(code), device=code.device) // columns
        return signed8(code.long()).double() * wide[rows] / 127

    spaces = {name: FlipSpace(name, "int8", (module.out_features, columns), QUANTIZED_FIELDS["int8"], codes, g, value)}
    q = signed8(codes.long()).double() / 127
    spaces[f"{name}.scale"] = float_space(f"{name}.scale", scale, (g * q).reshape(-1, columns).sum(1), statistic=True)
    return spaces


def _4bit_spaces(module: nn.Module, name: str, g: torch.Tensor) -> dict[str, FlipSpace]:
    fmt, block = format_of(module), blocksize(module)
    n = module.out_features * module.in_features
    byte = part_tensor(module, "").reshape(-1)
    codes = torch.stack([byte >> 4, byte & 0xF], dim=1).reshape(-1)[:n]  # element 2k: byte k's high nibble
    table = _table(fmt).to(codes.device)
    absmax = _block_scales(module)

    def value(sl: slice, code: torch.Tensor) -> torch.Tensor:
        blocks = torch.arange(sl.start, sl.start + len(code), device=code.device) // block
        return (table[code.long()] * absmax[blocks]).double()  # float32 product, as the kernels compute it

    spaces = {name: FlipSpace(name, fmt, (module.out_features, module.in_features), QUANTIZED_FIELDS[fmt], codes, g,
                              value)}
    per_block = torch.zeros(math.ceil(n / block), dtype=torch.float64, device=g.device)
    per_block.index_add_(0, torch.arange(n, device=g.device) // block, g * table[codes.long()].double())
    if not nested(module):
        spaces[f"{name}.scale"] = float_space(f"{name}.scale", part_tensor(module, "scale"), per_block, statistic=True)
        return spaces
    return spaces | _nested_spaces(module, name, per_block)


def _block_scales(module: nn.Module) -> torch.Tensor:
    """The 4-bit blocks' absmax in float32 on the module's device, decoded step by step when double-quantized."""
    scale = part_tensor(module, "scale")
    if scale.dtype != torch.uint8:
        return scale.float()
    index = torch.arange(len(scale), device=scale.device) // NESTED_BLOCK
    return part_tensor(module, "scale_code")[scale.long()] * part_tensor(module, "scale2")[index] + \
        part_tensor(module, "scale_offset")


def _nested_spaces(module: nn.Module, name: str, per_block: torch.Tensor) -> dict[str, FlipSpace]:
    """The double-quantized statistics: 8-bit block scale codes, their float32 scales, offset and table."""
    index8 = part_tensor(module, "scale")
    table, scale2, offset = (part_tensor(module, p) for p in ("scale_code", "scale2", "scale_offset"))
    group = torch.arange(len(index8), device=index8.device) // NESTED_BLOCK

    def value(sl: slice, code: torch.Tensor) -> torch.Tensor:
        return (table[code.long()] * scale2[group[sl]] + offset).double()

    by_code = torch.zeros(len(table), dtype=torch.float64, device=per_block.device)
    by_code.index_add_(0, index8.long(), scale2[group].double() * per_block)
    by_group = torch.zeros(len(scale2), dtype=torch.float64, device=per_block.device)
    by_group.index_add_(0, group, table[index8.long()].double() * per_block)
    return {
        f"{name}.scale": FlipSpace(f"{name}.scale", "index8", tuple(index8.shape), QUANTIZED_FIELDS["index8"],
                                   index8.reshape(-1), per_block, value, statistic=True),
        f"{name}.scale2": float_space(f"{name}.scale2", scale2, by_group, statistic=True),
        f"{name}.scale_offset": float_space(f"{name}.scale_offset", offset, per_block.sum().reshape(1),
                                            statistic=True),
        f"{name}.scale_code": float_space(f"{name}.scale_code", table, by_code, statistic=True),
    }
