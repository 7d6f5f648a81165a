"""How numbers are written, one policy per kind of column, the same in tables, the reading and the trial table.

    ratio(47.41)  -> '47.4'      ppl / baseline: 3 significant figures (1.00, 1.06, 47.4, 1,230)
    ppl(43.1832)  -> '43.18'     perplexity: 2 decimals, as language-model papers report it
    agreement(.7612) -> '76.12%' top-1 agreement: a percentage with 2 decimals (one position in 2,048 is 0.05%)
    kl(3.14e-6)   -> '3.1e-06'   KL in nats: 2 significant figures
    percent(.25)  -> '25.0%'     a share of trials: 1 decimal

A value and its interval are written with the same policy. A ratio whose 95% interval includes 1 is
written `≈1.00`: not distinguishable from the baseline on this eval text (sensray.analyze.stats).
The rules are stated once, in `POLICY`, and printed under the report's tables.
"""

from __future__ import annotations

import math
from typing import Any

POLICY = ("ppl / baseline to 3 significant figures, `≈` when its 95% interval includes 1 (not distinguishable "
          "from the baseline); perplexity to 2 decimals; top-1 agreement in % to 2 decimals; KL (nats per "
          "position) to 2 significant figures; shares of trials in % to 1 decimal")


def _nonfinite(x: float | None) -> str | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


def sig(x: float | None, digits: int = 3) -> str:
    """`digits` significant figures, trailing zeros kept (1.00), whole numbers from 10^digits (1,230)."""
    if (special := _nonfinite(x)) is not None:
        return special
    text = f"{x:#.{digits}g}"  # '#' keeps trailing zeros: 1.00, not 1
    if "e+" in text and abs(x) < 1e15:  # 1.23e+03 -> 1,230
        return f"{float(text):,.0f}"
    return text.rstrip(".")


def ratio(x: float | None, low: float | None = None, high: float | None = None) -> str:
    """ppl / baseline; given an interval that includes 1, prefixed `≈`."""
    text = sig(x)
    if low is not None and high is not None and low <= 1 <= high and math.isfinite(x or math.nan):
        return "≈" + text
    return text


def ppl(x: float | None) -> str:
    if (special := _nonfinite(x)) is not None:
        return special
    return f"{x:,.2f}" if abs(x) < 1e6 else sig(x)


def agreement(x: float | None) -> str:
    if (special := _nonfinite(x)) is not None:
        return special
    return f"{100 * x:.2f}%"


def kl(x: float | None) -> str:
    if (special := _nonfinite(x)) is not None:
        return special
    return "0" if x == 0 else f"{x:.2g}"


def percent(x: float | None) -> str:
    """A share of trials: 0%, 12.5%, 100%."""
    if (special := _nonfinite(x)) is not None:
        return special
    return f"{100 * x:.0f}%" if x in (0.0, 1.0) else f"{100 * x:.1f}%"


def span(low: float | None, high: float | None, how=sig) -> str:
    """An interval written with its column's policy: `41.20–45.31`; `–` when there is none."""
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return "–"
    return f"{how(low)}–{how(high)}"


def times(x: float | None) -> str:
    """A ratio in a sentence: ×1.00, ×47.4, non-finite."""
    if x is None:
        return "n/a"
    return "non-finite" if not math.isfinite(x) else f"×{sig(x)}"


def change(x: float) -> str:
    """A relative change in a sentence, however small: 0%, 0.0022%, 1.2%."""
    return "0%" if x == 0 else f"{100 * x:.2g}%" if x < 0.01 else percent(x)


def cell(value: Any) -> str:
    """Anything else: parameters, names, counts."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
