"""What a super-weight search writes: tables (printed and markdown), the activation figure, JSON.

    figure = activation_figure(discovery, context="sensray-tiny, 4096 calibration tokens")
    save_figure(figure, out / "activations.png")
    (out / "report.md").write_text(markdown(discovery, verdicts, setup))

Figures follow sensray.analyze.figures: a `matplotlib.figure.Figure` drawn by the Agg canvas, never
pyplot; titled; axes with units; the reference (each layer's median channel) drawn on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from sensray.superweights.discovery import Discovery, LayerActivations, Pair, Thresholds
from sensray.superweights.verify import DESTRUCTIVE, EFFECT_RATIO, MATERIAL_KL, Effect, Verdict

SPIKE = "#b2182b"


# --------------------------------------------------------------------------- figure

def activation_figure(discovery: Discovery, context: str = "") -> Figure:
    """Per layer, the largest |input| and |output| of the MLP down projection (log), beside the
    median channel and the detection threshold; candidates starred and named."""
    layers = [a.layer for a in discovery.layers]
    fig = Figure(figsize=(max(6.0, 2.5 + 0.3 * len(layers)), 6.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, side in zip(axes, ("input", "output")):
        _panel(ax, discovery, side)
    axes[1].set_xlabel("decoder block (blocks.L.mlp.down)")
    axes[1].set_xticks(layers)
    fig.suptitle("Largest activations at the MLP down projection, per block" + (f"\n{context}" if context else ""),
                 fontsize=11)
    return fig


def _panel(ax, discovery: Discovery, side: str) -> None:
    th = discovery.thresholds
    layers = np.array([a.layer for a in discovery.layers])
    peak = np.array([_values(a, side).max() for a in discovery.layers])
    median = np.array([np.median(_values(a, side)) for a in discovery.layers])
    ax.plot(layers, peak, "o-", color="#2166ac", label=f"largest channel (max |{side}| over tokens)")
    ax.plot(layers, median, "-", color="black", linewidth=1.2, label="median channel")
    threshold = np.maximum(th.min_magnitude, th.min_ratio * median)
    ax.plot(layers, threshold, "--", color=SPIKE, linewidth=1.0,
            label=f"spike threshold: max({th.min_magnitude:g}, {th.min_ratio:g} x median)")
    for pair in discovery.candidates:
        value = pair.input if side == "input" else pair.output
        channel = pair.col if side == "input" else pair.row
        ax.plot([pair.layer], [value], marker="*", markersize=15, color=SPIKE, linestyle="none")
        right = pair.layer > (layers.min() + layers.max()) / 2  # label on the inner side, never off the axes
        ax.annotate(f"{pair.name}\n{side} channel {channel}", (pair.layer, value), textcoords="offset points",
                    xytext=(-10 if right else 10, -4), ha="right" if right else "left", va="top", fontsize=8,
                    color=SPIKE)
    if discovery.candidates:
        ax.plot([], [], marker="*", markersize=12, color=SPIKE, linestyle="none", label="candidate super weight")
    ax.set_yscale("log")
    ax.margins(x=0.08)
    ax.set_ylabel(f"|{side}| of down (log)")
    ax.set_title(f"{side}s of mlp.down ({'input channel j' if side == 'input' else 'output channel i'})",
                 fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="best")


def _values(acts: LayerActivations, side: str) -> np.ndarray:
    return acts.inputs if side == "input" else acts.outputs


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=130)
    return path


# --------------------------------------------------------------------------- tables

def layer_table(discovery: Discovery) -> list[str]:
    """One markdown row per block: its largest input and output channel, and whether it spikes."""
    marked = {p.layer: p for p in discovery.candidates}
    lines = ["| block | max \\|input\\| (channel) | x median | max \\|output\\| (channel) | x median | candidate |",
             "|---:|---:|---:|---:|---:|---|"]
    for a in discovery.layers:
        j, i = int(a.inputs.argmax()), int(a.outputs.argmax())
        cand = ", ".join(p.name for p in discovery.candidates if p.layer == a.layer) if a.layer in marked else "-"
        lines.append(f"| {a.layer} | {a.inputs[j]:.4g} ({j}) | {a.inputs[j] / max(a.input_median, 1e-30):.1f} | "
                     f"{a.outputs[i]:.4g} ({i}) | {a.outputs[i] / max(a.output_median, 1e-30):.1f} | {cand} |")
    return lines


def pair_table(pairs: list[Pair], decode=None) -> list[str]:
    lines = ["| weight | \\|x_j\\| at peak (x median) | \\|y_i\\| peak (x median) | share of y_i | W[i, j] "
             "| magnitude rank | token (window, position) |", "|---|---:|---:|---:|---:|---:|---|"]
    for p in pairs:
        token = repr(decode(p.token)) if decode else str(p.token)
        lines.append(f"| `{p.name}` | {p.input:.4g} ({p.input_ratio:.0f}x) | {p.output:.4g} ({p.output_ratio:.0f}x) | "
                     f"{p.share:.2f} | {p.weight:.4g} | {p.magnitude_rank} | {token} ({p.window}, {p.position}) |")
    return lines


def verdict_table(verdicts: list[Verdict]) -> list[str]:
    lines = ["| weight | zeroed: delta_ppl, KL | random (n): delta_ppl median [min, max], max KL | top-1: delta_ppl, KL "
             "| KL / max random KL | verdict |", "|---|---:|---:|---:|---:|---|"]
    for v in verdicts:
        top_note = " (is the candidate)" if v.top_includes_candidate else ""
        times = "-" if v.candidate is None or v.random is None else _times(v.candidate.kl, v.random.kl_max)
        lines.append(f"| `{v.pair.name}`{'' if v.pair.candidate else ' (below thresholds)'} | {_effect(v.candidate)} | "
                     f"{_range(v.random)} | {_effect(v.top)}{top_note} | {times} | **{v.verdict}** |")
    return lines


def _ratio(x: float) -> str:
    """delta_ppl readably: 1.00002 near the baseline, 812.4 far from it."""
    return f"{x:.5f}" if x < 10 else f"{x:.4g}"


def _times(kl: float, reference: float) -> str:
    return "inf" if reference <= 0 else f"{kl / reference:.3g}x"


def _effect(e: Effect | None) -> str:
    return "failed" if e is None else f"{_ratio(e.delta_ppl)}, {e.kl:.3g}"


def _range(e: Effect | None) -> str:
    if e is None:
        return "failed"
    return f"({e.n}) {_ratio(e.delta_ppl)} [{_ratio(e.delta_min)}, {_ratio(e.delta_max)}], {e.kl_max:.3g}"


def printed(lines: list[str]) -> str:
    """A markdown table as plain aligned text for the terminal."""
    rows = [[c.strip().replace("\\|", "|").replace("**", "").replace("`", "") for c in line.strip("|").split(" | ")]
            for line in lines if not set(line) <= set("|-: ")]
    widths = [max(len(r[k]) for r in rows if k < len(r)) for k in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --------------------------------------------------------------------------- report

def markdown(discovery: Discovery, verdicts: list[Verdict] | None, setup: dict, decode=None) -> str:
    th: Thresholds = discovery.thresholds
    out = [f"# Super weights of {setup['model']}", "",
           f"Calibration: `{setup['calibration']}`, {discovery.tokens} tokens. Spike thresholds: |activation| >= "
           f"{th.min_magnitude:g} and >= {th.min_ratio:g} x the block's median channel maximum; the one weight must "
           f"carry >= {th.min_share:g} of the output spike at its peak token.", "",
           "## Discovery: the MLP down projection of every block", "", *layer_table(discovery), "",
           "![largest activations per block](activations.png)", ""]
    cands = discovery.candidates
    out += ["## Candidates", ""]
    out += pair_table(cands, decode) if cands else ["No pair of channels spikes together at these thresholds: "
                                                    "no candidate super weight."]
    if verdicts is None:
        return "\n".join(out + ["", "Verification was not run (--discover-only)."]) + "\n"
    out += ["", "## Verification", ""]
    if not verdicts:
        return "\n".join(out + ["Nothing to verify."]) + "\n"
    below = [v.pair for v in verdicts if not v.pair.candidate]
    if below:
        out += ["Also verified, below the thresholds (the most coordinated pairs, for scale):", "",
                *pair_table(below, decode), ""]
    out += [f"Eval: `{setup['eval']}`, baseline ppl {setup['baseline_ppl']:.4g}. Each weight is zeroed alone; the "
            f"controls zero one random weight of the same tensor (one trial per seed) and its largest-magnitude "
            f"weight. Effect = KL from the unperturbed predictions (nats/token). A candidate is outsized when its KL "
            f"is >= {EFFECT_RATIO:g}x every random control's, >= the top-magnitude control's and >= {MATERIAL_KL:g}; "
            f"a super weight when it is outsized and zeroing it multiplies perplexity by >= {DESTRUCTIVE:g}.", "",
            *verdict_table(verdicts), "", "Sweeps (trials.parquet, spec.yaml, baseline.json):", "",
            *[f"- `{run}`" for run in setup["runs"]]]
    return "\n".join(out) + "\n"
