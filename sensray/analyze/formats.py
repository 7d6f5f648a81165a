"""A format study, analysed: how often one flipped bit is catastrophic, and how much it hurts, per
storage format and bit role.

    sensray analyze results/bitflip-formats/<study id>          # a study directory (sensray/formats.py)
    sensray analyze results/bitflip-formats/<study id> --threshold 10 --svg

Writes <study>/analysis/: formats.md (the table and what it shows), formats.parquet (one row per
format and role), formats.png (formats x bit roles: catastrophic rate with its 95% Wilson interval,
and median ppl ratio). Reads only the study's run directories; every format's rows are the same
trials (same ids, same weights, same bit roles: sensray/perturbations/bitflip.py), which the
analysis checks before it compares them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from sensray.analyze import tables
from sensray.analyze.run import AnalysisError, Run, load_run, read_spec

ROLES = ("sign", "high", "scale")
ROLE_LABELS = {"sign": "sign bit", "high": "exponent MSB /\ntop magnitude bit", "scale": "scale's\nexponent MSB"}


def is_study(path: str | Path) -> bool:
    """Whether a directory is a format study (its spec.yaml has `formats`) rather than one run."""
    return Path(path).is_dir() and bool(read_spec(Path(path)).get("formats"))


def main(path: Path, out: Path | None, threshold: float, svg: bool, no_write: bool) -> int:
    """`sensray analyze STUDY`: the table on the terminal, the report and figure under <study>/analysis."""
    from sensray.analyze.render import Table, text_table

    if no_write:
        spec, runs = load_study(path)
        table = trials(runs)
        same_positions(table)
        stats = summary(table, threshold)
    else:
        import matplotlib

        matplotlib.use("Agg")
        out = out or path / "analysis"
        stats, written = write(path, out, threshold, ("png", "svg") if svg else ("png",))
    print(f"{path}: a format study, {stats['format'].n_unique()} formats x {stats['role'].n_unique()} bit roles\n")
    for line in findings(stats, threshold):
        print("- " + line)
    print("\n" + text_table(Table.of(stats)))
    if not no_write:
        print(f"\nwrote {len(written)} files to {out}/: " + ", ".join(p.name for p in written))
    return 0


def load_study(path: str | Path) -> tuple[dict, dict[str, Run]]:
    """(study spec, format -> its finished run), in the study's order."""
    path = Path(path)
    spec = read_spec(path)
    formats = spec.get("formats") or {}
    if not formats:
        raise AnalysisError(f"{path}: not a format study (its spec.yaml has no formats)")
    missing = [name for name in formats if not (path / name / "trials.parquet").is_file()]
    if missing:
        raise AnalysisError(f"{path / missing[0]}: not finished; finish the study with sensray sweep --resume {path}")
    return spec, {name: load_run(path / name) for name in formats}


def trials(runs: dict[str, Run]) -> pl.DataFrame:
    """Every format's trials in one table, with `format` and `storage` (how that format stores weights)."""
    frames = []
    for name, run in runs.items():
        if "role" not in run.trials.columns:
            raise AnalysisError(f"{run.path}: no `role` column; a format study compares bitflip roles")
        storage = run.baseline.get("quantization", "none")
        storage = run.baseline.get("dtype", "?") if storage == "none" else storage
        keep = ["trial_id", "kind", "target", "role", "seed", "tensor", "index", "delta_ppl", "ppl", "kl",
                "nonfinite", "error", "seconds"]
        frames.append(run.trials.select(keep).with_columns(pl.lit(name).alias("format"),
                                                           pl.lit(storage).alias("storage")))
    return pl.concat(frames, how="vertical_relaxed")


def same_positions(table: pl.DataFrame) -> int:
    """Check that every format flipped the same weights: the sign and high trials of one id name the
    same (tensor, element) in every format (a scale trial's weight is its seed's sign trial's weight).
    Returns how many trial ids were compared."""
    weights = table.filter(pl.col("role").is_in(["sign", "high"]) & pl.col("error").is_null())
    per_id = weights.group_by("trial_id").agg(pl.struct("tensor", "index").n_unique().alias("positions"),
                                              pl.col("format").n_unique().alias("formats"))
    bad = per_id.filter(pl.col("positions") > 1)
    if not bad.is_empty():
        raise AnalysisError(f"trial {bad['trial_id'][0]} flipped different weights in different formats; "
                            "the study's runs are not the same trials")
    return len(per_id)


def summary(table: pl.DataFrame, threshold: float = tables.CATASTROPHIC) -> pl.DataFrame:
    """Per format and role: n, median ppl ratio (q25, q75, worst), catastrophic count and share, 95% Wilson CI."""
    stats = tables.summarize(table, ["format", "role"], threshold)
    formats = list(dict.fromkeys(table["format"].to_list()))
    order = pl.col("format").replace_strict({f: i for i, f in enumerate(formats)}, return_dtype=pl.Int64)
    role = pl.col("role").replace_strict({r: i for i, r in enumerate(ROLES)}, default=len(ROLES), return_dtype=pl.Int64)
    keep = ["format", "role", "n", "failed", "median", "q25", "q75", "worst", "catastrophic", "nonfinite", "share",
            "ci_low", "ci_high"]
    return stats.sort(order, role).select(keep)


