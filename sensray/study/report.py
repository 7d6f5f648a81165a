"""The `report` stage: one comparison of every model a study made, with figures, from its files alone.

    - {name: report, kind: report, evaluation: evaluation}

    <study>/report/report.md, report.html (self-contained), summary.json,
                   ppl-by-stage.png, healing.png, allocation.png

Each evaluated model is placed by its lineage: the pruning it descends from (its arm: dense,
or a prune stage such as sensitivity-allocated or uniform wanda) and the healing applied to it
(none, lora, masked). The report compares perplexity, KL and top-1 agreement per stage, the arms
at equal sparsity, and each heal before and after (with the share of the pruning damage it
recovered), and lists the time of every stage. It reads the study directory, never a model.
"""

from __future__ import annotations

import json
import shutil
from typing import Any, Optional

import numpy as np
from matplotlib.figure import Figure
from pydantic import Field

from sensray.analyze.figures import BASELINE_STYLE, palette
from sensray.analyze.render import Bullets, Code, Document, Heading, Para, Table, html, markdown, percent
from sensray.analyze.render import Figure as FigureBlock
from sensray.spec import Frozen
from sensray.study.stages import DENSE, Stage, StageContext, StageResult, register

HATCH = {"none": "", "lora": "//", "masked": ".."}


class ReportParams(Frozen):
    evaluation: str = Field(description="an earlier evaluate stage")
    title: Optional[str] = None


