"""Experiment specs: one YAML file describes one study.

The file is parsed with sensray.safe_yaml (safe tags, bounded size, duplicate keys rejected) into
frozen, strict pydantic models that reject unknown keys and never coerce (`seq_len: '128'` is an
error, not a number); every error names its key path (`model.dtype`, `space.bit.grid_search[2]`)
and what was expected. CLI overrides (`--set data.seq_len=64`) are applied to the raw mapping
first, so they pass through exactly the same validation.

    name: bitflip
    model: {name: sensray-tiny, dtype: float32}
    data: {corpus: bundled, seq_len: 128, num_sequences: 32}
    perturbation: bitflip
    space:
      target: {each: "blocks.*"}
      field: {grid_search: [sign, exponent_msb, exponent, mantissa]}
      seed: {grid_search: [0, 1, 2, 3]}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from sensray import safe_yaml
from sensray.errors import SpecError, shorten

DTYPES = ("float32", "float16", "bfloat16")
MAX_SPEC_BYTES = 2**20  # a spec is a page of YAML; anything near this is a mistake or an attack
MAX_NAME = 100  # the name is a directory name: keep it well under any filesystem's limit
MAX_SEED = 2**63 - 1  # seeds reach torch and numpy generators as int64
BUILTIN_SEARCHERS = ("worst-case", "optuna", "hyperopt")
SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a name that can be a directory


def run_name(name: str) -> str:
    """`name` if it can name a results directory (every spec's `name` becomes one under output_dir)."""
    if not SLUG.fullmatch(name):
        raise ValueError("must be a slug of letters, digits, '_', '.', '-' (it names the results directory)")
    return name


class Frozen(BaseModel):
    """Base of every spec model: immutable, strict about unknown keys and about types.

    Strict: a quoted number is a string, never silently a number (it would become a string
    column in the trial table, or another trial id than the number).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


FOUR_BIT = ("nf4", "fp4")


class ModelSpec(Frozen):
    name: str = Field("sensray-tiny", description="alias (see --list-models), HF id, or local directory")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    quantization: Literal["none", "int8", "nf4", "fp4"] = Field(
        "none", description="bitsandbytes storage of the linear layers (int8: LLM.int8; nf4, fp4: 4-bit, QLoRA); "
                            "embeddings, norms and the head stay in dtype")
    compute_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = Field(
        None, description="4-bit: the dtype the dequantized matmul runs in (default: dtype)")
    double_quant: Optional[bool] = Field(
        None, description="4-bit: quantize the per-block scales again, 8 bits each (QLoRA's setting; default false, "
                          "as in bitsandbytes)")
    int8_threshold: Optional[float] = Field(
        None, ge=0, description="int8: LLM.int8's activation outlier threshold (default 6.0; 0: no fp16 outlier path)")

    @field_validator("compute_dtype", "double_quant")
    @classmethod
    def _four_bit_only(cls, value: Any, info: ValidationInfo) -> Any:
        quantization = info.data.get("quantization")
        if value is not None and quantization not in FOUR_BIT:
            raise ValueError(f"{info.field_name} is a 4-bit setting (quantization nf4 or fp4); quantization is "
                             f"{quantization!r}")
        return value

    @field_validator("int8_threshold")
    @classmethod
    def _int8_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("quantization") != "int8":
            raise ValueError(f"int8_threshold is an int8 setting; quantization is {info.data.get('quantization')!r}")
        return value

    @property
    def storage(self) -> str:
        """How the weights are stored, in a few words: `float32`, `nf4, double quant, float32 elsewhere`."""
        from sensray.quantized.loading import describe

        return describe(self)


# A format of a format study: any ModelSpec keys, each optional (they override the study's `model`).
ModelOverride = create_model(
    "ModelOverride", __base__=Frozen,
    **{key: (Optional[field.annotation], None) for key, field in ModelSpec.model_fields.items()},
)


class DataSpec(Frozen):
    corpus: str = Field("bundled", description="'bundled', 'bundled-train', a .txt/.jsonl path, or 'hf:<dataset>[/<config>]'")
    split: str = "test"
    text_field: str = "text"
    data_files: Optional[str] = None
    seq_len: int = Field(128, ge=2)
    num_sequences: Optional[int] = Field(None, ge=1)
    num_tokens: Optional[int] = Field(None, ge=2)
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _one_size(self) -> "DataSpec":
        if self.num_sequences is not None and self.num_tokens is not None:
            raise ValueError("give num_sequences or num_tokens, not both")
        return self

    @property
    def max_sequences(self) -> int | None:
        """How many windows to evaluate on (None: every window of the corpus)."""
        if self.num_tokens is not None:
            return max(1, self.num_tokens // self.seq_len)
        return self.num_sequences


class ResourcesSpec(Frozen):
    """One replica's share of a machine, and how many replicas to run (the Ray executor; local runs one)."""

    cpus: float = Field(1, gt=0, description="CPU cores per replica; torch in the replica uses this many threads")
    gpus: float = Field(0, ge=0, description="GPUs per replica: 1, a fraction (0.5: two share one), or 2+ (sharded)")
    replicas: Any = Field("auto", description="a number, or 'auto': as many as the cluster's free resources fit")

    @field_validator("gpus")
    @classmethod
    def _whole_above_one(cls, gpus: float) -> float:
        # A fraction shares one GPU; more than one means a model spread over whole GPUs of one node.
        if gpus > 1 and gpus != int(gpus):
            raise ValueError("above 1 must be a whole number of GPUs (one model sharded over them)")
        return gpus

    @field_validator("replicas")
    @classmethod
    def _count_or_auto(cls, replicas: Any) -> Any:
        if replicas == "auto" or (isinstance(replicas, int) and not isinstance(replicas, bool) and replicas >= 1):
            return replicas
        raise ValueError(f"must be 'auto' or a whole number >= 1, got {replicas!r}")


class ReuseSpec(Frozen):
    """Prefix reuse (sensray/prefix.py): trials resume their forward at the first block they touch."""

    prefix: bool = Field(True, description="record block outputs at baseline and skip untouched leading blocks")
    max_gb: Optional[float] = Field(
        None, gt=0, description="memory for the recorded outputs; null: a quarter of the device's free memory"
    )


class EarlyStopSpec(Frozen):
    """Stop trials that cannot reach the top-k (sensray/early_stop.py): for worst-case hunts."""

    top_k: int = Field(ge=1, description="how many of the most damaging trials must be found exactly")
    rungs: list[float] = Field(
        [0.25, 0.5], min_length=1, description="fractions of the eval batches after which a trial may stop"
    )
    metric: Literal["ppl", "nll", "delta_ppl", "kl", "top1_agreement"] = "delta_ppl"
    mode: Literal["max", "min"] = "max"

    @field_validator("rungs")
    @classmethod
    def _increasing_fractions(cls, rungs: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in rungs) or rungs != sorted(set(rungs)):
            raise ValueError(f"must be increasing fractions strictly between 0 and 1, got {rungs}")
        return rungs


class SearchSpec(Frozen):
    """An adaptive study: a searcher proposes each trial from the results so far (instead of a fixed grid)."""

    algorithm: str = Field("worst-case", description="'worst-case' (built in), 'optuna', 'hyperopt', or 'module:Class'")
    metric: Literal["ppl", "nll", "delta_ppl", "kl", "top1_agreement"] = "delta_ppl"
    mode: Literal["max", "min"] = "max"
    num_trials: int = Field(ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the searcher")

    @field_validator("algorithm")
    @classmethod
    def _known_or_importable(cls, algorithm: str) -> str:
        if algorithm not in BUILTIN_SEARCHERS and not re.fullmatch(r"[\w.]+:\w+", algorithm):
            raise ValueError("expected worst-case, optuna, hyperopt, or module:Class (a ray.tune.search.Searcher)")
        return algorithm


class EvalSpec(Frozen):
    """lm-evaluation-harness tasks scored on the perturbed model (sensray/tasks/), for chosen trials.

    Which trials: `on: all` (the default), `every: N` (plan positions 0, N, 2N, ...), or `top_k: N`
    (after the sweep, the N most damaging by `metric` are applied again and scored).
    """

    tasks: list[str] = Field(min_length=1, description="lm-eval task names: sensray's shipped ones "
                             "(sensray-pydoc-choice, sensray-pydoc-ppl) or any that lm-eval knows")
    on: Optional[Literal["all"]] = Field(None, description="'all': every trial scores the tasks")
    every: Optional[int] = Field(None, ge=1, description="score every N-th trial of the plan (0, N, 2N, ...)")
    top_k: Optional[int] = Field(None, ge=1, description="after the sweep, score the N most damaging trials")
    metric: Literal["delta_ppl", "ppl", "nll", "kl", "top1_agreement"] = Field(
        "delta_ppl", description="what ranks damage for top_k (top1_agreement: lowest first)")
    limit: Optional[int] = Field(None, ge=1, description="score at most N documents per task")
    batch_size: int = Field(8, ge=1, description="lm-eval's batch size (requests per forward pass)")
    bootstrap_iters: int = Field(1000, ge=0, description="lm-eval's bootstrap for stderrs that have no formula; "
                                 "0: no stderrs")

    @model_validator(mode="before")
    @classmethod
    def _key_on(cls, data: Any) -> Any:
        # YAML 1.1 (PyYAML) reads an unquoted key `on` as the boolean true: give `on: all` its name back.
        if isinstance(data, dict) and any(key is True for key in data) and "on" not in data:
            return {("on" if key is True else key): value for key, value in data.items()}
        return data

    @field_validator("tasks")
    @classmethod
    def _names(cls, tasks: list[str]) -> list[str]:
        for name in tasks:
            if not re.fullmatch(r"[\w.()\-]+", name):  # a name, never a path (a task file could run code)
                raise ValueError(f"{name!r} is not a task name (letters, digits, '_', '.', '-', '()'; one name "
                                 "per item)")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"a task is listed twice: {sorted(t for t in set(tasks) if tasks.count(t) > 1)}")
        return tasks

    @model_validator(mode="after")
    def _one_selection(self) -> "EvalSpec":
        given = [key for key in ("on", "every", "top_k") if getattr(self, key) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of on: all, every: N, top_k: N (got {' and '.join(given)})")
        return self

    @property
    def selection(self) -> tuple[str, int | None]:
        """('all', None), ('every', N) or ('top_k', N)."""
        if self.every is not None:
            return "every", self.every
        if self.top_k is not None:
            return "top_k", self.top_k
        return "all", None


class ExperimentSpec(Frozen):
    name: str = Field(max_length=MAX_NAME)
    description: str = ""
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    perturbation: str
    space: dict[str, Any]
    num_samples: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    output_dir: str = "results"
    resources: ResourcesSpec = ResourcesSpec()
    reuse: ReuseSpec = ReuseSpec()
    early_stop: Optional[EarlyStopSpec] = None
    search: Optional[SearchSpec] = None
    eval: Optional[EvalSpec] = None
    formats: Optional[dict[str, ModelOverride]] = Field(
        None, description="a format study: one run per format (name -> model keys it changes), the same trials in "
                          "each (sensray/formats.py)")

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        return run_name(name)

    @field_validator("perturbation")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from sensray.perturbations import PERTURBATIONS

        if kind not in PERTURBATIONS:
            raise ValueError(PERTURBATIONS.unknown(kind))
        return kind

    @model_validator(mode="after")
    def _search_or_samples(self) -> "ExperimentSpec":
        if self.search is not None and self.formats is not None:
            raise ValueError("formats: a format study runs the same trials in every format; an adaptive search "
                             "would propose different ones (drop `search`, or run one format per spec)")
        if self.search is not None and self.num_samples != 1:
            raise ValueError("give search.num_trials or num_samples, not both (a search draws its own trials)")
        trials = self.search.num_trials if self.search is not None else self.num_samples
        if self.seed + trials > MAX_SEED + 1:  # trial n gets seed + n when the space leaves `seed` open
            raise ValueError(f"seed {self.seed} + {trials} trials passes {MAX_SEED} (2^63 - 1), the largest seed "
                             "a generator takes; use a smaller seed")
        if self.eval is not None and self.eval.every is not None and self.search is not None:
            raise ValueError("eval.every needs a fixed plan; a search proposes its trials as it goes "
                             "(use eval.on: all or eval.top_k)")
        return self

    @field_validator("formats")
    @classmethod
    def _format_names(cls, formats: Optional[dict]) -> Optional[dict]:
        if formats is None:
            return None
        if len(formats) < 2:
            raise ValueError("a format study compares two or more formats")
        for name in formats:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or name == "analysis":
                raise ValueError(f"format name {name!r}: a slug of letters, digits, '_', '-' (it names the format's "
                                 "run directory; 'analysis' is taken)")
        return formats

    def resolved(self) -> dict[str, Any]:
        """The spec with every default filled in, as plain data (what a run directory records)."""
        return self.model_dump(mode="json")

    def format_specs(self) -> dict[str, "ExperimentSpec"]:
        """A format study's formats, each as the spec of its own run (the study's model with the format's
        keys; named `<study>.<format>`); errors name `formats.<format>.<key>`."""
        out = {}
        for name, override in (self.formats or {}).items():
            keys = self.model.model_dump() | override.model_dump(exclude_none=True)
            try:
                model = ModelSpec.model_validate(keys)
            except ValidationError as err:
                first = err.errors()[0]
                raise SpecError(key_path(("formats", name, *first["loc"])), describe(first)) from None
            out[name] = self.model_copy(update={"model": model, "formats": None, "name": f"{self.name}.{name}"})
        return out


def load_spec(path: str | Path, overrides: list[str] = (), model: type[Frozen] | None = None) -> ExperimentSpec:
    """Read, override and validate a spec file (as `model`, default ExperimentSpec); every failure is a
    `SpecError` naming the file."""
    try:
        return parse_spec(read_spec_text(path), overrides, model)
    except SpecError as err:
        raise err.located(str(path)) from None


def read_spec_text(path: str | Path) -> str:
    """A spec file's text: at most MAX_SPEC_BYTES of UTF-8."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError("", f"cannot read spec: {err.strerror or err}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError("", f"larger than {MAX_SPEC_BYTES // 2**10} KiB; a spec is a short YAML file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SpecError("", f"not UTF-8 text: byte 0x{data[err.start]:02x} on line {line} (save it as UTF-8)") from None


def parse_spec(text: str, overrides: list[str] = (), model: type[Frozen] | None = None) -> ExperimentSpec:
    raw = safe_yaml.load(text)
    if not isinstance(raw, dict):
        raise SpecError("", f"must be a mapping of keys to values, got {type(raw).__name__}")
    if model is None and "perturbation" not in raw:  # another command's spec given to a sweep: name that command
        if "stages" in raw:
            raise SpecError("stages", "this is a study spec (a list of stages), not an experiment: run it with "
                                      "sensray study")
        if "attack" in raw:
            command = "sensray adversarial" if "inputs" in raw else "sensray attack"
            raise SpecError("attack", f"this is an attack spec: run it with `{command}`")
    for override in overrides:
        apply_override(raw, override)
    return validate(raw, model)


def validate(raw: dict[str, Any], model: type[Frozen] | None = None) -> ExperimentSpec:
    """`raw` as a frozen `model` (default ExperimentSpec; sensray.adversarial passes its own spec model)."""
    try:
        spec = (model or ExperimentSpec).model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise SpecError(key_path(first["loc"]), describe(first)) from None
    if isinstance(spec, ExperimentSpec):
        spec.format_specs()  # each format's model must be valid too
    return spec


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to the raw spec mapping."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise SpecError("--set", f"expected KEY=VALUE (e.g. data.seq_len=64), got {override!r}")
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(".".join(parts[: depth + 1]), f"--set {key}: this key holds a value, not a mapping")
        node = child
    try:
        node[parts[-1]] = safe_yaml.load(value)
    except SpecError as err:
        raise SpecError(key, f"--set value {shorten(value, 60)}: {err.message}") from None


def check_permissions(spec: ExperimentSpec, trust_remote_code: bool, allow_searcher_import: bool) -> None:
    """A spec file alone never runs code: the two keys that would need a command-line flag too."""
    check_remote_code(spec.model, trust_remote_code)
    algorithm = spec.search.algorithm if spec.search is not None else None
    if algorithm is not None and algorithm not in BUILTIN_SEARCHERS and not allow_searcher_import:
        module = algorithm.partition(":")[0]
        raise SpecError("search.algorithm", f"{algorithm!r} imports the module {module!r}, which runs its code; "
                        f"pass --allow-searcher-import to allow it (built in, no flag needed: "
                        f"{', '.join(BUILTIN_SEARCHERS)})")


def check_remote_code(model: ModelSpec, allowed: bool) -> None:
    """`model.trust_remote_code: true` from a file is honoured only with --trust-remote-code on the command line."""
    if model.trust_remote_code and not allowed:
        raise SpecError("model.trust_remote_code", "true runs Python code shipped with the model (its config and "
                        "modeling files) in this process and every replica; pass --trust-remote-code to allow it, "
                        "for a model whose code you have read or trust")


def key_path(loc: tuple) -> str:
    """('space', 'bit', 3) -> 'space.bit[3]'"""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def describe(error: dict) -> str:
    """One pydantic error as a sentence a researcher can act on."""
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return "unknown key (check its spelling and where it is nested)"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{value!r} is not allowed; expected one of {expected}"
    message = error["msg"].removeprefix("Value error, ")
    if kind in ("int_type", "float_type", "bool_type") and isinstance(value, str):
        return f"{message}, got the string {shorten(value)} (write numbers and booleans without quotes)"
    return f"{message} (got {shorten(value)})" if kind != "value_error" and not isinstance(value, dict) else message

