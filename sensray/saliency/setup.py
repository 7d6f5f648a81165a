"""What `sensray saliency` checks before it loads a weight: the model, the text, the runs to check.

    setup = Setup(args)        # raises SpecError (exit 2) naming the flag; writes nothing
    setup.describe()           # what --dry-run prints
    model, batches = setup.load()

With --check, the model, dtype and text are the checked runs' own (all of them must agree): a
prediction of another model's or another text's loss would be ranked against the wrong numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from sensray.errors import SensrayError, SpecError
from sensray.spec import DataSpec, ModelSpec, check_remote_code, describe

FLAGS = {"data.corpus": "--corpus", "data.text_field": "--corpus", "data.seq_len": "--seq-len",
         "data.num_sequences": "--num-sequences", "data.batch_size": "--batch-size", "corpus": "--corpus",
         "seq_len": "--seq-len", "num_sequences": "--num-sequences", "batch_size": "--batch-size"}
DATA_FLAGS = ("corpus", "seq_len", "num_sequences", "batch_size")


class Setup:
    def __init__(self, args: argparse.Namespace):
        from sensray.preflight import RUN_ID_LENGTH, check_creatable
        from sensray.saliency.check import CheckedRun

        self.args = args
        for name, low in (("top_k", 1), ("fisher_windows", 0)):
            if getattr(args, name) is not None and getattr(args, name) < low:
                raise SpecError(f"--{name.replace('_', '-')}", f"must be at least {low}, got {getattr(args, name)}")
        self.runs = [_flagged(lambda p=path: CheckedRun.read(p), "--check") for path in args.check]
        self.model, self.data = self._specs()
        check_remote_code(self.model, args.trust_remote_code)
        self.meta = self._meta()
        self.windows = self._windows()
        check_creatable(Path(args.output_dir) / "saliency", "--output-dir", RUN_ID_LENGTH)

    def _specs(self) -> tuple[ModelSpec, DataSpec]:
        a = self.args
        if not self.runs:
            data = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in DEFAULT_DATA.items()}
            return self._model(), _data(data)
        first = self.runs[0]
        for run in self.runs[1:]:
            if run.spec.model != first.spec.model or run.spec.data != first.spec.data:
                raise SpecError("--check", f"{run.path} measured another model or text than {first.path}; "
                                           "check runs of one model and eval text together")
        model = first.spec.model
        for flag, given, recorded in (("--model", a.model, model.name), ("--dtype", a.dtype, model.dtype),
                                      ("--quantization", a.quantization, model.quantization),
                                      ("--double-quant", a.double_quant or None, model.double_quant)):
            if given is not None and given != recorded:
                raise SpecError(flag, f"{given!r}, but {first.path} measured {recorded!r}: predictions are checked "
                                      "against the model the sweep measured (drop the flag)")
        given = [f"--{k.replace('_', '-')}" for k in DATA_FLAGS if getattr(a, k) is not None]
        if given:
            raise SpecError(given[0], f"with --check the text is the run's own ({first.spec.data.corpus}); drop it")
        return model.model_copy(update={"device": a.device}), first.spec.data

    def _model(self) -> ModelSpec:
        a = self.args
        quantized = {"quantization": a.quantization} if a.quantization else {}
        if a.double_quant:
            quantized["double_quant"] = True
        try:
            return ModelSpec(name=a.model or "sensray-tiny", dtype=a.dtype or "float32", device=a.device,
                             trust_remote_code=a.trust_remote_code, **quantized)
        except ValidationError as err:
            first = err.errors()[0]
            flag = {"double_quant": "--double-quant"}.get(str(first["loc"][0]) if first["loc"] else "", "--quantization")
            raise SpecError(flag, describe(first)) from None

    def _meta(self):
        from sensray.adapters import adapter_for
        from sensray.models import meta_model, pick_device
        from sensray.plan import check_context
        from sensray.saliency.gradients import require_gradients

        meta = _flagged(lambda: meta_model(self.model), "--model")
        _flagged(lambda: adapter_for(meta.config), "--model")
        require_gradients(meta, self.model, key="--model")
        _flagged(lambda: pick_device(self.model), "--device")
        try:
            check_context(_Shim(self.model, self.data), meta.config)
        except SpecError as err:
            raise SpecError(FLAGS.get(err.path, err.path), err.message) from None
        return meta

    def _windows(self) -> int:
        from sensray.data import load_text, token_windows
        from sensray.models import load_tokenizer

        tokenizer = _flagged(lambda: load_tokenizer(self.model), "--model")
        try:
            return len(token_windows(tokenizer, load_text(self.data), self.data.seq_len, self.data.max_sequences))
        except SpecError as err:
            raise SpecError(FLAGS.get(err.path, err.path), err.message) from None

    def load(self):
        from sensray.data import eval_batches
        from sensray.models import load_model, load_tokenizer, pick_device

        device = pick_device(self.model)
        model = load_model(self.model, device)
        return model, [b.to(device) for b in eval_batches(self.data, load_tokenizer(self.model))]

    def summary(self) -> dict:
        from sensray.models import pick_device

        from sensray.quantized.storage import parameter_count

        params = {id(p): p for p in self.meta.parameters()}.values()
        return {"model": self.model.name, "dtype": self.model.storage, "device": str(pick_device(self.model)),
                "parameters": parameter_count(self.meta),
                "weight_bytes": sum(p.numel() * p.element_size() for p in params),
                "gradient_bytes": _gradient_bytes(self.meta),
                "corpus": self.data.corpus, "seq_len": self.data.seq_len, "windows": self.windows}

    def describe(self) -> str:
        a, fisher = self.args, self.windows if self.args.fisher_windows is None else min(self.args.fisher_windows,
                                                                                          self.windows)
        lines = [f"{self.model.name} [{self.model.storage}]: {self.windows} windows of {self.data.seq_len} tokens of "
                 f"{self.data.corpus}; 1 gradient pass + {fisher} Fisher window passes"
                 + (" (blocks recomputed in the backward)" if a.checkpoint else "")]
        lines += [f"  check: {run.path} ({run.spec.perturbation}, {len(run.rows)} trials)" for run in self.runs]
        return "\n".join(lines)

    def context(self, tokens: int) -> str:
        return f"{self.model.name} [{self.model.storage}], {tokens:,} tokens of {self.data.corpus}"


DEFAULT_DATA = {"corpus": "bundled", "seq_len": 128, "num_sequences": 16, "batch_size": 16}


def _gradient_bytes(meta) -> int:
    """What a gradient of every weight would take: a float weight's dtype, a quantized one's float32 dL/dW."""
    from sensray.quantized.storage import quantized_weights

    quantized = quantized_weights(meta)
    return sum(quantized[name].out_features * quantized[name].in_features * 4 if name in quantized
               else p.numel() * p.element_size() for name, p in meta.named_parameters(remove_duplicate=True))


class _Shim:
    """What plan.check_context reads of a spec."""

    def __init__(self, model: ModelSpec, data: DataSpec):
        self.model, self.data = model, data


def _data(values: dict) -> DataSpec:
    try:
        return DataSpec.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        raise SpecError(FLAGS.get(str(first["loc"][0]), "--corpus"), describe(first)) from None


def _flagged(call, flag: str):
    """Run a check; a user-caused failure becomes one line naming the flag (exit 2)."""
    try:
        return call()
    except SpecError as err:
        raise SpecError(FLAGS.get(err.path, flag), err.message) from None
    except (SensrayError, ValueError) as err:
        raise SpecError(flag, str(err).removeprefix("model.name: ")) from None