def findings(stats: pl.DataFrame, threshold: float) -> list[str]:
    """What the table shows, in sentences (per role: the most and least fragile format)."""
    lines = []
    for role in ROLES:
        rows = stats.filter(pl.col("role") == role).sort(["share", "median"], descending=True, nulls_last=True)
        if rows.is_empty():
            continue
        every = ", ".join(f"{r['format']} {_cell(r)} (median x{_ratio(r['median'])})" for r in rows.iter_rows(named=True))
        lines.append(f"{role}: catastrophic (ppl > {threshold:g}x or non-finite), most fragile first: {every}.")
    return lines


def _ratio(value: float) -> str:
    return "inf" if np.isinf(value) else f"{value:.3f}" if value < 10 else f"{value:.3g}"


def _cell(row: dict) -> str:
    return f"{row['share']:.0%} [{row['ci_low']:.0%}-{row['ci_high']:.0%}]"


def figure(stats: pl.DataFrame, formats: list[str], threshold: float, title: str):
    """Formats x bit roles, two panels: catastrophic rate (with its Wilson interval) and median ppl ratio."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    share, median, notes = _grids(stats, formats)
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.1 * len(formats) + 2.2), constrained_layout=True)
    panels = ((share, "Reds", None, f"catastrophic rate (ppl > {threshold:g}x or non-finite)"),
              (median, "Purples", LogNorm(vmin=1, vmax=max(2.0, np.nanmax(np.nan_to_num(median, nan=1, posinf=1e6))))
               , "median ppl / baseline"))
    for ax, (grid, cmap, norm, label) in zip(axes, panels):
        shown = np.ma.masked_invalid(np.where(np.isinf(grid), 1e6, grid))
        image = ax.imshow(shown, cmap=cmap, norm=norm, vmin=None if norm else 0, vmax=None if norm else 1,
                          aspect="auto")
        ax.set_facecolor("#e6e6e6")  # not applicable: a float weight has no scale
        ax.set_xticks(range(len(ROLES)), [ROLE_LABELS[r] for r in ROLES])
        ax.set_yticks(range(len(formats)), formats)
        ax.set_title(label, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
        scaled = image.norm(shown).filled(0)  # where the colour is dark, write in white
        for (i, j), text in np.ndenumerate(notes if grid is share else _median_notes(median)):
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if scaled[i, j] > 0.6 else "black")
    fig.suptitle(title, fontsize=11)
    return fig


def _grids(stats: pl.DataFrame, formats: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    share = np.full((len(formats), len(ROLES)), np.nan)
    median = np.full_like(share, np.nan)
    notes = np.full(share.shape, "n/a", dtype=object)
    for row in stats.iter_rows(named=True):
        if row["role"] in ROLES and row["format"] in formats:
            i, j = formats.index(row["format"]), ROLES.index(row["role"])
            share[i, j], median[i, j] = row["share"], row["median"]
            notes[i, j] = f"{row['share']:.0%}\n[{row['ci_low']:.0%}-{row['ci_high']:.0%}]\nn={row['n']}"
    return share, median, notes


def _median_notes(median: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda m: "n/a" if np.isnan(m) else f"x{_ratio(m)}", otypes=[object])(median)


def markdown(spec: dict, stats: pl.DataFrame, lines: list[str], compared: int, threshold: float) -> str:
    head = "| format | role | n | catastrophic | 95% CI | median ppl ratio | q25-q75 | worst |\n|---|---|---|---|---|---|---|---|"
    rows = [f"| {r['format']} | {r['role']} | {r['n']} | {r['catastrophic']} ({r['share']:.1%}) | "
            f"{r['ci_low']:.1%}-{r['ci_high']:.1%} | {r['median']:.4g} | {r['q25']:.4g}-{r['q75']:.4g} | "
            f"{r['worst']:.4g} |" for r in stats.iter_rows(named=True)]
    formats = ", ".join(f"{name} ({', '.join(f'{k}: {v}' for k, v in keys.items() if v is not None) or 'the study model'})"
                        for name, keys in spec["formats"].items())  # spec.yaml lists every key, unset ones as null
    return "\n".join([
        f"# {spec['name']}: one flipped bit per trial, the same weights in every format", "",
        f"Formats: {formats}. Catastrophic: ppl above {threshold:g}x the format's own baseline, or non-finite. "
        f"The sign and high trials of all {compared} trial ids flipped the same weight in every format.", "",
        *[f"- {line}" for line in lines], "", head, *rows, "", "![formats x bit roles](formats.png)", "",
    ])


def write(path: Path, out: Path, threshold: float, formats_out: tuple[str, ...] = ("png",)) -> tuple[pl.DataFrame, list[Path]]:
    """Analyse the study at `path` into `out`; returns the summary and the files written."""
    import matplotlib.pyplot as plt

    spec, runs = load_study(path)
    table = trials(runs)
    compared = same_positions(table)
    stats = summary(table, threshold)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "formats.parquet", out / "formats.md"]
    stats.write_parquet(written[0])
    written[1].write_text(markdown(spec, stats, findings(stats, threshold), compared, threshold), encoding="utf-8")
    model = next(iter(runs.values())).baseline.get("model", "?")
    fig = figure(stats, list(runs), threshold, f"{spec['name']}: one flipped bit per trial in {model}, the same "
                                               f"weights in every format")
    for fmt in formats_out:
        written.append(out / f"formats.{fmt}")
        fig.savefig(written[-1], dpi=150)
    plt.close(fig)
    return stats, written
