"""Super weights (Yu et al. 2024): single weights whose removal destroys a language model.

    python -m sensray.superweights --model mistral-7b     # find candidates, then verify them as a sweep

`discovery` finds candidates from coordinated activation spikes at every block's MLP down
projection; `verify` builds the sweep that zeroes each one beside random and top-magnitude
controls (the `zero` perturbation kind) and judges the result; `report` writes the tables, the
figure and report.md; `cli` ties them together. See docs/superweights.md.
"""

from sensray.superweights.discovery import Discovery, Pair, Thresholds, discover
from sensray.superweights.verify import Verdict, judge, verification_spec

__all__ = ["Discovery", "Pair", "Thresholds", "Verdict", "discover", "judge", "verification_spec"]
