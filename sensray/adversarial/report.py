"""What a finished attack reports: per-budget success and NLL, figures, clean vs adversarial continuations.

    table = budget_table(attacks)             # polars: one row per budget
    fig = loss_figure(steps, attacks, spec)   # objective per step, one panel per budget, a line per case
    fig = success_figure(table, spec)         # success rate (Wilson 95%) and mean NLL, clean vs attacked

Figures use matplotlib's Figure directly (no pyplot), as sensray.analyze.figures does, and its
`save`, `palette` and log-axis ticks. Reads only tables: a run directory can be re-reported.
"""

from __future__ import annotations

import polars as pl
from matplotlib.figure import Figure

from sensray.adversarial.spec import AdversarialSpec
from sensray.analyze.figures import palette
from sensray.analyze.tables import wilson_interval

OBJECTIVE_AXIS = {  # objective -> (what the loss means as a quantity, how to get it from the loss)
    "nll": ("continuation NLL (nats/token), attack raises it", -1.0),
    "kl": ("KL(clean || attacked) per token, attack raises it", -1.0),
    "target": ("target NLL (nats/token), attack lowers it", 1.0),
}


def success(spec: AdversarialSpec, clean: dict, attacked: dict) -> bool:
    """The attack's criterion on one input, under one model (clean and attacked measured on that model)."""
    if spec.attack.objective == "target":
        return bool(attacked["exact_match"])
    if spec.attack.objective == "kl":
        return attacked["kl"] >= spec.attack.success_at
    return attacked["nll"] - clean["nll"] >= spec.attack.success_at


def rates(frame: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Success count, rate and Wilson 95% interval, mean NLLs (clean and attacked) and KL, per group."""
    table = frame.group_by(by, maintain_order=True).agg(
        pl.len().alias("attacks"), pl.col("success").sum().alias("successes"),
        pl.col("clean_nll").mean(), *[pl.col(c).mean() for c in frame.columns if c == "start_nll"],
        pl.col("nll").mean(), (pl.col("nll") - pl.col("clean_nll")).mean().alias("delta_nll"), pl.col("kl").mean(),
        pl.col("exact_match").mean().alias("exact_match_rate"))
    ci = [wilson_interval(k, n) for k, n in zip(table["successes"], table["attacks"])]
    return table.with_columns(
        (pl.col("successes") / pl.col("attacks")).alias("success_rate"),
        pl.Series("ci_low", [c[0] for c in ci]), pl.Series("ci_high", [c[1] for c in ci])).sort(by)


def budget_table(attacks: pl.DataFrame) -> pl.DataFrame:
    steps = attacks.group_by("budget").agg(pl.col("steps").mean().alias("mean_steps"),
                                           (pl.col("seconds").sum() / pl.col("steps").sum()).alias("seconds_per_step"))
    return rates(attacks, ["budget"]).join(steps, on="budget").sort("budget")


def text_table(table: pl.DataFrame, objective: str) -> str:
    """The per-budget table in words, for the terminal and summary."""
    what = "target NLL" if objective == "target" else "NLL"
    lines = [f"  budget  success        {what}: clean  unoptimised  attacked     KL  s/step"]
    for r in table.iter_rows(named=True):
        lines.append(f"  {r['budget']:>6}  {r['successes']:>2}/{r['attacks']:<2} ({r['success_rate']:4.0%})  "
                     f"{' ' * len(what)}{r['clean_nll']:7.3f}  {r['start_nll']:11.3f}  {r['nll']:8.3f}  "
                     f"{r['kl']:5.3f}  {r['seconds_per_step']:6.2f}")
    return "\n".join(lines + ["  (unoptimised: the same number of init tokens, before the search)"])


def loss_figure(steps: pl.DataFrame, attacks: pl.DataFrame, spec: AdversarialSpec) -> Figure:
    """The objective per step: one panel per budget, one line per case, the clean value dotted."""
    label, sign = OBJECTIVE_AXIS[spec.attack.objective]
    budgets = spec.attack.budgets
    fig = Figure(figsize=(4.2 * len(budgets), 3.6), layout="constrained")
    axes = fig.subplots(1, len(budgets), squeeze=False, sharey=True)[0]
    colours = palette(attacks["case"].n_unique())
    cases = sorted(attacks["case"].unique().to_list())
    for ax, budget in zip(axes, budgets):
        for colour, case in zip(colours, cases):
            s = steps.filter((pl.col("budget") == budget) & (pl.col("case") == case)).sort("step")
            ax.plot(s["step"], sign * s["loss"], color=colour, linewidth=1.2, label=f"case {case}")
            clean = attacks.filter((pl.col("budget") == budget) & (pl.col("case") == case))
            if spec.attack.objective != "kl" and len(clean):
                ax.axhline(clean["clean_nll"][0], color=colour, linewidth=0.8, linestyle=":")
        ax.set_title(f"budget {budget} token{'s' * (budget != 1)}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(label)
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{spec.attack.method.upper()} on {spec.model.name}: {spec.attack.edit}, objective "
                 f"{spec.attack.objective} (dotted: clean input)", fontsize=11)
    return fig


def success_figure(table: pl.DataFrame, spec: AdversarialSpec) -> Figure:
    """Success rate vs budget (Wilson 95% bars), and mean NLL clean vs attacked vs budget."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    b, rate = table["budget"].to_list(), table["success_rate"].to_list()
    err = [[r - lo for r, lo in zip(rate, table["ci_low"])], [hi - r for r, hi in zip(rate, table["ci_high"])]]
    left.errorbar(b, rate, yerr=err, marker="o", capsize=3, color="#b2182b")
    left.set(xlabel="edit budget (tokens)", ylabel="success rate", ylim=(-0.05, 1.05), xscale="log",
             title=f"success: {criterion(spec)}")
    right.plot(b, table["clean_nll"], marker="s", color="black", label="clean")
    right.plot(b, table["start_nll"], marker="^", color="grey", label=f"{spec.attack.init!r} x budget")
    right.plot(b, table["nll"], marker="o", color="#b2182b", label="attacked")
    right.set(xlabel="edit budget (tokens)", ylabel="target NLL" if spec.targeted else "continuation NLL",
              xscale="log", title="mean NLL (nats/token)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(b, [str(x) for x in b])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{spec.attack.method.upper()} on {spec.model.name} ({spec.attack.edit})", fontsize=11)
    return fig


def criterion(spec: AdversarialSpec) -> str:
    a = spec.attack
    if a.objective == "target":
        return "the model says the target (greedy)"
    return f"KL >= {a.success_at:g}" if a.objective == "kl" else f"NLL up >= {a.success_at:g} nats/token"


def continuations_text(rows: list[dict], width: int) -> str:
    """Clean vs adversarial continuations, one block per attack (markdown)."""
    from sensray.generate import compare_texts

    out = []
    for r in rows:
        out.append(f"## case {r['case']} ({r['source']}), budget {r['budget']}: "
                   f"{'success' if r['success'] else 'no success'}\n")
        out.append(f"- prompt: {r['prompt']!r}\n- adversarial edit: {r['text']!r} (ids {r['ids']})\n"
                   f"- NLL {r['clean_nll']:.3f} -> {r['nll']:.3f}\n")
        out.append("```\n" + compare_texts("clean input", r["clean_continuation"], "adversarial input",
                                           r["continuation"], width) + "\n```\n")
    return "\n".join(out)
