"""Bit flips, fault by fault: which fields, bits and weight matrices are catastrophic.

    python -m sensray.analyze results/bitflip/<run id>     # sections "Bit fields", "Bit positions", "Matrices hit"

    from sensray.analyze.faults import classify
    classify(trials, "float32")["fault"]     # sign / exponent MSB / other exponent bits / mantissa

The study asks for a field (`sign`, `exponent`, `exponent_msb`, `mantissa`) and the sweep draws a
bit of it; the row records the bit actually flipped (`flipped_bit`) and the tensor hit (`tensor`).
`exponent` draws any exponent bit, its most significant one included, so it overlaps
`exponent_msb`: the tables here say so and separate the two by the bit that flipped. Matrices come
from the tensor the flip landed in, not from the target pattern (a `blocks.3` target spreads its
flips over every weight of the block, in proportion to their sizes).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from sensray.analyze import fmt, tables
from sensray.analyze.figures import TEXT, WIDTH, flip_heatmap, share_heatmap, title
from sensray.analyze.overview import summary_note
from sensray.analyze.render import Figure as FigureBlock
from sensray.analyze.render import Para, Table
from sensray.analyze.sections import Context, Section, section

CLASSES = ("sign", "exponent MSB", "other exponent bits", "mantissa")


@lru_cache(maxsize=None)
def layout(dtype: str) -> dict[str, tuple[int, ...]]:
    """Bit positions of each IEEE field of a storage dtype (the bit-flip kind's own table)."""
    import torch

    from sensray.perturbations.bitflip import LAYOUTS

    return LAYOUTS.get(getattr(torch, dtype, None), LAYOUTS[torch.float32])


def fault_of(bit: int, dtype: str) -> str:
    fields = layout(dtype)
    if bit in fields["sign"]:
        return "sign"
    if bit in fields["exponent_msb"]:
        return "exponent MSB"
    return "other exponent bits" if bit in fields["exponent"] else "mantissa"


def bits_of(fault: str, dtype: str) -> str:
    """The bit positions of a fault class, as words: `bit 30`, `bits 23–29`."""
    fields = layout(dtype)
    bits = {"sign": fields["sign"], "exponent MSB": fields["exponent_msb"], "mantissa": fields["mantissa"],
            "other exponent bits": tuple(b for b in fields["exponent"] if b not in fields["exponent_msb"])}[fault]
    return f"bit {bits[0]}" if len(bits) == 1 else f"bits {min(bits)}–{max(bits)}"


def classify(trials: pl.DataFrame, dtype: str) -> pl.DataFrame:
    """Trials that flipped one bit position, with `fault`: the IEEE field of the bit that flipped, the
    exponent's most significant bit apart from the rest of the exponent."""
    t = tables.annotate(trials).filter(pl.col("flipped_bit").is_not_null())
    names = {b: fault_of(b, dtype) for b in t["flipped_bit"].unique().to_list()}
    return t.with_columns(pl.col("flipped_bit").replace_strict(names, return_dtype=pl.String).alias("fault"))


def _applies(ctx: Context) -> bool:
    """Do the rows say which bit each trial flipped (provenance, recorded since sensray 0.1)?"""
    t = ctx.trials
    return ctx.kind == "bitflip" and "flipped_bit" in t.columns and t["flipped_bit"].drop_nulls().len() > 0


def _by_fault(ctx: Context, t: pl.DataFrame, by: tuple[str, ...] = ()) -> pl.DataFrame:
    order = {c: i for i, c in enumerate(CLASSES)}
    table = tables.summarize(t, ["fault", *by], ctx.threshold, ctx.seq)
    return table.sort(pl.col("fault").replace_strict(order, return_dtype=pl.Int64), *by)


@section(order=10)
def fields(ctx: Context) -> Section | None:
    """The fields asked for, then (when the rows record it) the same trials by the field of the bit
    that actually flipped."""
    asked = tables.by_flip(ctx.trials, ctx.threshold, ctx.seq) if ctx.kind == "bitflip" else pl.DataFrame()
    if asked.is_empty():
        return None
    blocks = [Table.of(asked, title="Per field asked for", note=summary_note(ctx, "in IEEE order"))]
    data, answers = {"by_field_asked": asked}, [_asked_answer(asked)]
    if _applies(ctx):
        dtype = ctx.run.baseline.get("dtype", "float32")
        t = classify(ctx.trials, dtype)
        separated = _by_fault(ctx, t)
        blocks = [Para(" ".join(filter(None, (_positions(t), _overlap(t, dtype))))), *blocks,
                  Table.of(separated, title="Per field of the bit that actually flipped",
                           note="The exponent's most significant bit apart from the other exponent bits. "
                                + summary_note(ctx, "in IEEE order"))]
        data["by_field_flipped"] = separated
        answers = [_catastrophic_bits(ctx, separated), _overlap(t, dtype), _agreement(ctx, t)]
    plot = flip_heatmap(ctx.trials, ctx.baseline_ppl, ctx.threshold, ctx.ceiling, ctx.caption_context)
    if plot is not None:
        blocks.append(FigureBlock(plot.caption, "bitflip-heatmap", plot.fig))
    return Section("fields", "Bit fields", blocks, answers=[a for a in answers if a], data=data)


def _asked_answer(asked: pl.DataFrame) -> str:
    """Without provenance, the fields as asked: which were catastrophic, how often."""
    return "**Catastrophic faults by the field asked for**: " + ", ".join(
        f"`{r['flip']}` {r['catastrophic']} of {r['n']} ({fmt.percent(r['share'])})" for r in asked.iter_rows(named=True)
    ) + " (the rows do not record which bit flipped, so `exponent` and `exponent_msb` overlap)."


@section(order=11)
def bits(ctx: Context) -> Section | None:
    """Every bit position that flipped: the catastrophic share and the KL of each."""
    if not _applies(ctx):
        return None
    dtype = ctx.run.baseline.get("dtype", "float32")
    per_bit = tables.by_bit(ctx.trials, ctx.threshold, ctx.seq)
    per_bit = per_bit.with_columns(pl.col("flipped_bit").map_elements(lambda b: fault_of(b, dtype),
                                                                      return_dtype=pl.String).alias("field"))
    per_bit = per_bit.select("flipped_bit", "field", *[c for c in per_bit.columns if c not in ("flipped_bit", "field")])
    note = ("One row per bit position that flipped (0 = least significant). "
            + summary_note(ctx, "most significant bit first"))
    fig = bit_profile(classify(ctx.trials, dtype), per_bit, dtype, ctx.caption_context)
    caption = ("Top: share of catastrophic trials per bit position that flipped, with its 95% Wilson interval and "
               "the number of trials above each bar. Bottom: every trial's KL from the unperturbed model (log "
               "scale), the median a bar; shading marks the IEEE fields.")
    return Section("bits", "Bit positions", [Table.of(per_bit.rename({"flipped_bit": "bit"}), note=note),
                                             FigureBlock(caption, "bitflip-bits", fig)], data={"by_bit": per_bit})


@section(order=12)
def matrices(ctx: Context) -> Section | None:
    """Which weight matrices the flips landed in, and which of those faults were catastrophic."""
    if not _applies(ctx) or "tensor" not in ctx.trials.columns:
        return None
    t = classify(ctx.trials, ctx.run.baseline.get("dtype", "float32")).filter(pl.col("tensor").is_not_null())
    t = t.with_columns(pl.col("tensor").map_elements(tables.matrix_of, return_dtype=pl.String).alias("matrix"))
    stats = tables.summarize(t, ["matrix", "fault"], ctx.threshold)
    rows = sorted(t["matrix"].unique().to_list(), key=tables.module_rank)
    cols = [c for c in CLASSES if c in t["fault"].unique().to_list()]
    fig = share_heatmap(stats, "matrix", "fault", rows, cols, ctx.caption_context,
                        "Bit flips: catastrophic share per matrix hit and field flipped",
                        "IEEE field of the bit that flipped", "weight matrix hit")
    per_matrix = tables.summarize(t, ["matrix"], ctx.threshold, ctx.seq).sort(tables.module_order("matrix"))
    caption = ("Per weight matrix the flip landed in (the trial's `tensor`, not its target pattern) and IEEE field of "
               "the bit that flipped: catastrophic trials / trials, and the median ppl / baseline; coloured by the "
               "catastrophic share; rows in model order.")
    return Section("matrices", "Matrices hit", [
        FigureBlock(caption, "bitflip-matrices", fig),
        Table.of(per_matrix, title="Per matrix hit, every field together", note=summary_note(ctx, "in model order")),
    ], answers=[_matrix_answer(stats, cols)], data={"by_matrix_and_field": stats, "by_matrix": per_matrix})


def _positions(t: pl.DataFrame) -> str:
    """How many distinct weight elements the trials hit: what backs every cell of these tables."""
    if "changes" not in t.columns:
        return ""
    hit = {(c["tensor"], c["index"]) for changes in t["changes"].drop_nulls().to_list() for c in changes}
    flips = int(t["changes"].drop_nulls().list.len().sum())
    backing = ("every flip a different element, so a cell's n trials are n positions" if len(hit) == flips else
               f"{flips - len(hit)} flips repeat an element: `distinct` says how many positions back each cell")
    return (f"The {len(t)} trials flipped {flips:,} bits in {len(hit):,} distinct weight elements ({backing}; "
            f"draws are keyed by seed and target, so they are independent).")


def _overlap(t: pl.DataFrame, dtype: str) -> str:
    """How `exponent` trials overlap `exponent_msb`: the ones whose drawn bit was the MSB."""
    if "field" not in t.columns or "exponent" not in t["field"].to_list():
        return ""
    exponent = t.filter(pl.col("field") == "exponent")
    msb = exponent.filter(pl.col("fault") == "exponent MSB")
    bits = layout(dtype)["exponent"]
    broke = int(msb.select(tables.catastrophic_expr()).to_series().sum()) if len(msb) else 0
    return (f"`exponent` overlaps `exponent_msb`: it draws one of bits {bits[0]}–{bits[-1]}, the most significant "
            f"({bits[-1]}) included, so {len(msb)} of its {len(exponent)} trials flipped bit {bits[-1]}, the bit "
            f"`exponent_msb` always flips ({broke} of those {len(msb)} were catastrophic). The tables below "
            f"also count every trial once by the bit it actually flipped.")


def _catastrophic_bits(ctx: Context, separated: pl.DataFrame) -> str:
    rows = list(separated.iter_rows(named=True))
    bad = [r for r in rows if r["catastrophic"]]
    if not bad:
        return f"**No single-bit fault was catastrophic** (none of {sum(r['n'] for r in rows)} trials)."
    dtype = ctx.run.baseline.get("dtype", "float32")
    said = "; ".join(f"`{r['fault']}` ({bits_of(r['fault'], dtype)}): {r['catastrophic']} of {r['n']} "
                     f"({fmt.percent(r['share'])}, 95% CI {fmt.span(r['ci_low'], r['ci_high'], fmt.percent)})"
                     for r in bad)
    calm = [r for r in rows if not r["catastrophic"]]
    rest = ""
    if calm:
        rest = (" Flips of the other fields never were: " + "; ".join(
            f"`{r['fault']}` ({bits_of(r['fault'], dtype)}): 0 of {r['n']} "
            f"(95% CI {fmt.span(r['ci_low'], r['ci_high'], fmt.percent)}), worst {fmt.times(r['worst'])}"
            for r in calm) + ".")
    ceiling = _at_ceiling(ctx)
    return f"**Catastrophic faults by the field of the bit that flipped**: {said}.{ceiling}{rest}"


def _at_ceiling(ctx: Context) -> str:
    if not ctx.vocab:
        return ""
    t = ctx.trials.filter(pl.col("ppl").is_finite())
    at = t.filter(((pl.col("ppl") / ctx.vocab).log().abs() < 0.05))
    return (f" {len(at)} trials land at the uniform-output ceiling (ppl ≈ {ctx.vocab:,}, the vocabulary size: "
            f"×{fmt.sig(ctx.ceiling)})." if len(at) else "")


def _agreement(ctx: Context, t: pl.DataFrame) -> str:
    """What perplexity hides: the calm fields' trials whose ppl is indistinguishable but whose top-1 moved."""
    if ctx.seq is None or "top1_agreement" not in t.columns:
        return ""
    bounds = ctx.seq.trials(t)
    t = t.with_columns(bounds).filter(~tables.catastrophic_expr(ctx.threshold))
    same = t.filter((pl.col("ratio_low") <= 1) & (pl.col("ratio_high") >= 1))
    moved = same.filter(pl.col("top1_agreement") < 1)
    if same.is_empty() or moved.is_empty():
        return ""
    low = moved.sort("top1_agreement").row(0, named=True)
    return (f"Top-1 agreement moves where perplexity cannot: {len(same)} of the {len(t)} trials that were not "
            f"catastrophic leave perplexity indistinguishable from the baseline (95% CI of ppl / baseline includes "
            f"1), yet {len(moved)} of those {'changes' if len(moved) == 1 else 'change'} the top prediction somewhere, down to "
            f"{fmt.agreement(low['top1_agreement'])} agreement (`{low['fault']}` flip in "
            f"`{low.get('tensor') or low['target']}`, KL {fmt.kl(low['kl'])}).")


def _matrix_answer(stats: pl.DataFrame, cols: list[str]) -> str:
    """Per catastrophic fault class, the matrices where it always, sometimes and never broke the model."""
    bad = stats.filter(pl.col("catastrophic") > 0)
    parts = []
    for fault in [c for c in cols if c in bad["fault"].to_list()]:
        part = sorted(stats.filter(pl.col("fault") == fault).to_dicts(),
                      key=lambda r: (-r["share"], -r["n"], tables.module_rank(r["matrix"])))
        groups = (("whenever they hit", [r for r in part if r["catastrophic"] == r["n"]]),
                  ("in some of the flips that hit", [r for r in part if 0 < r["catastrophic"] < r["n"]]),
                  ("never when they hit", [r for r in part if r["catastrophic"] == 0]))
        said = [f"{what} " + ", ".join(f"`{r['matrix']}` ({r['catastrophic']}/{r['n']})" for r in rows)
                for what, rows in groups if rows]
        parts.append(f"`{fault}` flips were catastrophic " + "; ".join(said))
    return ("By the weight matrix the flip actually landed in: " + ". ".join(parts) + ".") if parts else ""


def bit_profile(t: pl.DataFrame, per_bit: pl.DataFrame, dtype: str, context: str) -> Figure:
    """Two panels over bit positions (most significant on the left): catastrophic share with Wilson
    intervals and trial counts; every trial's KL (log) with the median as a bar."""
    fields = layout(dtype)
    width = len(fields["any"])
    fig = Figure(figsize=(WIDTH, 6.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1.2]})
    rows = per_bit.to_dicts()
    x = np.array([r["flipped_bit"] for r in rows])
    share = np.array([r["share"] or 0.0 for r in rows])
    low = np.array([r["ci_low"] if r["ci_low"] is not None else s for r, s in zip(rows, share)])
    high = np.array([r["ci_high"] if r["ci_high"] is not None else s for r, s in zip(rows, share)])
    top.bar(x, 100 * share, color="#b2182b", width=0.8)
    top.errorbar(x, 100 * share, yerr=100 * np.vstack([share - low, high - share]).clip(min=0), fmt="none",
                 ecolor="#888888", capsize=2, linewidth=0.7)
    for xi, r in zip(x, rows):
        top.text(xi, 103, str(r["n"]), ha="center", va="bottom", fontsize=TEXT - 1)
    top.set_ylim(0, 112)
    top.set_yticks([0, 25, 50, 75, 100], ["0%", "25%", "50%", "75%", "100%"], fontsize=TEXT)
    top.set_ylabel("catastrophic\n(n above bars)", fontsize=TEXT)
    _kl_panel(bottom, t, x, rows)
    for ax in (top, bottom):
        _shade_fields(ax, fields, named=ax is top)
        ax.set_xlim(width - 0.5, -0.5)  # most significant bit on the left, as IEEE writes it
    ticks = sorted({0, width - 1, *fields["exponent"][:1], *fields["exponent_msb"], *x.tolist()})
    bottom.set_xticks(ticks, [str(b) for b in ticks], fontsize=TEXT - 1)
    bottom.set_xlabel("bit position that flipped (0 = least significant)", fontsize=TEXT)
    title(fig, "Bit flips per bit position: catastrophic share and KL", context)
    return fig


