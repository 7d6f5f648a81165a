"""Attack specs: one YAML file describes one progressive bit search.

Read like an experiment spec (sensray.safe_yaml, strict frozen pydantic models, unknown keys rejected
with their key path, `--set` overrides applied to the raw mapping first):

    name: attack-bitflip
    model: {name: sensray-tiny, dtype: float32}   # or quantization: int8 / nf4: flips in codes and scales
    data: {corpus: bundled, seq_len: 128, num_sequences: 16}   # the text to break: candidates measured on it
    attack:
      target: "**"            # which tensors may be flipped (a target pattern: "blocks.0-3.**", "blocks.*.mlp.*")
      field: mantissa         # or any / sign / exponent / exponent_msb / magnitude / magnitude_msb, or bit: 22
      per_tensor: 1           # candidates ranked per tensor (BFA's in-layer search)
      evaluate: 16            # of those, the best-predicted evaluated exactly per step (BFA's cross-layer search)
    stop: {max_flips: 50, ppl_ratio: 100}
    utility:                  # optional (PrisonBreak's shape): keep ppl on another text within 5%
      data: {corpus: bundled-train, num_sequences: 8}
      max_increase: 0.05
    random: {seeds: 3}        # the random-flip baseline with the same budget
    resources: {cpus: 1, replicas: 2}

`check_attack(spec)` (what --dry-run runs) adds what needs the model's structure: the target resolves,
the field or bit exists in the weights' storage, the weights have gradients, the windows fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from sensray import safe_yaml
from sensray.errors import SpecError
from sensray.perturbations.bitflip import Field_
from sensray.spec import (
    MAX_NAME,
    MAX_SEED,
    DataSpec,
    ExperimentSpec,
    Frozen,
    ModelSpec,
    ResourcesSpec,
    ReuseSpec,
    apply_override,
    describe,
    key_path,
    read_spec_text,
)


class SearchSpec(Frozen):
    target: str = Field("**", description="target pattern of the tensors that may be flipped")
    field: Optional[Field_] = Field(None, description="bit field flips may use (default: any); or `bit`")
    bit: Optional[int] = Field(None, ge=0, description="the one bit position flips may use")
    per_tensor: int = Field(1, ge=1, description="candidates ranked per tensor")
    evaluate: int = Field(16, ge=1, le=10_000, description="candidates evaluated exactly per step")
    finite_only: bool = Field(False, description="never choose a flip that makes a weight inf or NaN")
    gradient_data: Optional[DataSpec] = Field(None, description="text of the backward pass (default: data)")
    checkpoint: bool = Field(False, description="recompute decoder blocks in the backward (less memory)")

    @model_validator(mode="after")
    def _field_or_bit(self) -> "SearchSpec":
        if self.field is not None and self.bit is not None:
            raise ValueError("give 'field' or 'bit', not both")
        return self

    @property
    def restriction(self) -> dict[str, Any]:
        """As bitflip parameters: {'field': ...} or {'bit': ...}."""
        return {"bit": self.bit} if self.bit is not None else {"field": self.field or "any"}


class StopSpec(Frozen):
    max_flips: int = Field(description="the flip budget")
    ppl_ratio: Optional[float] = Field(None, description="stop once ppl >= this x the clean model's")
    top1_below: Optional[float] = Field(None, description="stop once top-1 agreement with the clean model < this")

    @field_validator("max_flips")
    @classmethod
    def _some(cls, n: int) -> int:
        if n < 1:
            raise ValueError(f"a budget of {n} flips can never flip anything; give at least 1")
        if n > 100_000:
            raise ValueError(f"{n} flips: at most 100,000 (each is a backward pass and a round of trials)")
        return n

    @field_validator("ppl_ratio")
    @classmethod
    def _above_baseline(cls, ratio: Optional[float]) -> Optional[float]:
        if ratio is not None and not 1 < ratio < float("inf"):
            raise ValueError(f"{ratio} is at or below the clean model's perplexity (ratio 1): the target is met "
                             "before any flip; give a ratio above 1, e.g. 10 or 100")
        return ratio

    @field_validator("top1_below")
    @classmethod
    def _reachable(cls, level: Optional[float]) -> Optional[float]:
        if level is not None and not 0 < level <= 1:
            why = "it can never fall below 0 or less" if level <= 0 else "it is below that before any flip"
            raise ValueError(f"{level}: top-1 agreement lies in [0, 1] and starts at 1; {why}")
        return level


class UtilitySpec(Frozen):
    data: DataSpec = Field(description="the text whose perplexity must stay within max_increase")
    max_increase: float = Field(gt=0, description="allowed relative ppl increase on that text (0.05: 5%)")


class RandomSpec(Frozen):
    seeds: int = Field(3, ge=0, le=1000, description="random draws per flip count (0: no random baseline)")
    counts: Optional[list[int]] = Field(None, description="flip counts (default: 1, 2, 5, 10, ... up to max_flips)")

    @field_validator("counts")
    @classmethod
    def _positive(cls, counts: Optional[list[int]]) -> Optional[list[int]]:
        if counts is not None and (not counts or min(counts) < 1):
            raise ValueError("must be a non-empty list of flip counts >= 1")
        return counts


class AttackSpec(Frozen):
    name: str = Field(max_length=MAX_NAME)
    description: str = ""
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    attack: SearchSpec = SearchSpec()
    stop: StopSpec
    utility: Optional[UtilitySpec] = None
    random: RandomSpec = RandomSpec()
    seed: int = Field(0, ge=0, le=MAX_SEED)
    output_dir: str = "results"
    resources: ResourcesSpec = ResourcesSpec()
    reuse: ReuseSpec = ReuseSpec()

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        return ExperimentSpec._slug(name)

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def trials(self) -> ExperimentSpec:
        """The experiment spec the replicas run candidates under: ordinary bitflip trials on `data`."""
        return ExperimentSpec(name=self.name, description=self.description, model=self.model, data=self.data,
                              perturbation="bitflip", space={"target": self.attack.target, **self.attack.restriction},
                              seed=self.seed, output_dir=self.output_dir, resources=self.resources, reuse=self.reuse)

    def random_counts(self) -> list[int]:
        if self.random.counts is not None:
            return sorted(set(self.random.counts))
        steps = [m * 10**e for e in range(7) for m in (1, 2, 5)]
        return sorted({n for n in steps if n < self.stop.max_flips} | {self.stop.max_flips})


def load_attack_spec(path: str | Path, overrides: list[str] = ()) -> AttackSpec:
    """Read, override and validate an attack spec; every failure is a SpecError naming the file."""
    try:
        return parse_attack_spec(read_spec_text(path), overrides)
    except SpecError as err:
        raise err.located(str(path)) from None


def parse_attack_spec(text: str, overrides: list[str] = ()) -> AttackSpec:
    raw = safe_yaml.load(text)
    if not isinstance(raw, dict):
        raise SpecError("", f"must be a mapping of keys to values, got {type(raw).__name__}")
    if "perturbation" in raw and "attack" not in raw:
        raise SpecError("perturbation", "this is an experiment spec (a sweep): run it with `sensray sweep`")
    for override in overrides:
        apply_override(raw, override)
    try:
        return AttackSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise SpecError(key_path(first["loc"]), describe(first)) from None
