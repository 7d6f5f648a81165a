"""report.md / report.html / summary.json of one run, the reading, and comparing runs."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest
from synthetic_runs import BASELINE_PPL, ablation_table, bitflip_table, noise_table, write_run

from sensray.analyze import compare
from sensray.analyze.__main__ import main
from sensray.analyze.reading import findings
from sensray.analyze.run import AnalysisError, load_run


def _strict_json(text: str):
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """One synthetic bitflip run, analysed once through the CLI."""
    root = tmp_path_factory.mktemp("runs")
    run = write_run(root, bitflip_table())
    assert main([str(run), "--svg"]) == 0
    return run


def test_report_files(analysed):
    out = analysed / "analysis"
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.html", "summary.json", "bitflip-heatmap.png", "bitflip-heatmap.svg",
            "bitflip-distribution.png"} <= names


def test_report_md_says_what_was_run_and_what_it_found(analysed):
    md = (analysed / "analysis" / "report.md").read_text()
    for heading in ("## What was run", "## Baseline", "## Reading", "## Figures", "## Tables"):
        assert heading in md
    assert "model `sensray-tiny`" in md and "64 trials (0 failed)" in md and "2 replicas" in md
    assert "perplexity **20.0000**" in md and "restored bit-exactly" in md
    assert "16 of 64 trials (25.0%, 95% CI 16.0%–36.8%) were catastrophic" in md
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["bitflip-distribution.png", "bitflip-heatmap.png"]
    for link in links:
        assert (analysed / "analysis" / link).is_file()
    assert "| blocks.0 | exponent_msb | 4 | inf |" in md  # the top row of the ranked table


def test_report_html_is_self_contained(analysed):
    page = (analysed / "analysis" / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in page and "<table>" in page and "<code>exponent_msb</code>" in page


def test_summary_json_is_strict_json_with_the_numbers(analysed):
    summary = _strict_json((analysed / "analysis" / "summary.json").read_text())
    assert summary["catastrophic"]["catastrophic"] == 16 and summary["catastrophic"]["n"] == 64
    assert summary["catastrophic"]["ci_low"] == pytest.approx(0.160, abs=1e-3)
    top = summary["tables"]["most_sensitive_conditions"][0]
    assert (top["target"], top["field"], top["median"]) == ("blocks.0", "exponent_msb", "inf")
    assert summary["run"]["replicas"] == 2 and summary["baseline"]["ppl"] == 20.0
    assert set(summary["figures"]) == {"bitflip-heatmap", "bitflip-distribution"}


def test_reading_names_the_fields_and_layers():
    text = "\n".join(findings(bitflip_table()))
    assert "`exponent_msb` 100%" in text and "Flips of `mantissa` never moved perplexity by more than 0%" in text
    assert "most sensitive is `blocks.0`" in text  # it alone has non-finite trials
    noise = "\n".join(findings(noise_table()))
    assert "passes 2× the baseline for `mlp.down` at sigma 0.3" in noise and "`attn.q`" in noise
    assert "1 trial failed" in noise
    ablation = "\n".join(findings(ablation_table()))
    assert "Ablation `zero`: the costliest targets are `blocks.0.mlp.down` (non-finite), `lm_head` (×3.0000)" in ablation


def test_reading_spots_ties_and_a_saturated_output():
    """Every exponent_msb flip lands on ppl 2048 (a uniform guess over 2048 tokens), in every layer."""
    saturated = bitflip_table().with_columns(
        pl.when(pl.col("field") == "exponent_msb").then(2048 / BASELINE_PPL).otherwise(pl.col("delta_ppl")).alias("delta_ppl"),
        pl.lit(False).alias("nonfinite"),
    ).with_columns((pl.col("delta_ppl") * BASELINE_PPL).alias("ppl"))
    text = "\n".join(findings(saturated))
    assert "4 conditions tie as the most damaging, e.g. `blocks.0` with `field=exponent_msb`: median perplexity ×102.4 (ppl 2048.0)" in text
    assert "16 of the 16 catastrophic trials that stayed finite land on the same perplexity, 2048.0, across 4 targets" in text
    assert "No layer stands out: every block has 4 of 16 trials catastrophic (25.0%), worst ×102.4; medians" in text


def test_other_kinds_report_end_to_end(tmp_path, capsys):
    for name, table in (("noise", noise_table()), ("ablation", ablation_table())):
        run = write_run(tmp_path, table, name=name)
        assert main([str(run), "--out", str(tmp_path / f"{name}-out")]) == 0
        assert (tmp_path / f"{name}-out" / "report.html").is_file()
    out = capsys.readouterr().out
    assert "Per module kind and sigma" in out  # the noise run's dose table
    assert re.search(r"^ +target +mode +n +median", out, re.M)  # the ablation run's ranking, by mode...
    assert re.search(r"^ +blocks\.0\.mlp\.down +zero +1 +inf", out, re.M)  # ...its non-finite trial first


# --- comparing runs ---


def _two_runs(tmp_path):
    """The same study in float32 and in bfloat16, where bfloat16 doubles every median."""
    a = write_run(tmp_path, bitflip_table(), name="bitflip", run_id="20260101-000000-aaaaaa")
    doubled = bitflip_table().with_columns(pl.col("delta_ppl") * 2)
    b = write_run(tmp_path, doubled, name="bitflip", run_id="20260102-000000-bbbbbb", dtype="bfloat16")
    return load_run(a), load_run(b)


def test_joined_table(tmp_path):
    runs = _two_runs(tmp_path)
    assert compare.labels(runs) == ["float32", "bfloat16"]  # the name and the model are the same
    table = compare.joined(runs)
    assert len(table) == 16 and compare.join_keys(runs) == ["kind", "target", "field"]
    finite = table.filter(pl.col("median_float32").is_finite())
    assert finite["ratio_bfloat16"].to_list() == pytest.approx([2.0] * len(finite))


def test_compare_cli_writes_to_the_default_directory(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    assert main([str(a.path), str(b.path)]) == 0
    out = a.path / "analysis" / "compare-20260102-000000-bbbbbb"
    assert {p.name for p in out.iterdir()} >= {"compare.parquet", "compare-layers.png", "compare-scatter.png",
                                                "compare.md", "compare.html"}
    assert pl.read_parquet(out / "compare.parquet").height == 16
    printed = capsys.readouterr().out
    assert "16 conditions in common (joined on kind, target, field)" in printed and "ratio vs float32" in printed


def test_runs_that_share_nothing(tmp_path, capsys):
    a = write_run(tmp_path, bitflip_table(), name="bitflip")
    b = write_run(tmp_path, noise_table(), name="noise")
    with pytest.raises(AnalysisError, match="perturb in different ways"):
        compare.joined([load_run(a), load_run(b)])
    assert main([str(a), str(b)]) == 2
    assert "Traceback" not in capsys.readouterr().err
