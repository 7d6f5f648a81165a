"""What a finished attack writes: Parquet tables, damage against flips beside the random baseline, report.md.

    finish(run, summary)     # flips/candidates/random.parquet, damage.png, report.md, then attack.json (done)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from sensray.analyze import render
from sensray.analyze.figures import NONFINITE, save
from sensray.attack.state import AttackRun
from sensray.changes import element, value
from sensray.results import column_types, to_frame

ATTACK, RANDOM = "#b2182b", "#4d4d4d"


def allowed(spec) -> str:
    """'any bit', 'mantissa bits', 'bit 22'."""
    r = spec.attack.restriction
    return f"bit {r['bit']}" if "bit" in r else "any bit" if r["field"] == "any" else f"{r['field']} bits"


def finish(run: AttackRun, summary: dict) -> None:
    spec, baseline = run.spec(), run.baseline()
    flips = run.flips()
    types = column_types()
    pl.DataFrame(flips, schema_overrides={"changes": types["changes"]}, infer_schema_length=None).write_parquet(
        run.path / "flips.parquet")
    for name in ("candidates", "random"):
        rows = run.journal_rows(name)
        if rows:
            to_frame(rows).write_parquet(run.path / f"{name}.parquet")
    context = f"{spec.model.name} [{spec.model.storage}], {allowed(spec)} in {spec.attack.target}"
    random = run.journal_rows("random")
    figure = save(damage_figure(flips, random, spec.stop.ppl_ratio, context), run.path / "damage")[0]
    doc = document(spec, baseline, summary, flips, random, figure)
    (run.path / "report.md").write_text(render.markdown(doc, run.path), encoding="utf-8")
    run.write_summary(summary)  # last: its presence says the attack is finished


def random_curve(rows: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per flip count of the random baseline: counts, median, min, max of `metric` over its seeds."""
    done = [r for r in rows if r.get("error") is None and r.get(metric) is not None]
    counts = np.array(sorted({r["count"] for r in done}))
    values = [[r[metric] for r in done if r["count"] == k] for k in counts]
    return (counts, np.array([np.median(v) for v in values]), np.array([min(v) for v in values]),
            np.array([max(v) for v in values]))


def damage_figure(flips: list[dict], random: list[dict], target: float | None, context: str = "") -> Figure:
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    x = np.arange(len(flips) + 1)
    ratio = np.array([1.0] + [f["delta_ppl"] for f in flips], dtype=float)
    top1 = np.array([1.0] + [f["top1_agreement"] for f in flips], dtype=float)
    finite = [v for v in ratio if math.isfinite(v)] + [r["delta_ppl"] for r in random if _finite(r.get("delta_ppl"))]
    ceiling = max(finite + [target or 1.0]) * 10
    _series(left, x, ratio, random, "delta_ppl", ceiling)
    if target is not None:
        left.axhline(target, color=ATTACK, linestyle="--", linewidth=0.9, label=f"target x{target:g}")
    left.set_yscale("log")
    left.set_ylabel("perplexity / clean perplexity (log)")
    _series(right, x, top1, random, "top1_agreement", None)
    right.set_ylabel("top-1 agreement with the clean model")
    right.set_ylim(-0.02, 1.02)
    wide = max([len(flips)] + [r["count"] for r in random]) > 50
    for ax in (left, right):
        ax.set_xlabel("bit flips")
        if wide:  # a long budget: the first flips still get room
            ax.set_xscale("symlog", linthresh=1)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Damage against the number of flips: gradient-guided search vs random flips"
                 + (f"\n{context}" if context else ""), fontsize=11)
    return fig


def _series(ax, x: np.ndarray, attack: np.ndarray, random: list[dict], metric: str, ceiling: float | None) -> None:
    shown = np.where(np.isfinite(attack), attack, ceiling if ceiling else np.nan)
    ax.plot(x, shown, "o-", color=ATTACK, markersize=4, label="gradient-guided (committed flips)")
    off = ~np.isfinite(attack)
    if off.any():
        ax.scatter(x[off], shown[off], marker="^", s=60, color=NONFINITE, zorder=3, label="non-finite outputs")
    counts, median, low, high = random_curve(random, metric)
    if len(counts):
        clip = (lambda v: np.where(np.isfinite(v), v, ceiling)) if ceiling else (lambda v: v)
        ax.plot(counts, clip(median), "s--", color=RANDOM, markersize=4, label="random flips (median of seeds)")
        ax.fill_between(counts, clip(low), clip(high), color=RANDOM, alpha=0.15, label="random: min-max")


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def document(spec, baseline: dict, summary: dict, flips: list[dict], random: list[dict],
             figure: Path) -> render.Document:
    doc = render.Document(f"Bit-flip attack on {spec.model.name} [{spec.model.storage}]")
    reach = ", ".join(f"{k}: {v if v is not None else 'not reached'}" for k, v in summary["flips_to"].items())
    doc.add(render.Para(f"{summary['stop_reason'].capitalize()}. Flips allowed: {allowed(spec)} in "
                        f"`{spec.attack.target}`; clean ppl {value(baseline['ppl'])} on {baseline['tokens']:,} "
                        f"tokens of {spec.data.corpus}. Flips needed for ppl {reach}."),
            render.Para(_random_line(flips, random)),
            render.Figure("damage against flips: the committed sequence beside random flips of the same bits",
                          path=figure),
            render.Heading("The committed flips"), _flip_table(flips),
            render.Para(f"Speed: {summary['steps_per_minute'] or 0:.2f} steps per minute with {summary['replicas']} "
                        f"replica(s) (a step: one backward pass and {spec.attack.evaluate} exact trials). Committed "
                        f"state checksum {summary['checksum_committed']} (clean: {summary['checksum_at_load']})."),
            render.Para("Hear it: `sensray generate --attack <this directory>` (greedy text, clean beside attacked)."))
    return doc


def _random_line(flips: list[dict], random: list[dict]) -> str:
    counts, median, _, high = random_curve(random, "delta_ppl")
    if not len(counts) or not flips:
        return "No random baseline." if not len(counts) else ""
    n = len(flips)
    k = counts[np.searchsorted(counts, n)] if n <= counts[-1] else counts[-1]
    i = int(np.nonzero(counts == k)[0][0])
    return (f"Random flips of the same bits, for comparison: {k} of them gave ppl x{value(median[i])} (median; worst "
            f"x{value(high[i])}), where the search reached x{value(flips[-1]['delta_ppl'])} with {n}.")


def _flip_table(flips: list[dict]) -> render.Table:
    rows = [[str(f["step"] + 1), element(f), value(f["predicted"]), f"x{value(f['delta_ppl'])}", value(f["kl"]),
             render.percent(f["top1_agreement"])]
            + ([f"x{value(f['utility_ratio'])}"] if f.get("utility_ratio") is not None else []) for f in flips]
    headers = ["flip", "element: old -> new", "predicted", "ppl", "KL", "top-1"]
    headers += ["utility ppl"] * bool(flips and flips[0].get("utility_ratio") is not None)
    return render.Table(headers, rows, [True, False, True, True, True, True, True][: len(headers)])
