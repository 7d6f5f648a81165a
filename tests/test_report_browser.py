"""report.html read as a person reads it: in headless Chromium, at 700 and 1280 px.

One synthetic run per kind is analysed once for the module, and one browser serves every test.
Checked: every figure loads, nothing overflows the page horizontally (wide tables scroll in their
own box), ranges stay on one line, the "Next" commands wrap instead of hiding, and the table of all
trials sorts, filters and pages, also at 20,000 rows. SENSRAY_SCREENSHOTS=DIR saves full-page
screenshots of every report at both widths, to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from browser import available, browser, resize, screenshot
from synthetic_runs import ablation_table, bitflip_table, noise_table, prune_table, write_run

from sensray.analyze.explorer import explorer_html, payload
from sensray.analyze.render import _CSS
from sensray.analyze.report import analyse, write
from sensray.analyze.run import load_run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]
KINDS = {"bitflip": bitflip_table, "noise": noise_table, "ablation": ablation_table, "prune": prune_table}
WIDTHS = (700, 1280)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("browser")
    out = {}
    for kind, table in KINDS.items():
        run = load_run(write_run(root, table(), name=kind))
        write(analyse(run), run.path / "analysis")
        out[kind] = run.path / "analysis" / "report.html"
    return out


@pytest.fixture(scope="module")
def page():
    with browser() as chromium:
        yield chromium


def _open(page, path: Path, width: int) -> None:
    resize(page, width)
    page.get(path.as_uri())


@pytest.mark.parametrize("kind", KINDS)
def test_every_figure_loads(page, reports, kind):
    _open(page, reports[kind], 1280)
    images = page.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth, i.alt])")
    figures = page.execute_script("return document.querySelectorAll('figure').length")
    assert len(images) == figures >= 2
    assert all(complete and width > 0 for complete, width, _ in images), images


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("width", WIDTHS)
def test_nothing_overflows_and_nothing_is_cut(page, reports, kind, width):
    _open(page, reports[kind], width)
    assert page.execute_script("return document.documentElement.scrollWidth") <= width
    broken = page.execute_script(
        "return [...document.querySelectorAll('.nw')].filter(e => e.getClientRects().length > 1).map(e => e.textContent)")
    assert broken == []  # every range on one line
    hidden = page.execute_script(
        "return [...document.querySelectorAll('pre')].filter(p => p.scrollWidth > p.clientWidth).length")
    assert hidden == 0  # the Next commands wrap: nothing to scroll to, no comment out of sight
    shown = page.execute_script("return [...document.images].map(i => i.getBoundingClientRect().right)")
    assert max(shown) <= width
    scrolled = page.execute_script(  # headers wrap, so a grid of up to 6 columns needs no scrolling
        "return [...document.querySelectorAll('.scroll')].filter(b => b.querySelectorAll('thead th').length <= 6"
        " && b.scrollWidth > b.clientWidth).map(b => b.querySelector('thead').textContent)")
    assert scrolled == []
    if os.environ.get("SENSRAY_SCREENSHOTS"):
        folder = Path(os.environ["SENSRAY_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        screenshot(page, folder / f"{kind}-{width}.png")


def _rows(page) -> list[list[str]]:
    return page.execute_script("return [...document.querySelectorAll('#trial-table tbody tr')]"
                               ".map(r => [...r.cells].map(c => c.textContent))")


def _header(page, label: str) -> int:
    labels = page.execute_script("return [...document.querySelectorAll('#trial-table th')].map(h => h.textContent)")
    return labels.index(label)


def _filter(page, text: str) -> str:
    page.execute_script("const f = document.getElementById('trial-filter'); f.value = arguments[0];"
                        "f.dispatchEvent(new Event('input'))", text)
    return page.find_element("id", "trial-status").text


def test_the_trial_table_sorts_filters_and_pages(page, reports):
    _open(page, reports["bitflip"], 1280)
    status = page.find_element("id", "trial-status").text
    assert status == "rows 1–50 of 64" and len(_rows(page)) == 50
    column = _header(page, "× baseline")
    header = page.find_elements("css selector", "#trial-table th")[column]
    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    assert [r[column] for r in _rows(page)[:2]] == ["1.00", "1.00"]
    header.click()
    assert header.get_attribute("aria-sort") == "descending"
    assert [r[column] for r in _rows(page)[:3]] == ["inf", "inf", "10,000"]  # non-finite first, then the worst
    assert _filter(page, "bit=30") == "rows 1–20 of 20 matching (of 64)"  # 16 exponent_msb + 4 exponent at bit 30
    bit = _header(page, "bit")
    assert {r[bit] for r in _rows(page)} == {"30"}
    assert _filter(page, "field=sign seed=3") == "rows 1–4 of 4 matching (of 64)"
    assert _filter(page, "ppl>1000") == "rows 1–12 of 12 matching (of 64)"  # numbers compare as numbers, inf too
    assert _filter(page, "no-such-thing") == "no trial matches (of 64)"
    assert _filter(page, "") == "rows 1–50 of 64"
    page.find_element("id", "trial-next").click()
    assert page.find_element("id", "trial-status").text == "rows 51–64 of 64" and len(_rows(page)) == 14


def test_a_large_run_opens_one_page_at_a_time(page, tmp_path):
    big = pl.concat([bitflip_table()] * 313).with_columns(  # 20,032 trials
        pl.format("t{}", pl.int_range(pl.len())).alias("trial_id"))
    html = (f"<!doctype html><html><head><meta charset='utf-8'><style>{_CSS}</style></head><body>"
            f"{explorer_html(payload(big))}</body></html>")
    path = tmp_path / "big.html"
    path.write_text(html, encoding="utf-8")
    _open(page, path, 1280)
    assert page.find_element("id", "trial-status").text == "rows 1–50 of 20032" and len(_rows(page)) == 50
    assert _filter(page, "trial=t20031") == "rows 1–1 of 1 matching (of 20032)"
