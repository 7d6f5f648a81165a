"""Every figure renders from a synthetic table (non-finite trials included) and is not blank."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from matplotlib.image import imread
from synthetic_runs import BASELINE_PPL, INF, ablation_table, bitflip_table, noise_table

from sensray.analyze import figures

DPI = 50  # enough to tell a drawn figure from a blank one, and quick to render

def assert_drawn(path) -> None:
    """The PNG has content: several colours, and more than a sliver of non-white pixels."""
    image = imread(path)[..., :3]  # (height, width, rgb) in [0, 1]
    ink = (image < 0.9).any(axis=-1).mean()
    colours = len(np.unique((image * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert ink > 0.02 and colours > 8 and image.std() > 0.05, (path, ink, colours)


FIGURES = {
    "heatmap": lambda: figures.flip_heatmap(bitflip_table(), BASELINE_PPL, context="synthetic"),
    "ablation": lambda: figures.ablation_bars(ablation_table(), BASELINE_PPL),
    "noise": lambda: figures.dose_curves(noise_table(), BASELINE_PPL, "sigma"),
    "distribution": lambda: figures.distribution(bitflip_table(), BASELINE_PPL),
}


@pytest.mark.parametrize("name", FIGURES)
def test_figure_renders(name, tmp_path):
    fig = FIGURES[name]()
    assert fig._suptitle is not None and fig._suptitle.get_text()  # titled
    assert fig.axes[0].get_ylabel() and any(ax.get_xlabel() for ax in fig.axes)  # labelled, units included
    (path,) = figures.save(fig, tmp_path / name, dpi=DPI)
    assert_drawn(path)


def test_baseline_is_marked():
    fig = figures.dose_curves(noise_table(), BASELINE_PPL, "sigma")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("baseline" in label for label in labels)
    heat = figures.flip_heatmap(bitflip_table(), BASELINE_PPL)
    colourbar = [ax for ax in heat.axes if ax is not heat.axes[0]][0]
    assert any("baseline" in t.get_text() for t in colourbar.get_yticklabels())


def test_each_kind_gets_its_figures():
    def names(table):
        return set(figures.figures_for(table, BASELINE_PPL))

    assert names(bitflip_table()) == {"bitflip-heatmap", "bitflip-distribution"}
    assert names(noise_table()) == {"noise-sigma-curves", "noise-distribution"}
    assert names(ablation_table()) == {"ablation-bars", "ablation-distribution"}
    rates = bitflip_table().with_columns(pl.Series("rate", [1e-6 * (i + 1) for i in range(64)])).drop("count")
    assert "bitflip-rate-curves" in names(rates)


def test_missing_columns_mean_no_figure_not_an_error():
    assert figures.flip_heatmap(noise_table(), BASELINE_PPL) is None  # no field, no bit
    assert figures.dose_curves(bitflip_table(), BASELINE_PPL, "sigma") is None
    assert figures.ablation_bars(bitflip_table(), BASELINE_PPL) is None


def test_a_run_where_everything_went_non_finite(tmp_path):
    broken = bitflip_table().with_columns(pl.lit(INF).alias("delta_ppl"), pl.lit(INF).alias("ppl"),
                                          pl.lit(True).alias("nonfinite"))
    made = figures.figures_for(broken, BASELINE_PPL)
    assert set(made) == {"bitflip-heatmap", "bitflip-distribution"}
    for name, fig in made.items():
        assert_drawn(figures.save(fig, tmp_path / name, dpi=DPI)[0])


def test_a_run_where_nothing_changed_stays_readable(tmp_path):
    calm = bitflip_table().with_columns(pl.lit(1.0).alias("delta_ppl"), pl.lit(BASELINE_PPL).alias("ppl"),
                                        pl.lit(False).alias("nonfinite"))
    made = figures.figures_for(calm, BASELINE_PPL)
    assert set(made) == {"bitflip-heatmap", "bitflip-distribution"}  # a flat run still gets its figures
    for name, fig in made.items():
        assert_drawn(figures.save(fig, tmp_path / name, dpi=DPI)[0])


def test_svg_on_request(tmp_path):
    paths = figures.save(FIGURES["distribution"](), tmp_path / "d", formats=("png", "svg"), dpi=DPI)
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert paths[1].read_text().lstrip().startswith("<?xml")