def _kl_panel(ax, t: pl.DataFrame, x: np.ndarray, rows: list[dict]) -> None:
    kl = t.filter(pl.col("kl").is_finite() & (pl.col("kl") > 0))
    ax.scatter(kl["flipped_bit"], kl["kl"], s=10, alpha=0.45, color="#2166ac", linewidths=0)
    medians = [(b, r["kl"]) for b, r in zip(x, rows) if r["kl"] is not None and np.isfinite(r["kl"]) and r["kl"] > 0]
    if medians:
        ax.scatter(*zip(*medians), marker="_", s=120, color="black", linewidths=1.5, label="median")
        ax.legend(fontsize=TEXT, loc="upper right")
    ax.set_yscale("log")
    ax.set_ylabel("KL per position\n(nats, log)", fontsize=TEXT)
    ax.tick_params(labelsize=TEXT)


def _shade_fields(ax, fields: dict[str, tuple[int, ...]], named: bool) -> None:
    for name, colour in (("sign", "#fddbc7"), ("exponent", "#d1e5f0"), ("mantissa", "#f7f7f7")):
        bits = fields[name]
        ax.axvspan(min(bits) - 0.5, max(bits) + 0.5, color=colour, zorder=0, linewidth=0)
        if named:  # above the panel: the sign field is one bit wide
            ax.text((min(bits) + max(bits)) / 2, 1.01, name, ha="center", va="bottom", fontsize=TEXT - 1,
                    color="#444444", transform=ax.get_xaxis_transform())
