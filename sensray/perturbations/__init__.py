"""Perturbation kinds, in one registry. Importing this package registers every built-in kind."""

from sensray.perturbations.base import PERTURBATIONS, ParamError, Perturbation
from sensray.perturbations.edits import Edits
from sensray.perturbations import ablation, bitflip, checkpoint, identity, noise, prune, zeroing  # noqa: F401,E501

__all__ = ["PERTURBATIONS", "Edits", "ParamError", "Perturbation"]
