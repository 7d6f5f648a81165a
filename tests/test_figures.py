"""Every figure renders from a synthetic table (non-finite trials included), is not blank, has no text
too small to read at the report's width, and says in its caption and legend only what it draws."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from matplotlib.image import imread
from synthetic_runs import BASE_SEQ, BASELINE_PPL, INF, VOCAB, ablation_table, bitflip_table, noise_table, prune_table

from sensray.analyze import curves, figures
from sensray.analyze.ablations import ablation_heatmaps
from sensray.analyze.faults import bit_profile, classify
from sensray.analyze.stats import Sequences
from sensray.analyze.tables import annotate, by_bit

DPI = 50  # enough to tell a drawn figure from a blank one, and quick to render
CEILING = VOCAB / BASELINE_PPL
SEQ = Sequences.of(bitflip_table(), {"ppl": BASELINE_PPL, "seq_nll": BASE_SEQ})


def assert_drawn(path) -> None:
    """The PNG has content: several colours, and more than a sliver of non-white pixels."""
    image = imread(path)[..., :3]  # (height, width, rgb) in [0, 1]
    ink = (image < 0.9).any(axis=-1).mean()
    colours = len(np.unique((image * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert ink > 0.02 and colours > 8 and image.std() > 0.05, (path, ink, colours)


def assert_readable(fig) -> None:
    """No visible text under 8 points: at 130 dpi in a 700 px page that is still 9 px."""
    fig.canvas.draw()
    sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
             if t.get_visible() and t.get_text().strip()]
    assert sizes and min(sizes) >= 8, min(sizes)


def legend_labels(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
            for t in legend.get_texts()]


FIGURES = {
    "heatmap": lambda: figures.flip_heatmap(bitflip_table(), BASELINE_PPL, ceiling=CEILING, context="synthetic").fig,
    "bits": lambda: bit_profile(classify(bitflip_table(), "float32"), by_bit(bitflip_table()), "float32", "synthetic"),
    "ablation": lambda: ablation_heatmaps(annotate(ablation_table()), BASELINE_PPL, 2.0, CEILING, "synthetic"),
    "noise": lambda: curves.dose_curves(noise_table(), BASELINE_PPL, "sigma", ceiling=CEILING, seq=SEQ).fig,
    "prune": lambda: curves.prune_curves(prune_table(), BASELINE_PPL, ceiling=CEILING, seq=SEQ).fig,
    "distribution": lambda: figures.distribution(bitflip_table(), BASELINE_PPL, ceiling=CEILING).fig,
}


@pytest.mark.parametrize("name", FIGURES)
def test_figure_renders_readably(name, tmp_path):
    fig = FIGURES[name]()
    assert fig._suptitle is not None and fig._suptitle.get_text()  # titled
    assert any(ax.get_ylabel() for ax in fig.axes) and any(ax.get_xlabel() for ax in fig.axes)  # labelled
    assert_readable(fig)
    (path,) = figures.save(fig, tmp_path / name, dpi=DPI)
    assert_drawn(path)


def test_the_ceiling_is_marked_as_a_ceiling_not_a_scale_end():
    heat = figures.flip_heatmap(bitflip_table().filter(pl.col("delta_ppl").is_finite()).with_columns(
        pl.when(pl.col("field") == "exponent_msb").then(CEILING).otherwise(pl.col("delta_ppl")).alias("delta_ppl")),
        BASELINE_PPL, ceiling=CEILING)
    bar = heat.fig.axes[1]
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert "102 = uniform output" in labels and "2.00 = threshold" in labels
    assert bar.get_ylim()[1] > CEILING  # the scale runs past the ceiling: it is marked inside, not its end
    assert "sit at the uniform-output ceiling" in heat.caption


def test_captions_and_legends_name_only_what_is_drawn():
    finite = bitflip_table().filter(pl.col("delta_ppl").is_finite())
    assert "Hatched" in figures.flip_heatmap(bitflip_table(), BASELINE_PPL).caption
    assert "Hatched" not in figures.flip_heatmap(finite, BASELINE_PPL).caption  # nothing non-finite: not said
    assert "no trial went non-finite" in figures.distribution(finite, BASELINE_PPL).caption
    prune = curves.prune_curves(prune_table(), BASELINE_PPL, seq=SEQ)
    assert "Diamonds" not in prune.caption and "Crosses" not in prune.caption  # no N:M, nothing non-finite
    labels = legend_labels(prune.fig)
    assert sorted(label for label in labels if "(" in label and "×" not in label) == [
        "magnitude (row)", "magnitude (tensor)", "wanda (row)", "wanda (tensor)"]
    assert not any("N:M" in label or "non-finite" in label for label in labels)
    assert "Middle: the same on a linear axis" in prune.caption


def test_prune_curves_zoom_where_methods_differ_and_tick_the_sparsities():
    plot = curves.prune_curves(prune_table(), BASELINE_PPL, ceiling=CEILING)
    full, zoom, agreement = plot.fig.axes[:3]
    assert zoom.get_yscale() == "linear" and zoom.get_ylim()[1] == pytest.approx(2.0 * 1.03)
    assert [t.get_text() for t in agreement.get_xticklabels()] == ["0", "0.2", "0.4", "0.5", "0.6", "0.8"]
    ticks = [t.get_text() for t in full.get_yticklabels()]
    assert "1.00" in ticks and "2.00" in ticks  # the baseline and the threshold are labelled values
    assert agreement.get_ylabel() == "top-1 agreement"


def test_each_kind_gets_its_figures(tmp_path):
    from synthetic_runs import write_run

    from sensray.analyze.report import analyse
    from sensray.analyze.run import load_run

    expected = {"bitflip": {"bitflip-heatmap", "bitflip-bits", "bitflip-matrices", "bitflip-distribution"},
                "noise": {"noise-sigma-curves", "noise-distribution"},
                "ablation": {"ablation-grid", "ablation-distribution"},
                "prune": {"prune-sparsity", "prune-distribution"}}
    tables = {"bitflip": bitflip_table(), "noise": noise_table(), "ablation": ablation_table(), "prune": prune_table()}
    for kind, table in tables.items():
        analysis = analyse(load_run(write_run(tmp_path, table, name=kind)))
        stems = {b.stem for part in analysis.sections for b in part.blocks if getattr(b, "fig", None) is not None}
        assert stems == expected[kind], kind


def test_missing_columns_mean_no_figure_not_an_error():
    assert figures.flip_heatmap(noise_table(), BASELINE_PPL) is None  # no field, no bit
    assert curves.dose_curves(bitflip_table(), BASELINE_PPL, "sigma") is None
    assert curves.prune_curves(bitflip_table(), BASELINE_PPL) is None


def test_a_run_where_everything_went_non_finite(tmp_path):
    broken = bitflip_table().with_columns(pl.lit(INF).alias("delta_ppl"), pl.lit(INF).alias("ppl"),
                                          pl.lit(True).alias("nonfinite"))
    for name, plot in (("heat", figures.flip_heatmap(broken, BASELINE_PPL)),
                       ("dist", figures.distribution(broken, BASELINE_PPL))):
        assert_drawn(figures.save(plot.fig, tmp_path / name, dpi=DPI)[0])


def test_a_run_where_nothing_changed_stays_readable(tmp_path):
    calm = bitflip_table().with_columns(pl.lit(1.0).alias("delta_ppl"), pl.lit(BASELINE_PPL).alias("ppl"),
                                        pl.lit(False).alias("nonfinite"))
    for name, plot in (("heat", figures.flip_heatmap(calm, BASELINE_PPL)),
                       ("dist", figures.distribution(calm, BASELINE_PPL))):
        assert_drawn(figures.save(plot.fig, tmp_path / name, dpi=DPI)[0])


def test_svg_on_request(tmp_path):
    paths = figures.save(FIGURES["distribution"](), tmp_path / "d", formats=("png", "svg"), dpi=DPI)
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert paths[1].read_text().lstrip().startswith("<?xml")
