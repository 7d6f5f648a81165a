"""report.md of a saliency map: setup and cost, the most sensitive tensors, blocks, modules and flips,
and, with --check, how well the predictions rank what the sweeps measured.

    doc = document(setup, measured.summary(), frames, check_frames, figures)
    (out / "report.md").write_text(render.markdown(doc, out))
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from sensray.analyze import render
from sensray.changes import value

SHOWN = 10


def document(setup: dict, summary: dict, frames: dict[str, pl.DataFrame], figures: dict[str, Path],
             check: dict[str, pl.DataFrame] | None = None) -> render.Document:
    doc = render.Document(f"Saliency of {setup['model']}")
    doc.add(render.Para(_setup(setup, summary)), render.Para(_cost(setup, summary)))
    doc.add(render.Heading("Where the gradient says damage lives"),
            render.Para("Per tensor, sums over its elements: `taylor` = sum |g w| (zeroing each weight alone, first "
                        "order), `zero_predicted` = -sum g w + 1/2 sum F w^2 (zeroing the whole tensor, first + "
                        "second order, F the empirical Fisher diagonal), `flip_<field>` = the largest predicted "
                        "loss increase g (w' - w) of one flip in that bit field (inf: the flip makes the weight "
                        "inf or NaN). A quantized weight is its dequantized value: g is dL/dW, its flips are flips "
                        "of its codes, and `flip_statistics` the best flip in its scales (by the chain rule)."),
            _table(frames["tensors"].sort("taylor", descending=True).head(SHOWN),
                   ["tensor", "dtype", "taylor", "zero_predicted", "fisher", "flip_mantissa", "flip_exponent_msb",
                    "flip_magnitude_msb", "flip_statistics"]),
            render.Table.plain(_rounded(frames["modules"].select(
                "module", "tensors", "numel", "taylor", "zero_predicted", *_present(frames["modules"], ["fisher"])))))
    if "heatmap" in figures:
        doc.add(render.Figure("predicted loss change of zeroing each module of each block", path=figures["heatmap"]))
    doc.add(render.Heading("The flips the gradient ranks first"),
            render.Para("Per field, the single flips with the largest predicted loss increase anywhere in the model "
                        "(sensray attack searches these progressively, evaluating each exactly)."),
            _flip_table(frames["flips"]))
    if check is not None:
        _check(doc, check, figures)
    return doc


def _setup(setup: dict, summary: dict) -> str:
    return (f"Model `{setup['model']}` [{setup['dtype']}, {setup['device']}], {setup['parameters']:,} parameters; text "
            f"{setup['corpus']}, {summary['tokens']:,} scored tokens ({setup['windows']} windows of "
            f"{setup['seq_len']}); "
            f"mean NLL {summary['loss']:.4f}. The Fisher diagonal averages {summary['fisher_windows']} windows.")


def _cost(setup: dict, summary: dict) -> str:
    memory = summary["memory"]
    return (f"Cost: the gradient pass took {summary['gradient_seconds']:.2f} s and the Fisher passes "
            f"{summary['fisher_seconds']:.2f} s; peak memory rose {_mib(memory['above_start_bytes'])} above the "
            f"{_mib(memory['start_bytes'])} held before ({memory['how']}); a full gradient copy alone would be "
            f"{_mib(setup.get('gradient_bytes', setup['weight_bytes']))}.")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _present(frame: pl.DataFrame, columns: list[str]) -> list[str]:
    return [c for c in columns if c in frame.columns and frame[c].null_count() < len(frame)]


def _rounded(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col(pl.Float64).map_elements(_short, return_dtype=pl.String))


def _short(x: float | None) -> str:
    return "–" if x is None else value(x) if math.isfinite(x) else str(x)


def _table(frame: pl.DataFrame, columns: list[str]) -> render.Table:
    return render.Table.plain(_rounded(frame.select(_present(frame, columns))))


def _flip_table(flips: pl.DataFrame) -> render.Table:
    best = (flips.sort("predicted", descending=True).group_by("field", maintain_order=True).head(3)
            .with_columns(pl.format("{}{}", "tensor", pl.col("coords").cast(pl.List(pl.String)).list.join(", ")
                                    .map_elements(lambda c: f"[{c}]", return_dtype=pl.String)).alias("element")))
    return _table(best, ["field", "element", "bit", "old", "new", "grad", "predicted"])


def _check(doc: render.Document, check: dict[str, pl.DataFrame], figures: dict[str, Path]) -> None:
    corr = check["correlations"]
    doc.add(render.Heading("Predicted against measured"),
            render.Para("Spearman's rho between the predicted loss change and the measured delta_nll of each "
                        "trial of the checked sweeps, per granularity (condition: the median over seeds; block and "
                        "module: medians). `rho_first`: first order only; `rho_predicted`: first + second order; "
                        "`rho_magnitude`: the control, the size of the weight change alone."),
            render.Table.plain(_rounded(corr)))
    doc.add(render.Bullets(_reading(corr)))
    if check.get("unused"):
        doc.add(render.Para("Left out (no prediction for their kind, failed, or non-finite without a prediction): "
                            + ", ".join(f"{run}: {n}" for run, n in check["unused"].items()) + "."))
    if "check" in figures:
        doc.add(render.Figure("predicted against measured, one point per trial", path=figures["check"]))


def _reading(corr: pl.DataFrame) -> list[str]:
    """One line per checked run: how its trials are ranked, and whether the gradient beats the control."""
    lines = []
    for row in corr.filter(pl.col("granularity") == "trial").iter_rows(named=True):
        best = max(("rho_first", "rho_predicted"), key=lambda k: -1 if math.isnan(row[k]) else row[k])
        beats = row[best] > row["rho_magnitude"] if not math.isnan(row["rho_magnitude"]) else None
        lines.append(f"{row['run']} ({row['kind']}): trials ranked with rho {row[best]:.2f} "
                     f"({'first order' if best == 'rho_first' else 'first + second order'}); the size of the change "
                     f"alone gives {row['rho_magnitude']:.2f}"
                     + ("" if beats is None else " - the gradient adds to it" if beats else
                        " - the gradient adds nothing to it"))
    return lines
