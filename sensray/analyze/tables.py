"""Aggregations of a trial table: a polars DataFrame in, a DataFrame out (for notebooks too).

    import polars as pl
    from sensray.analyze import tables
    t = tables.annotate(pl.read_parquet("results/bitflip/<run id>/trials.parquet"))
    tables.rank_targets(t).head(10)      # the most sensitive (target, field) conditions
    tables.by_layer(t); tables.by_module(t); tables.by_flip(t); tables.by_sigma(t)
    tables.by_matrix(t); tables.by_bit(t)   # what the trials actually hit (provenance columns)
    tables.catastrophic_share(t, threshold=2.0, by=["field"])

Every summary has the same statistics over the trials of a group (seeds, samples): `n`, `distinct`
(distinct weight positions hit, for kinds that change single elements; distinct draws otherwise),
of `delta_ppl` (ppl / baseline ppl) the `median`, `q25`/`q75` (the spread) and `worst` (max; inf
when any trial went non-finite); the medians of `ppl`, `top1` (top-1 agreement with the baseline)
and `kl` (KL(baseline || perturbed) per position, nats); `catastrophic` (trials non-finite or above the
threshold), `share`, and a 95% Wilson interval `ci_low`/`ci_high` when the trials are random draws
(the kind takes a seed); a census such as one ablation per component has no sampling error, so its
interval is null. Given `seq` (stats.Sequences), `median_low`/`median_high` and `ppl_low`/`ppl_high`
bound the medians over resampled eval sequences (and draws). Failed trials (an `error`) have no
metrics: they are counted in `failed` and left out of the rest.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Sequence

import polars as pl

from sensray.changes import describe
from sensray.results import FIRST_COLUMNS, LAST_COLUMNS, PROVENANCE, is_task_column

if TYPE_CHECKING:
    from sensray.analyze.stats import Sequences

CATASTROPHIC = 2.0  # default threshold: a trial that at least doubles perplexity is catastrophic
Z95 = 1.959963984540054
DERIVED = ("layer", "module", "flip")
# Canonical module kinds in the order they sit in a model; anything else sorts after them.
MODULE_ORDER = (
    "embed", "pos_embed", "embed_norm", "proj_in", "block", "norm1", "attn", "attn.qkv", "attn.q", "attn.k",
    "attn.v", "attn.o", "norm2", "mlp", "mlp.gate", "mlp.up", "mlp.down", "final_norm", "proj_out", "lm_head",
)
FIELD_ORDER = ("sign", "exponent_msb", "exponent", "mantissa", "any")


def parse_target(target: str) -> tuple[int | None, str]:
    """A target pattern -> (layer, module kind); layer is None when the pattern spans layers.

    >>> parse_target("blocks.3.mlp.down"), parse_target("blocks.*.attn.q"), parse_target("lm_head")
    ((3, 'mlp.down'), (None, 'attn.q'), (None, 'lm_head'))
    """
    parts = target.split(".")
    if parts[0] == "blocks" and len(parts) > 1:
        layer = int(parts[1]) if parts[1].isdigit() else None
        return layer, ".".join(parts[2:]) or "block"
    raw = re.search(r"\.(\d+)\.(.+)$", target)  # a raw HF name: model.layers.3.mlp.down_proj.weight
    if raw and not any(ch in target for ch in "*?["):
        return int(raw.group(1)), raw.group(2)
    return None, target


def module_rank(module: str) -> tuple[int, str]:
    """Sort key: canonical modules in model order, then the rest alphabetically."""
    base = module.removesuffix(".weight").removesuffix(".bias")
    return (MODULE_ORDER.index(base) if base in MODULE_ORDER else len(MODULE_ORDER), module)


def module_order(column: str = "module") -> pl.Expr:
    """A sort key expression putting module kinds in model order (for `DataFrame.sort`)."""
    return pl.col(column).map_batches(
        lambda s: pl.Series([module_rank(m)[0] for m in s.to_list()], dtype=pl.Int64), return_dtype=pl.Int64
    )


def annotate(trials: pl.DataFrame) -> pl.DataFrame:
    """Add `layer` (Int64, null when the target spans layers), `module`, and for bit flips `flip`
    (the field, or `bit N`). Idempotent."""
    if "layer" in trials.columns:
        return trials
    parsed = {t: parse_target(t) for t in trials["target"].unique().to_list()}
    out = trials.with_columns(
        pl.col("target").replace_strict({t: p[0] for t, p in parsed.items()}, return_dtype=pl.Int64).alias("layer"),
        pl.col("target").replace_strict({t: p[1] for t, p in parsed.items()}, return_dtype=pl.String).alias("module"),
    )
    if "field" in out.columns or "bit" in out.columns:
        field = pl.col("field") if "field" in out.columns else pl.lit(None, pl.String)
        bit = pl.format("bit {}", pl.col("bit")) if "bit" in out.columns else pl.lit(None, pl.String)
        out = out.with_columns(pl.coalesce(field, bit).alias("flip"))
    return out


def parameters(trials: pl.DataFrame) -> list[str]:
    """The perturbation's parameter columns (everything between the ids and what the trial changed)."""
    fixed = set(FIRST_COLUMNS) | set(PROVENANCE) | set(LAST_COLUMNS) | set(DERIVED)
    return [c for c in trials.columns if c not in fixed and not is_task_column(c)]


