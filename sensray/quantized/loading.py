"""Loading a quantized replica through transformers' BitsAndBytesConfig, and its meta-model twin.

    model:
      name: sensray-tiny
      quantization: nf4          # none | int8 | nf4 | fp4
      double_quant: true         # 4-bit: quantize the block scales again (QLoRA's setting)
      compute_dtype: bfloat16    # 4-bit: the dtype the dequantized matmul runs in

    sensray sweep experiments/bitflip-int8.yaml --executor local

`config(spec)` is the BitsAndBytesConfig a spec asks for; `quantize_meta(model, spec)` gives a meta
model the same quantized module tree (transformers' own bnb replacement, so the head, the
embeddings and the norms stay float exactly as on load); `prepare(model)` settles where the bits
live before anything is measured:

- int8: bitsandbytes moves the codes and row scales from `weight.CB/SCB` to `module.state` on the
  first forward; `prepare` makes that move once (`init_8bit_state`), so checksums, flips and
  restores all see the buffers every later forward reads.
- 4-bit: on a CPU with AVX512-BF16 the first eval forward would repack the codes into a CPU-only
  layout and replace the (double-quantized) block scales by bfloat16 copies. `prepare` turns that
  repacking off: the storage stays bitsandbytes' canonical layout, the one CUDA reads, so a flip
  means the same thing on every device (at the cost of that CPU kernel's speed).
- 4-bit biases are cast to the compute dtype up front (bitsandbytes would do it on the first
  forward, in place, after the load-time checksum).
- bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every int8 matmul; a
  filter on its logger drops that line while (and only while) the model sensray loaded runs.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from sensray.errors import SensrayError, SpecError
from sensray.quantized.storage import format_of, loaded, quantized_modules

BNB_LOGGER = "bitsandbytes.autograd._functions"
CAST_NOTICE = "MatMul8bitLt: inputs will be cast"
INSTALL = "pip install 'sensray[quant]' (bitsandbytes)"


def config(spec):
    """The BitsAndBytesConfig of a ModelSpec, None when it is not quantized."""
    if spec.quantization == "none":
        return None
    require_bitsandbytes(spec.quantization)
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        threshold = 6.0 if spec.int8_threshold is None else spec.int8_threshold
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=spec.quantization, bnb_4bit_use_double_quant=bool(spec.double_quant),
        bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype or spec.dtype),
    )


def require_bitsandbytes(quantization: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SpecError("model.quantization", f"{quantization} needs bitsandbytes, which is not installed; {INSTALL}")


def check_device(spec, device: torch.device) -> None:
    """The installed bitsandbytes can run this quantization on `device` (its native library for CUDA)."""
    if spec.quantization == "none":
        return
    require_bitsandbytes(spec.quantization)
    import bitsandbytes
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    supported = getattr(bitsandbytes, "supported_torch_devices", {"cpu", "cuda"})
    if device.type not in supported:
        raise SpecError("model.quantization", f"{spec.quantization}: bitsandbytes {bitsandbytes.__version__} has no "
                                              f"{device.type} backend (it supports {', '.join(sorted(supported))})")
    if device.type == "cuda" and isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        raise SpecError("model.quantization", f"{spec.quantization}: bitsandbytes {bitsandbytes.__version__} found "
                                              f"no CUDA library for this torch (CUDA {torch.version.cuda}); reinstall "
                                              "it for this CUDA version")


def quantize_meta(model: nn.Module, spec) -> nn.Module:
    """Give a meta model the quantized module tree that loading `spec` builds (no weights, no device)."""
    bnb_config = config(spec)
    if bnb_config is None:
        return model
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    quantizer.preprocess_model(model, device_map={"": "cpu"}, keep_in_fp32_modules=model._keep_in_fp32_modules)
    model.config.quantization_config = bnb_config
    return model


def prepare(model: nn.Module) -> nn.Module:
    """Settle a loaded quantized model's storage (see the module docstring); a no-op for a float model."""
    modules = quantized_modules(model)
    for path, module in modules.items():
        if not loaded(module):
            raise SensrayError(f"{path}: a bitsandbytes module without quantized data (was it moved after loading?)")
        if format_of(module) == "int8":
            _settle_int8(path, module)
        else:
            _settle_4bit(path, module)
    if any(format_of(m) == "int8" for m in modules.values()):
        quiet_cast_notice(model)
    return model


def _settle_int8(path: str, module: nn.Module) -> None:
    if module.weight.CB is not None:
        module.init_8bit_state()  # what bitsandbytes does on the first forward
    state = module.state
    if state.has_fp16_weights or state.CB is None or state.CB.data_ptr() != module.weight.data_ptr():
        raise SensrayError(f"{path}: bitsandbytes keeps its int8 codes somewhere sensray does not expect "
                           "(sensray is tested with bitsandbytes 0.50); its flips would miss the forward")


def _settle_4bit(path: str, module: nn.Module) -> None:
    module.support_avx512bf16_for_cpu = False  # keep the canonical layout on every CPU
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        raise SensrayError(f"{path}: already repacked for the CPU kernel; load the model with sensray")
    if module.bias is not None and module.compute_dtype is not None and module.bias.dtype != module.compute_dtype:
        module.bias.data = module.bias.data.to(module.compute_dtype)


class _DropCastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CAST_NOTICE)


_FILTER = _DropCastNotice()


def quiet_cast_notice(model: nn.Module) -> None:
    """Drop bitsandbytes' per-call int8 cast notice while this model's forward runs, and only then."""
    logger = logging.getLogger(BNB_LOGGER)

    def on(module, args):
        logger.addFilter(_FILTER)

    def off(module, args, output):
        logger.removeFilter(_FILTER)

    model.register_forward_pre_hook(on)
    model.register_forward_hook(off, always_call=True)


def describe(spec) -> str:
    """How a ModelSpec stores its weights, in a few words: `float32`, `int8 (float32 elsewhere)`, ..."""
    if spec.quantization == "none":
        return spec.dtype
    extra = []
    if spec.quantization != "int8":
        extra += ["double quant"] if spec.double_quant else []
        extra += [f"compute {spec.compute_dtype}"] if spec.compute_dtype else []
    elif spec.int8_threshold is not None:
        extra += [f"threshold {spec.int8_threshold:g}"]
    return ", ".join([spec.quantization, *extra, f"{spec.dtype} elsewhere"])