@register
class Report(Stage):
    kind, produces = "report", "report"
    summary = "a comparison of every model: ppl/KL/top-1 per stage, allocated vs uniform, before/after healing"
    Params = ReportParams
    needs = {"evaluation": ("evaluation",)}
    reads_all = True  # stage times and every heal's curve

    def run(self, ctx: StageContext) -> StageResult:
        from sensray.study.evaluation import read_evaluation

        rows, baseline = read_evaluation(ctx.output_of(self.params.evaluation))
        for row in rows:
            row["arm"], row["healing"] = lineage(ctx, row["target"])
        doc = Document(self.params.title or f"sensray study: {ctx.spec.name}")
        figures = write_figures(ctx, rows, baseline)
        build(doc, ctx, rows, baseline, figures)
        (ctx.dir / "report.md").write_text(markdown(doc, ctx.dir), encoding="utf-8")
        (ctx.dir / "report.html").write_text(html(doc), encoding="utf-8")
        summary = {"models": {r["target"]: {k: r.get(k) for k in ("arm", "healing", "ppl", "kl", "top1_agreement",
                                                                   "sparsity", *task_scores(rows))} for r in rows},
                   "heals": heal_table(ctx, rows, baseline["ppl"]), "stages": stage_times(ctx)}
        (ctx.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        return StageResult(ctx.dir, {"models": summary["models"]}, None)


def lineage(ctx: StageContext, name: str) -> tuple[str, str]:
    """(arm, healing) of a model: the prune stage it descends from (or dense), the heal methods on top."""
    if name == DENSE:
        return DENSE, "none"
    stage = ctx.stage_named(name)
    if stage.kind == "heal":
        arm, healing = lineage(ctx, stage.params.model)
        return arm, stage.params.method if healing == "none" else f"{healing}+{stage.params.method}"
    return name, "none"


def heal_table(ctx: StageContext, rows: list[dict], dense_ppl: float) -> list[dict[str, Any]]:
    """Per heal stage: ppl before and after (its own record), the share of the pruning damage recovered."""
    out = []
    for stage in ctx.study.stages[: ctx.stage.index]:
        if stage.kind != "heal" or stage.name not in ctx.records:
            continue
        record = json.loads((ctx.output_of(stage.name) / "sensray-heal.json").read_text(encoding="utf-8"))
        before, after = record["eval"]["ppl_before"], record["eval"]["ppl_after"]
        damage = before - dense_ppl
        out.append({"stage": stage.name, "model": stage.params.model, "method": stage.params.method,
                    "steps": record["steps"], "lr": record["recipe"]["lr"],
                    "trainable": record["trainable"]["parameters"], "share": record["trainable"]["share_of_model"],
                    "ppl_before": before, "ppl_after": after, "ppl_unmasked": record["eval"].get("ppl_merged_unmasked"),
                    "recovered": (before - after) / damage if damage > 0 else None,
                    "sparsity": record["achieved"]["overall"], "curve": record["loss_curve"]})
    return out


def stage_times(ctx: StageContext) -> list[dict[str, Any]]:
    return [{"stage": s.name, "kind": s.kind, "seconds": ctx.records[s.name].seconds if s.name in ctx.records else None}
            for s in ctx.study.stages[: ctx.stage.index]]


def write_figures(ctx: StageContext, rows: list[dict], baseline: dict) -> dict[str, str]:
    """stem -> caption of each figure written into the stage directory."""
    made = {}
    ppl_by_stage(rows, baseline["ppl"], ctx.spec.name).savefig(ctx.dir / "ppl-by-stage.png", dpi=130,
                                                               facecolor="white")
    made["ppl-by-stage"] = ("Perplexity and KL to the dense model of every model, coloured by the pruning it "
                            "descends from, hatched by the healing applied")
    heals = heal_table(ctx, rows, baseline["ppl"])
    if heals:
        healing_figure(heals, baseline["ppl"], ctx.spec.name).savefig(ctx.dir / "healing.png", dpi=130,
                                                                      facecolor="white")
        made["healing"] = ("Each heal: eval perplexity before and after (left, the dense model as a line), and its "
                           "training loss per step (right)")
    allocations = [s for s in ctx.study.stages[: ctx.stage.index] if s.kind == "allocate" and s.name in ctx.records]
    for stage in allocations[:1]:
        shutil.copyfile(ctx.output_of(stage.name) / "allocation.png", ctx.dir / "allocation.png")
        made["allocation"] = f"Sparsity allotted per tensor by {stage.name}, with each tensor's sensitivity"
    return made


def healing_figure(heals: list[dict], dense_ppl: float, study: str) -> Figure:
    """Left: each heal's eval ppl before -> after (a slope per heal); right: the training loss curves."""
    from sensray.heal.figure import draw_loss_curves

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    slopes, curves = fig.subplots(1, 2, width_ratios=(1, 2))
    for heal, colour in zip(heals, palette(max(2, len(heals)))):
        slopes.plot([0, 1], [heal["ppl_before"], heal["ppl_after"]], "o-", color=colour, label=heal["stage"])
    slopes.axhline(dense_ppl, **BASELINE_STYLE, label=f"dense ({dense_ppl:.4g})")
    slopes.set(xticks=[0, 1], xticklabels=["before (pruned)", "after (healed)"], xlim=(-0.3, 1.3),
               ylabel="perplexity (eval text)")
    slopes.legend(fontsize=8)
    draw_loss_curves(curves, {h["stage"]: h["curve"] for h in heals})
    fig.suptitle(f"{study}: healing, before and after, and the training loss", fontsize=11)
    return fig


def ppl_by_stage(rows: list[dict], dense_ppl: float, study: str) -> Figure:
    """Two panels over the models: perplexity (dense as a line) and KL to the dense model (log)."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colours = dict(zip(arms, palette(max(2, len(arms)))))
    fig = Figure(figsize=(max(7.5, 0.9 * len(rows) + 3), 6.8), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(rows))
    for ax, key in ((top, "ppl"), (bottom, "kl")):
        values = [r.get(key) if r.get(key) is not None else np.nan for r in rows]
        ax.bar(x, values, color=[colours[r["arm"]] for r in rows], hatch=[HATCH.get(r["healing"], "xx") for r in rows],
               edgecolor="white")
    top.axhline(dense_ppl, **BASELINE_STYLE, label=f"dense ({dense_ppl:.4g})")
    finite = [r["ppl"] for r in rows if r.get("ppl") is not None and np.isfinite(r["ppl"])]
    top.set(ylabel="perplexity (eval text)", ylim=(min(finite + [dense_ppl]) * 0.95, max(finite + [dense_ppl]) * 1.03))
    bottom.set(ylabel="KL(dense || model), nats (log)", yscale="log")
    bottom.set_xticks(x, [r["target"] for r in rows], rotation=20, ha="right")
    from matplotlib.patches import Patch

    legend = [Patch(color=colours[a], label=f"pruning: {a}") for a in arms]
    legend += [Patch(facecolor="white", edgecolor="black", hatch=h, label=f"healing: {k}") for k, h in HATCH.items()
               if any(r["healing"] == k for r in rows)]
    fig.legend(handles=legend + top.get_legend_handles_labels()[0], fontsize=8, loc="outside right upper")
    fig.suptitle(f"{study}: every model against the dense one", fontsize=11)
    return fig


def build(doc: Document, ctx: StageContext, rows: list[dict], baseline: dict, figures: dict[str, str]) -> None:
    """The report's sections: reading, models, heals, figures, stages."""
    from sensray.study.reading import findings

    dense = baseline["ppl"]
    heals = heal_table(ctx, rows, dense)
    doc.add(Heading("What was run"), Para(
        f"Study `{ctx.spec.name}` on `{ctx.spec.model.name}` [{ctx.spec.model.dtype}]; every model measured on "
        f"`{ctx.spec.eval.corpus}` ({baseline['tokens']:,} tokens) against the dense model's predictions."))
    doc.add(Heading("Reading"), Bullets(findings(rows, heals, dense)))
    doc.add(Heading("Models"), Table(
        ["model", "pruning", "healing", "sparsity", "ppl", "x dense", "KL to dense", "top-1 agreement"],
        [[r["target"], r["arm"], r["healing"], _pct(r.get("sparsity")), _num(r.get("ppl")),
          _num(r.get("delta_ppl")), _num(r.get("kl")), percent(r.get("top1_agreement"))] for r in rows],
        [False, False, False, True, True, True, True, True]))
    if task_scores(rows):
        doc.add(Heading("Tasks"), tasks_table(rows), Para(
            "lm-eval scores of each model (± lm-eval's standard error), on the documents of the evaluation stage's "
            "`tasks` (`limit` caps them per task)."))
    if heals:
        doc.add(Heading("Healing"), Table(
            ["heal", "of", "method", "steps", "lr", "trainable", "ppl before", "ppl after", "damage recovered",
             "sparsity after", "ppl merged, unmasked"],
            [[h["stage"], h["model"], h["method"], str(h["steps"]), f"{h['lr']:g}",
              f"{h['trainable']:,} ({percent(h['share'])})", _num(h["ppl_before"]), _num(h["ppl_after"]),
              percent(h["recovered"]), _pct(h["sparsity"]), _num(h["ppl_unmasked"])] for h in heals],
            [False, False, False, True, True, True, True, True, True, True, True]),
            Para("A LoRA merge makes every pruned weight of an adapted matrix nonzero; the last column is the merged "
                 "model's perplexity before the mask was put back, i.e. what keeping the sparsity costs."))
    doc.add(Heading("Figures"), *[FigureBlock(caption, path=ctx.dir / f"{stem}.png") for stem, caption in figures.items()])
    times = stage_times(ctx)
    doc.add(Heading("Stages"), Table(["stage", "kind", "seconds"],
                                     [[t["stage"], t["kind"], f"{t['seconds']:.1f}"] for t in times],
                                     [False, False, True]))
    commands = [f"# {t['stage']}\n{ctx.records[t['stage']].command}" for t in times if ctx.records[t["stage"]].command]
    doc.add(Para("Each of these stages alone, as the study ran it:"), Code("\n".join(commands)))


def task_scores(rows: list[dict]) -> list[str]:
    """The lm-eval score columns of the evaluation rows (`<task>/<metric>`), without stderrs and counts."""
    from sensray.results import is_task_column

    names = dict.fromkeys(k for r in rows for k in r if is_task_column(k))
    return [k for k in names if "/" in k and not k.endswith(("_stderr", "/n"))]


def tasks_table(rows: list[dict]) -> Table:
    scores = task_scores(rows)

    def cell(r: dict, k: str) -> str:
        err = r.get(f"{k}_stderr")
        return _num(r.get(k)) + (f" ± {_num(err)}" if isinstance(err, float) else "")

    return Table(["model", *scores], [[r["target"], *(cell(r, k) for k in scores)] for r in rows],
                 [False, *([True] * len(scores))])


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"
