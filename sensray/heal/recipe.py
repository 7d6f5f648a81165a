"""What a heal does, validated at the boundary: one frozen, strict `HealRecipe`.

    recipe = parse_recipe({"model": {"name": "data/tiny-wanda50"}, "method": "lora", "steps": 300})
    check_recipe(recipe)        # files, the model's structure (meta device), train text != eval text

The command line (`sensray heal`) and a study's heal stage build the same mapping and end in
this one shape, so both reject the same mistakes with the same messages. `check_recipe` holds
every check that needs a file or the model's config but no weights: `--dry-run` runs exactly it.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from sensray.errors import SensrayError, SpecError
from sensray.spec import DataSpec, Frozen, ModelSpec, describe, key_path

# Wanda's and LLM-Pruner's LoRA learning rate (docs/heal.md); full fine-tuning moves every weight, so less.
DEFAULT_LR = {"lora": 1e-4, "masked": 1e-5}
TRAIN_TEXT = DataSpec(corpus="bundled-train", split="train", seq_len=128, batch_size=8)
EVAL_TEXT = DataSpec(corpus="bundled", seq_len=128, num_sequences=16, batch_size=16)


class LoraSpec(Frozen):
    r: int = Field(8, ge=1, description="rank of each adapter")
    alpha: float = Field(16.0, gt=0, description="scale alpha / r on the adapter's output")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    targets: list[str] = Field(["blocks.*"], min_length=1,
                               description="target patterns; every linear layer they select gets an adapter")


class HealRecipe(Frozen):
    model: ModelSpec
    method: Literal["lora", "masked"]
    steps: int = Field(description="optimizer steps (each one global batch of train.batch_size windows)")
    lr: Optional[float] = Field(None, description="peak learning rate (default 1e-4 for lora, 1e-5 for masked)")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="clip the gradient norm (null: never)")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="order of the training windows, dropout")
    train: DataSpec = TRAIN_TEXT
    eval: DataSpec = EVAL_TEXT
    lora: LoraSpec = LoraSpec()
    mask: Literal["auto", "zeros", "none"] = Field(
        "auto", description="weights held at zero: auto (those sensray-prune.json lists, else none), zeros (every "
                            "zero of every block weight matrix), none (plain fine-tuning)")
    micro_batch_size: Optional[int] = Field(None, ge=1, description="rows per forward pass on each worker; "
                                                                     "gradients accumulate over a step's rows")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    workers: int = Field(1, ge=1, description="training processes; more than 1 runs under Ray Train")
    deepspeed: Optional[Literal[1, 2]] = Field(None, description="ZeRO stage (under Ray Train); null: plain DDP")
    checkpoint_every: Optional[int] = Field(None, ge=1, description="steps between checkpoints (default steps/10)")
    output_dir: str

    @field_validator("steps")
    @classmethod
    def _some_steps(cls, steps: int) -> int:
        if steps < 1:
            raise ValueError(f"{steps} steps would train nothing; give a whole number >= 1")
        return steps

    @field_validator("lr")
    @classmethod
    def _usable_lr(cls, lr: Optional[float]) -> Optional[float]:
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"must be a finite number > 0, got {lr!r}")
        return lr

    @model_validator(mode="after")
    def _shapes(self) -> "HealRecipe":
        if self.train.batch_size % self.workers:
            raise ValueError(f"train.batch_size {self.train.batch_size} must be a multiple of workers "
                             f"{self.workers}: each worker takes an equal share of every batch")
        rows = self.train.batch_size // self.workers
        if self.micro_batch_size is not None and rows % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide the {rows} rows each worker "
                             "takes per step (train.batch_size / workers)")
        return self

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def every(self) -> int:
        return self.checkpoint_every or max(1, math.ceil(self.steps / 10))

    @property
    def distributed(self) -> bool:
        """Ray Train runs it: several workers, or DeepSpeed (which needs a process group)."""
        return self.workers > 1 or self.deepspeed is not None

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json") | {"lr": self.peak_lr, "checkpoint_every": self.every}


# What `--resume` may change: how long and how fast it trains, and where. Anything else would make the
# checkpoint a different heal's.
RESUMABLE = ("steps", "lr", "checkpoint_every", "workers")


def parse_recipe(raw: dict[str, Any], flags: dict[str, str] | None = None) -> HealRecipe:
    """Validate; a mistake is a SpecError at its key path (or its command-line flag, given `flags`)."""
    try:
        return HealRecipe.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        path = key_path(first["loc"])
        raise SpecError((flags or {}).get(path, path), describe(first)) from None


def check_recipe(recipe: HealRecipe, key: str = "") -> None:
    """Everything knowable without loading a weight; `key` prefixes the key paths of errors (a study stage)."""
    from sensray.heal.data import check_not_eval
    from sensray.heal.lora import lora_modules
    from sensray.models import meta_model
    from sensray.plan import check_context
    from sensray.preflight import check_creatable
    from sensray.spec import ExperimentSpec

    where = f"{key}." if key else ""
    try:
        model = meta_model(recipe.model)
    except (SensrayError, ValueError, KeyError) as err:  # no config, or one transformers cannot build
        raise SpecError(f"{where}model", str(err).removeprefix("model.name: ")) from None
    for data, name in ((recipe.train, "train"), (recipe.eval, "eval")):
        probe = ExperimentSpec(name="heal", model=recipe.model, data=data, perturbation="zero", space={})
        try:
            check_context(probe, model.config)
        except SpecError as err:
            raise SpecError(f"{where}{name}.seq_len", err.message) from None
    check_not_eval(recipe.train, recipe.eval, key=where)
    if recipe.method == "lora":
        if importlib.util.find_spec("peft") is None:
            raise SpecError(f"{where}method", "lora needs peft (a sensray dependency), which is not installed: "
                                              "pip install 'peft>=0.21.2,<0.22' (or use method masked: no adapters)")
        lora_modules(model, recipe.lora.targets, key=f"{where}lora.targets")
    if recipe.deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise SpecError(f"{where}deepspeed", "DeepSpeed is not installed: pip install 'sensray[distributed]' (or leave "
                                             "deepspeed out: plain DDP)")
    if recipe.mixed_precision == "fp16" and recipe.model.device == "cpu":
        raise SpecError(f"{where}mixed_precision", "fp16 autocast needs a GPU; on a CPU use bf16 or no")
    check_creatable(Path(recipe.output_dir), f"{where}output_dir")
