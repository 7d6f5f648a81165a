"""Adversarial inputs: gradient-guided token attacks (GCG, HotFlip) and their transfer to damaged weights.

    sensray adversarial experiments/adversarial.yaml
    sensray adversarial --resume results/adversarial/<run> --transfer results/prune/<run> --trials top:5

As a library (an integrated study calls these as stages; each returns a directory or table path):

    from sensray.adversarial import load_adversarial_spec, run_attack, transfer
    spec = load_adversarial_spec("experiments/adversarial.yaml", ["attack.steps=20"])
    run = run_attack(spec)                                  # results/adversarial/<run id>
    table = transfer(run, ["data/tiny-wanda50", "results/prune/<run id>"], trials="spread:8")

Modules: spec (the YAML), cases (the inputs, checked), objective (losses and gradients on a model),
search (GCG/HotFlip candidates), attack (the rounds), replica and pool (where the model runs: this
process or sensray's Ray replica pool), store (the run directory), run (the whole attack), report
(tables, figures), damage and damage_report (transfer onto damaged weights), cli (`sensray adversarial`).
"""

from importlib import import_module

# Imported on first use, so that `sensray adversarial --help` loads neither torch nor polars.
_EXPORTS = {"AdversarialSpec": "spec", "load_adversarial_spec": "spec", "run_attack": "run", "transfer": "damage"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sensray.adversarial' has no attribute {name!r}")
    return getattr(import_module(f"sensray.adversarial.{_EXPORTS[name]}"), name)
