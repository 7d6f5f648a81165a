"""Transfer's tables and figure, rebuilt from transfer.jsonl (every condition measured so far).

    transfer.parquet           one row per condition x attack: trial_id (joins the sweep's trials.parquet),
                               kind, params, delta_ppl (damage), clean vs attacked NLL, KL, success
    transfer-summary.parquet   per condition x budget: success rate (Wilson 95%), mean NLLs, delta_ppl
    transfer.png               attack success (and NLL increase) against weight damage, a line per budget

Success is judged as in the attack (sensray.adversarial.report.success), with the clean and the
adversarial input both measured on the damaged model.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from sensray.adversarial import report
from sensray.analyze.figures import palette, plain_log_ticks, save
from sensray.errors import SensrayError

CONDITION = ["condition", "source_kind", "source", "trial_id", "kind", "params", "run_delta_ppl", "ppl", "delta_ppl"]
MARKERS = {"baseline": "*", "trial": "o", "model": "s"}


def transfer_rows(conditions: list[dict], spec) -> list[dict]:
    """Flatten the journal: one row per condition x attack, success judged on that condition's model."""
    out = []
    for c in conditions:
        if c["error"] is not None:
            continue
        clean = {m["case"]: m for m in c["measured"] if m["attack"] == "clean"}
        for m in c["measured"]:
            if m["attack"] == "clean":
                continue
            base = clean[m["case"]]
            out.append({**{k: c[k] for k in CONDITION}, "attack": m["attack"], "case": m["case"],
                        "budget": m["budget"], "clean_nll": base["nll"], "nll": m["nll"],
                        "delta_nll": m["nll"] - base["nll"], "kl": m["kl"], "top1_agreement": m["top1_agreement"],
                        "exact_match": m["exact_match"], "success": report.success(spec, base, m)})
    return out


def write_transfer(run, spec) -> Path:
    """transfer.parquet, its summary and figure from the journal; returns transfer.parquet's path."""
    conditions = run.transfer_rows()
    failed = [c for c in conditions if c["error"] is not None]
    if len(failed) == len(conditions):
        raise SensrayError(f"{run.transfer_journal}: every weight condition failed ({failed[0]['error']})")
    frame = pl.DataFrame(transfer_rows(conditions, spec), infer_schema_length=None,
                         schema_overrides={"trial_id": pl.String, "kind": pl.String, "params": pl.String})
    summary = report.rates(frame, CONDITION + ["budget"]).sort("delta_ppl", "budget")
    path = run.write_table("transfer", frame)
    run.write_table("transfer-summary", summary)
    save(transfer_figure(summary, spec, len(failed)), run.path / "transfer")
    return path


def transfer_figure(summary: pl.DataFrame, spec, failed: int = 0) -> Figure:
    """Success rate and mean NLL change (targeted: target NLL) against delta_ppl, a line per budget."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True)
    effect, label = ("nll", "mean target NLL (attacked)") if spec.targeted else (
        "delta_nll", "mean NLL increase, attacked - clean")
    for colour, budget in zip(palette(len(spec.attack.budgets)), spec.attack.budgets):
        s = summary.filter(pl.col("budget") == budget).sort("delta_ppl")
        for ax, y in ((left, "success_rate"), (right, effect)):
            ax.plot(s["delta_ppl"], s[y], color=colour, linewidth=1, alpha=0.7, label=f"budget {budget}")
            for kind, marker in MARKERS.items():
                part = s.filter(pl.col("source_kind") == kind)
                ax.scatter(part["delta_ppl"], part[y], color=colour, marker=marker, s=60 if marker == "*" else 25,
                           zorder=3)
    for r in summary.filter(pl.col("source_kind") == "model").unique("condition").iter_rows(named=True):
        left.annotate(Path(r["source"]).name, (r["delta_ppl"], r["success_rate"]), fontsize=7,
                      xytext=(4, 4), textcoords="offset points")
    left.set(ylabel=f"success rate ({report.criterion(spec)})", ylim=(-0.05, 1.05))
    right.set(ylabel=label)
    for ax in (left, right):
        ax.set(xscale="log", xlabel="weight damage: ppl / undamaged ppl")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.grid(alpha=0.3)
        plain_log_ticks(ax.xaxis)
    left.legend(fontsize=8)
    note = f"; {failed} condition(s) failed, not drawn" if failed else ""
    fig.suptitle(f"transfer of {spec.attack.method.upper()} inputs found on {spec.model.name} to damaged weights "
                 f"(*: undamaged, o: sweep trials, s: exported models{note})", fontsize=10)
    return fig


def text_summary(summary: pl.DataFrame) -> str:
    """One line per condition and budget, for the terminal."""
    lines = ["  condition                                   ppl ratio  budget  success     NLL clean -> attacked"]
    for r in summary.iter_rows(named=True):
        name = r["trial_id"] or (Path(r["source"]).name if r["source"] else "baseline (undamaged)")
        ratio = f"{r['delta_ppl']:.4g}" if r["delta_ppl"] is not None and math.isfinite(r["delta_ppl"]) else "-"
        lines.append(f"  {str(r['kind'] or '') + ' ' + name:<42}  {ratio:>9}  {r['budget']:>6}  "
                     f"{r['successes']:>2}/{r['attacks']:<2} ({r['success_rate']:4.0%})  "
                     f"{r['clean_nll']:7.3f} -> {r['nll']:7.3f}")
    return "\n".join(lines)
