"""The adversarial experiment spec: one YAML file describes the attack, its inputs and where it runs.

    name: adversarial
    model: {name: sensray-tiny}
    attack: {method: gcg, objective: nll, edit: suffix, budgets: [1, 5, 20], steps: 40}
    inputs: {corpus: bundled, cases: 4, prompt_tokens: 24, continuation_tokens: 16}

Read like a sweep spec (sensray.spec): sensray.safe_yaml, then frozen strict pydantic models that
reject unknown keys and never coerce; every error names its key path. `--set KEY=VALUE` applies to
the raw mapping first (sensray.spec.load_spec does it all, given this model). The model, data and
resources sections are the sweep's own models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from sensray.spec import (MAX_NAME, MAX_SEED, DataSpec, Frozen, ModelSpec, ResourcesSpec, load_spec, parse_spec,
                          run_name)

MAX_BUDGET = 4096  # edit budgets are token counts; anything beyond a model's context fails the plan anyway
MAX_STEPS = 100_000
MAX_CANDIDATES = 65_536


class AttackSpec(Frozen):
    """How inputs are searched for. Defaults are nanoGCG's (20-token suffix, 250 steps, top-256, 512)."""

    method: Literal["gcg", "hotflip"] = Field("gcg", description="gcg: random swaps among each position's "
                                              "top-k; hotflip: the best-ranked swaps of one gradient")
    objective: Literal["nll", "kl", "target"] = Field("nll", description="nll/kl: raise the true continuation's "
                                                      "NLL or its KL from the clean model; target: make the model "
                                                      "say inputs.target(s)")
    edit: Literal["suffix", "substitute"] = Field("suffix", description="suffix: budget tokens inserted after the "
                                                  "prompt; substitute: up to budget prompt tokens replaced")
    budgets: list[int] = Field([20], min_length=1, description="edit budgets (tokens), one attack per case each")
    steps: int = Field(250, ge=1, le=MAX_STEPS)
    top_k: int = Field(256, ge=1, description="gcg: tokens per position to draw from, by gradient rank")
    candidates: int = Field(512, ge=1, le=MAX_CANDIDATES, description="candidates evaluated exactly per step")
    batch_size: int = Field(512, ge=1, description="candidates per forward pass (memory)")
    patience: Optional[int] = Field(None, ge=1, description="stop an attack after this many steps without a "
                                    "better candidate (null: never; hotflip stops at the first such step)")
    stop_on_success: bool = Field(False, description="stop an attack once it succeeds")
    success_at: float = Field(1.0, gt=0, description="untargeted success: NLL up by this many nats per token "
                                                     "(nll) or KL of at least this (kl); target: exact match")
    init: str = Field(" x", min_length=1, description="suffix start: this text, one token, repeated")
    allow_non_ascii: bool = Field(False, description="let swaps use tokens that decode to non-ASCII text")
    retokenize: bool = Field(True, description="keep only candidates whose text re-encodes to the same tokens")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="keys every random draw (with case, budget and step)")

    @field_validator("budgets")
    @classmethod
    def _increasing(cls, budgets: list[int]) -> list[int]:
        if any(b < 1 or b > MAX_BUDGET for b in budgets) or budgets != sorted(set(budgets)):
            raise ValueError(f"must be increasing token counts between 1 and {MAX_BUDGET}, got {budgets}")
        return budgets


class InputsSpec(Frozen):
    """What is attacked: windows of eval text (untargeted; prompts by default), or prompts and targets from files."""

    corpus: str = Field("bundled", description="eval text: 'bundled', a .txt/.jsonl path, or 'hf:<dataset>'")
    split: str = "test"
    text_field: str = "text"
    cases: Optional[int] = Field(None, ge=1, le=100_000, description="how many prompts (default: 4 windows of "
                                 "the corpus, or every line of the prompts file)")
    prompt_tokens: int = Field(32, ge=1, description="corpus windows: tokens of prompt")
    continuation_tokens: int = Field(16, ge=1, description="corpus windows: tokens of true continuation scored")
    prompts: Optional[str] = Field(None, description="a UTF-8 file, one prompt per line (else corpus windows)")
    targets: Optional[str] = Field(None, description="a UTF-8 file, one target per line (one per prompt, or one)")
    target: Optional[str] = Field(None, min_length=1, description="one target for every prompt")
    chat_template: bool = Field(False, description="wrap each prompt (and suffix) in the tokenizer's chat template")


class AdversarialSpec(Frozen):
    name: str = Field(max_length=MAX_NAME)
    description: str = ""
    model: ModelSpec = ModelSpec()
    attack: AttackSpec = AttackSpec()
    inputs: InputsSpec = InputsSpec()
    data: DataSpec = Field(DataSpec(seq_len=128, num_sequences=8),
                           description="text on which transfer measures each damaged model's ppl ratio")
    output_dir: str = "results"
    resources: ResourcesSpec = ResourcesSpec(replicas=1)

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        return run_name(name)

    @model_validator(mode="after")
    def _consistent(self) -> "AdversarialSpec":
        targeted, inputs = self.attack.objective == "target", self.inputs
        given = [key for key in ("targets", "target") if getattr(inputs, key) is not None]
        if targeted and len(given) != 1:
            raise ValueError("objective 'target' needs inputs.target (one string) or inputs.targets (a file), "
                             "exactly one of them")
        if not targeted and (given or inputs.prompts is not None):
            raise ValueError(f"objective {self.attack.objective!r} scores the corpus's own continuations; "
                             f"inputs.{(given or ['prompts'])[0]} is for objective 'target'")
        if inputs.chat_template and self.attack.edit == "substitute":
            raise ValueError("inputs.chat_template works with attack.edit 'suffix' (the template's own tokens "
                             "are not edited)")
        return self

    @property
    def targeted(self) -> bool:
        return self.attack.objective == "target"

    def resolved(self) -> dict:
        return self.model_dump(mode="json")


def load_adversarial_spec(path: str | Path, overrides: list[str] = ()) -> AdversarialSpec:
    """Read, override and validate an adversarial spec file; every failure is a SpecError naming the file."""
    return load_spec(path, overrides, AdversarialSpec)


def parse_adversarial_spec(text: str, overrides: list[str] = ()) -> AdversarialSpec:
    return parse_spec(text, overrides, AdversarialSpec)