def conditions(trials: pl.DataFrame) -> list[str]:
    """Parameters that name an experimental condition: not the seed, the coordinates, or a
    float drawn at random per trial (those vary inside a condition)."""
    out = []
    for name in parameters(trials):
        column = trials[name]
        if name in ("seed", "coords") or isinstance(column.dtype, (pl.List, pl.Array, pl.Struct)):
            continue
        if column.n_unique() <= 1:
            continue  # the same in every trial: part of the setup, not a condition to group by
        if column.dtype.is_float() and len(column) > 2 and column.n_unique() == len(column):
            continue  # every trial has its own value: a random draw (loguniform...), not a grid level
        out.append(name)
    return out


def is_random(trials: pl.DataFrame) -> bool:
    """Are the trials random draws (a seed picks elements or noise), so that shares need an interval?"""
    return "seed" in trials.columns


def catastrophic_expr(threshold: float = CATASTROPHIC) -> pl.Expr:
    """True for a non-finite trial or delta_ppl above threshold; null for a failed trial."""
    delta = pl.col("delta_ppl")
    return pl.col("nonfinite") | delta.is_infinite() | delta.is_nan() | (delta > threshold)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial share k/n (95% by default); (nan, nan) when n = 0."""
    if n == 0:
        return math.nan, math.nan
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At k = 0 (k = n) the bound is exactly 0 (1); floating point would leave ~1e-17.
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def _wilson_exprs(random: bool, z: float = Z95) -> list[pl.Expr]:
    if not random:
        return [pl.lit(None, pl.Float64).alias("ci_low"), pl.lit(None, pl.Float64).alias("ci_high")]
    n, p, z2 = pl.col("n").cast(pl.Float64), pl.col("share"), z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * (p * (1 - p) / n + z2 / (4 * n * n)).sqrt() / (1 + z2 / n)
    k = pl.col("catastrophic")
    return [  # exact 0 / 1 at the edges, as in wilson_interval
        pl.when(n == 0).then(None).when(k == 0).then(0.0).otherwise(centre - half).alias("ci_low"),
        pl.when(n == 0).then(None).when(k == n).then(1.0).otherwise(centre + half).alias("ci_high"),
    ]


SORTED = "most damaging first: median ppl / baseline, then catastrophic share, then worst trial"


def summarize(trials: pl.DataFrame, by: Sequence[str], threshold: float = CATASTROPHIC,
              seq: "Sequences | None" = None) -> pl.DataFrame:
    """The statistics per group of `by`, most sensitive first (`SORTED`)."""
    trials = annotate(trials)
    delta = pl.col("delta_ppl")
    stats = trials.with_columns(_positions(trials)).group_by(list(by)).agg(
        delta.count().cast(pl.Int64).alias("n"),
        _distinct(trials),
        pl.col("error").is_not_null().sum().cast(pl.Int64).alias("failed"),
        delta.median().alias("median"),
        delta.quantile(0.25).alias("q25"),
        delta.quantile(0.75).alias("q75"),
        delta.max().alias("worst"),
        *[_median(trials, c, alias) for c, alias in (("ppl", "ppl"), ("top1_agreement", "top1"), ("kl", "kl"))],
        catastrophic_expr(threshold).sum().cast(pl.Int64).alias("catastrophic"),
        pl.col("nonfinite").sum().cast(pl.Int64).alias("nonfinite"),
    )
    share = pl.when(pl.col("n") > 0).then(pl.col("catastrophic") / pl.col("n"))
    stats = stats.with_columns(share.alias("share")).with_columns(_wilson_exprs(is_random(trials)))
    if seq is not None:
        stats = stats.join(seq.cells(trials, by, is_random(trials)), on=list(by), how="left", nulls_equal=True)
    # Medians are compared to 4 decimals: differences of 1e-6 are evaluation noise, and between such
    # groups the catastrophic share (then the worst trial) says more. Remaining ties (common: many
    # conditions saturate at one perplexity) fall back to the keys, for the same order on every run.
    keys = [pl.col("median").round(4), "share", "worst", *by]
    return stats.sort(keys, descending=[True, True, True, *[False] * len(by)], nulls_last=True)


def _median(trials: pl.DataFrame, column: str, alias: str) -> pl.Expr:
    """The median of a metric column; null for tables written before the column existed."""
    present = column in trials.columns
    return (pl.col(column).median() if present else pl.lit(None, pl.Float64)).alias(alias)


def _positions(trials: pl.DataFrame) -> pl.Expr:
    """Per trial, the weight positions it changed (`tensor[index]`), from its provenance; null when
    the kind changes whole tensors (noise, prune, ablation) or the table predates provenance."""
    if "changes" not in trials.columns or trials["changes"].null_count() == len(trials):
        return pl.lit(None, pl.List(pl.String)).alias("_positions")
    where = pl.format("{}[{}]", pl.element().struct.field("tensor"), pl.element().struct.field("index"))
    return pl.col("changes").list.eval(where).alias("_positions")


def _distinct(trials: pl.DataFrame) -> pl.Expr:
    """Distinct positions hit when the kind records them, else distinct draws (a draw is keyed by the
    seed and the target: sensray.perturbations.base.keyed_rng), else trials."""
    positions = pl.col("_positions").explode().drop_nulls().n_unique()
    draws = pl.struct("target", "seed").filter(pl.col("error").is_null()).n_unique() if is_random(trials) else None
    fallback = draws if draws is not None else pl.col("delta_ppl").count()
    return pl.when(positions > 0).then(positions).otherwise(fallback).cast(pl.Int64).alias("distinct")


def rank_targets(trials: pl.DataFrame, threshold: float = CATASTROPHIC, seq: "Sequences | None" = None
                 ) -> pl.DataFrame:
    """Each (kind, target, condition) over its seeds/samples, most sensitive first."""
    trials = annotate(trials)
    return summarize(trials, ["kind", "target", *conditions(trials)], threshold, seq)


def by_layer(trials: pl.DataFrame, threshold: float = CATASTROPHIC, seq: "Sequences | None" = None
             ) -> pl.DataFrame:
    """Per decoder layer (targets of one layer only), most sensitive first."""
    trials = annotate(trials)
    return summarize(trials.filter(pl.col("layer").is_not_null()), ["kind", "layer"], threshold, seq)


def by_module(trials: pl.DataFrame, threshold: float = CATASTROPHIC, seq: "Sequences | None" = None
              ) -> pl.DataFrame:
    """Per module kind of the target (attn.q, mlp.down, block, embed, ...), most sensitive first."""
    return summarize(annotate(trials), ["kind", "module"], threshold, seq)


def by_flip(trials: pl.DataFrame, threshold: float = CATASTROPHIC, seq: "Sequences | None" = None
            ) -> pl.DataFrame:
    """Bit flips per field or bit position asked for (`flip`), in IEEE order; empty for other kinds."""
    trials = annotate(trials)
    if "flip" not in trials.columns:
        return pl.DataFrame()
    table = summarize(trials, ["kind", "flip"], threshold, seq)
    return table.sort(pl.col("flip").replace_strict(
        {f: i for i, f in enumerate(FIELD_ORDER)}, default=len(FIELD_ORDER), return_dtype=pl.Int64), "flip")


def by_sigma(trials: pl.DataFrame, threshold: float = CATASTROPHIC, seq: "Sequences | None" = None
             ) -> pl.DataFrame:
    """Noise per module kind and sigma, in curve order (module, then sigma); empty without sigma."""
    trials = annotate(trials)
    if "sigma" not in conditions(trials):
        return pl.DataFrame()
    table = summarize(trials, ["kind", "module", "sigma"], threshold, seq)
    return table.sort(module_order(), "sigma")


def matrix_of(tensor: str | None) -> str | None:
    """The kind of weight a tensor name is: `blocks.3.mlp.down.weight` -> `mlp.down`, `lm_head.weight` ->
    `lm_head`, `blocks.0.norm1.weight` -> `norm1`; None for None."""
    if tensor is None:
        return None
    name = parse_target(tensor)[1]
    return name.removesuffix(".weight").removesuffix(".bias")


def by_matrix(trials: pl.DataFrame, threshold: float = CATASTROPHIC, seq: "Sequences | None" = None,
              by: Sequence[str] = ()) -> pl.DataFrame:
    """Per weight matrix kind actually changed (the `tensor` provenance column, not the target pattern),
    in model order, for trials that changed one tensor; empty when the table has no provenance."""
    trials = annotate(trials)
    if "tensor" not in trials.columns or trials["tensor"].null_count() == len(trials):
        return pl.DataFrame()
    names = {t: matrix_of(t) for t in trials["tensor"].drop_nulls().unique().to_list()}
    hit = trials.filter(pl.col("tensor").is_not_null()).with_columns(
        pl.col("tensor").replace_strict(names, return_dtype=pl.String).alias("matrix"))
    return summarize(hit, ["kind", "matrix", *by], threshold, seq).sort(module_order("matrix"), *by)


def by_bit(trials: pl.DataFrame, threshold: float = CATASTROPHIC, seq: "Sequences | None" = None,
           by: Sequence[str] = ()) -> pl.DataFrame:
    """Per bit position actually flipped (the `flipped_bit` provenance column), most significant first,
    for trials whose flips share one bit; empty when the table has no such column."""
    trials = annotate(trials)
    if "flipped_bit" not in trials.columns or trials["flipped_bit"].null_count() == len(trials):
        return pl.DataFrame()
    hit = trials.filter(pl.col("flipped_bit").is_not_null())
    return summarize(hit, ["kind", "flipped_bit", *by], threshold, seq).sort("flipped_bit", *by, descending=True)


def catastrophic_share(
    trials: pl.DataFrame, threshold: float = CATASTROPHIC, by: Sequence[str] = ()
) -> pl.DataFrame:
    """Catastrophic trials (non-finite or delta_ppl > threshold): count, share, 95% Wilson interval."""
    trials = annotate(trials).with_columns(pl.lit("all").alias("_all"))
    table = summarize(trials, list(by) or ["_all"], threshold)
    keep = [*by, "n", "catastrophic", "nonfinite", "share", "ci_low", "ci_high"]
    return table.select(keep).sort("share", descending=True, nulls_last=True)


def threshold_sigma(trials: pl.DataFrame, threshold: float = CATASTROPHIC) -> pl.DataFrame:
    """Per module kind, the smallest sigma whose median delta_ppl exceeds the threshold (null: none did)."""
    curves = by_sigma(trials, threshold)
    if curves.is_empty():
        return curves
    broken = pl.col("sigma").filter(pl.col("median") > threshold).min()
    return curves.group_by("module", maintain_order=True).agg(
        broken.alias("breaks_at"), pl.col("sigma").max().alias("max_sigma")
    )


def worst_trials(trials: pl.DataFrame, n: int = 10) -> pl.DataFrame:
    """The `n` most damaging trials (`WORST_ORDER`) and exactly what each changed: the tensor, element,
    bit and old -> new value for element-wise kinds (with the count when a trial changed several);
    what each touched tensor lost, in words, for the others (sensray.changes)."""
    trials = annotate(trials)
    ranked = (trials.filter(pl.col("delta_ppl").is_not_null())
              .sort(["delta_ppl", "trial_id"], descending=[True, False]).head(n))
    keep = ["trial_id", "target", *conditions(trials)]
    out = ranked.select(keep)
    if "changes" in ranked.columns and ranked["changes"].drop_nulls().len():
        out = out.with_columns(_element_columns(ranked))
    else:
        recorded = "tensors" in ranked.columns  # tables written before provenance existed have none
        described = ["; ".join(describe(row, limit=2)) if recorded and row.get("tensors") is not None
                     else "(not recorded)" for row in ranked.select(
                         [c for c in ("changes", "tensors") if c in ranked.columns] or ["trial_id"]).to_dicts()]
        out = out.with_columns(pl.Series("changed", described, dtype=pl.String))
    metrics = [c for c in ("ppl", "delta_ppl", "top1_agreement", "kl") if c in ranked.columns]
    return out.with_columns(ranked.select(metrics))


WORST_ORDER = "largest ppl / baseline first (non-finite first of all), ties by trial id"


def _element_columns(ranked: pl.DataFrame) -> list[pl.Series]:
    """tensor, element (coordinates), bit and `old -> new` of each trial's first changed element."""
    from sensray.changes import value

    first = [c[0] if c else None for c in ranked["changes"].to_list()]
    counts = [len(c) if c else 0 for c in ranked["changes"].to_list()]
    out = [pl.Series("tensor", [c and c["tensor"] for c in first], dtype=pl.String),
           pl.Series("element", [c and str(c["coords"]) for c in first], dtype=pl.String),
           pl.Series("bit", [c and c["bit"] for c in first], dtype=pl.Int64),
           pl.Series("old -> new", [c and f"{value(c['old'])} -> {value(c['new'])}" for c in first], dtype=pl.String)]
    if any(k > 1 for k in counts):
        out.append(pl.Series("elements", counts, dtype=pl.Int64))
    return out


def achieved_sparsity(trials: pl.DataFrame) -> pl.Series | None:
    """Per trial, the share of zeros over every weight tensor it overwrote (weighted by their sizes),
    from the `tensors` provenance column; None when no trial recorded one (not a pruning run)."""
    if "tensors" not in trials.columns:
        return None
    element = pl.element().struct
    recorded = element.field("sparsity").is_not_null()
    zeros = (element.field("sparsity") * element.field("numel")).filter(recorded).sum()
    total = element.field("numel").filter(recorded).sum()
    share = trials.select((pl.col("tensors").list.eval(zeros).list.first()
                           / pl.col("tensors").list.eval(total).list.first()).alias("achieved"))["achieved"]
    share = share.fill_nan(None)  # 0 / 0: no tensor of the trial records a sparsity
    return None if share.drop_nulls().is_empty() else share
