"""The seed framework's analyses by name, and the shipped experiments (experiments/*.yaml) they run.

`sensray run sensitivity` is the preset experiments/ablation.yaml: a researcher who knew the seed's
analysis names finds each one as a sweep. The presets live in the source checkout, beside the
package (they are examples to copy and edit, not package data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sensray.errors import SensrayError, SpecError
from sensray.registry import Registry

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@dataclass(frozen=True)
class Analysis:
    preset: str | None  # experiments/<preset>.yaml; None: sensray cannot run it yet
    summary: str
    command: str = "sweep"  # the command that runs the preset: sweep, study (a study spec) or adversarial


ANALYSES: Registry[Analysis] = Registry("analysis")


def analysis(name: str, preset: str | None, summary: str = "not available yet", command: str = "sweep") -> None:
    ANALYSES.register(name)(Analysis(preset, summary, command))


analysis("sensitivity", "ablation", "what each projection contributes: each zeroed, then mean-ablated, alone")
analysis("robustness", "noise", "relative gaussian noise per projection kind, over sigmas 0.01..1")
analysis("bit-level", "bitflip", "one flipped bit per trial, per block and IEEE bit field")
analysis("pruning", "prune", "magnitude and wanda pruning of every block, per matrix and per row, 0..90%")
analysis("adversarial", "adversarial", "GCG token suffixes that raise the true continuation's NLL, budgets 1..20",
         command="adversarial")
analysis("integrated", "integrated", "sensitivity -> allocation -> pruned (allocated, uniform) -> healed (lora, "
                                    "masked) -> evaluated -> report, as one study", command="study")
analysis("evaluate", "evaluate", "the model as it is: perplexity and lm-eval task scores (sensray evaluate)")
analysis("fine-tuning", "fine-tuning", "wanda 50% pruning healed by LoRA and by masked fine-tuning, evaluated",
         command="study")


def available() -> list[str]:
    return [name for name, analysis in ANALYSES.items() if analysis.preset]


def command_for(name: str) -> str:
    """The sensray command that runs analysis `name`'s preset (sweep, or study)."""
    return ANALYSES.get(name).command


def preset_for(name: str) -> Path:
    """The spec file that analysis `name` runs; a SpecError (exit 2) for one sensray cannot run."""
    if name not in ANALYSES:
        raise SpecError("", ANALYSES.unknown(name))
    preset = ANALYSES.get(name).preset
    if preset is None:
        raise SpecError("", f"analysis {name!r} is not available yet in sensray; available: {', '.join(available())} "
                            "(sensray list analyses)")
    path = experiments_dir() / f"{preset}.yaml"
    if not path.is_file():
        raise SensrayError(f"{path} is missing from this checkout; `sensray run {name}` runs that preset")
    return path


def experiments_dir() -> Path:
    """The checkout's experiments/; an installed wheel has none (the presets are not package data)."""
    if not EXPERIMENTS.is_dir():
        raise SensrayError(f"no experiments/ directory at {EXPERIMENTS}: the shipped presets come with a source "
                           "checkout (git clone, then pip install -e .); or run your own: sensray sweep SPEC.yaml")
    return EXPERIMENTS


def experiments() -> list[tuple[Path, str]]:
    """Every shipped experiment with its one-line description."""
    return [(path, description(path)) for path in sorted(experiments_dir().glob("*.yaml"))]


def description(path: Path) -> str:
    """A spec's `description:`, else its first comment line (the older presets open with one)."""
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raw = None  # listed anyway: the sweep reports what is wrong with it
    if isinstance(raw, dict) and raw.get("description"):
        return str(raw["description"])
    comments = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    return next((line for line in comments if line), "")
