"""A study's report in sentences: what pruning cost, which arm lost less, what each heal recovered.

    findings(rows, heals, dense_ppl)     # rows: the evaluation's models with arm and healing; heals: report.heal_table

Each sentence states numbers from the tables beside it; nothing is said that the table does not hold.
"""

from __future__ import annotations

from typing import Any


def findings(rows: list[dict[str, Any]], heals: list[dict[str, Any]], dense: float) -> list[str]:
    out = [_pruned(r, dense) for r in rows if r["healing"] == "none" and r["arm"] != "dense" and _ok(r)]
    out += _arms(rows)
    out += [_healed(h) for h in heals]
    out += _best(rows, dense)
    return out or ["No model other than the dense one was evaluated."]


def _ok(row: dict) -> bool:
    return row.get("error") is None and row.get("ppl") is not None


def _pruned(row: dict, dense: float) -> str:
    return (f"`{row['target']}` ({100 * row['sparsity']:.1f}% zeros) has perplexity **{row['ppl']:.4g}**, "
            f"{row['ppl'] / dense:.3f}x the dense {dense:.4g}; KL to the dense model {row['kl']:.3g} nats, "
            f"top-1 agreement {100 * row['top1_agreement']:.1f}%.")


def _arms(rows: list[dict]) -> list[str]:
    """Pruning arms compared at each healing state, when several arms were evaluated alike."""
    out = []
    for healing in dict.fromkeys(r["healing"] for r in rows):
        same = sorted((r for r in rows if r["healing"] == healing and r["arm"] != "dense" and _ok(r)),
                      key=lambda r: r["ppl"])
        if len(same) < 2:
            continue
        best, worst = same[0], same[-1]
        state = "pruned, before healing" if healing == "none" else f"after {healing} healing"
        out.append(f"{state}: `{best['arm']}` keeps the lower perplexity, {best['ppl']:.4g} against "
                   f"{worst['ppl']:.4g} for `{worst['arm']}` ({worst['ppl'] / best['ppl'] - 1:+.1%}).")
    return out


def _healed(heal: dict) -> str:
    if heal["recovered"] is None:
        recovered = "(its source was no worse than the dense model)"
    elif heal["recovered"] < 0:
        recovered = f"worse than before: it added {-100 * heal['recovered']:.0f}% to what pruning had cost"
    else:
        recovered = f"recovering {100 * heal['recovered']:.0f}% of what pruning had cost"
    return (f"`{heal['stage']}` ({heal['method']}, {heal['steps']} steps, {heal['trainable']:,} trainable "
            f"parameters = {100 * heal['share']:.2f}% of the model) took `{heal['model']}` from perplexity "
            f"{heal['ppl_before']:.4g} to **{heal['ppl_after']:.4g}**, {recovered}; its sparsity stayed "
            f"{100 * heal['sparsity']:.2f}%.")


def _best(rows: list[dict], dense: float) -> list[str]:
    sparse = [r for r in rows if r["arm"] != "dense" and _ok(r)]
    if not sparse:
        return []
    best = min(sparse, key=lambda r: r["ppl"])
    relation = "below" if best["ppl"] < dense else "above"
    return [f"The best sparse model is `{best['target']}`: perplexity {best['ppl']:.4g}, "
            f"{abs(best['ppl'] / dense - 1):.1%} {relation} the dense model, at {100 * best['sparsity']:.1f}% zeros."]
