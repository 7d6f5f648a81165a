"""report.md / report.html / summary.json of one run, the reading, and comparing runs."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest
from synthetic_runs import BASELINE_PPL, ablation_table, bitflip_table, noise_table, prune_table, write_run

from sensray.analyze import compare
from sensray.analyze.__main__ import main
from sensray.analyze.reading import findings
from sensray.analyze.report import analyse
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
            "bitflip-bits.png", "bitflip-matrices.png", "bitflip-distribution.png"} <= names


def test_report_md_says_what_was_run_and_answers_the_question(analysed):
    md = (analysed / "analysis" / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", md, re.M)
    assert headings == ["What was run", "Baseline", "Reading", "Bit fields", "Bit positions", "Matrices hit",
                        "Most sensitive conditions", "Per layer and module kind", "Distribution",
                        "Worst trials, exactly what they changed", "All trials (64)", "Next"]
    assert "experiment `bitflip`: **synthetic bitflip study**" in md  # the study's question
    assert "command `sensray sweep experiments/bitflip.yaml`" in md
    assert "versions: sensray 0.1.0 (git 0123abc), torch 2.13.0" in md
    assert "model `sensray-tiny`" in md and "64 trials (0 failed)" in md and "2 replicas" in md
    assert re.search(r"perplexity \*\*20\.00\*\*, 95% CI 1\d\.\d\d–2\d\.\d\d over resampled eval sequences", md)
    assert "scores ppl 2,048, ×102 the baseline" in md and "restored bit-exactly" in md
    assert ("The 64 trials flipped 64 bits in 16 distinct weight elements (48 flips repeat an element: "
            "`distinct` says how many positions back each cell; draws are keyed by seed and target") in md
    reading = md.split("## Reading")[1].split("##")[0]
    assert reading.index("Catastrophic faults by the field") < reading.index("16 of 64 trials (25.0%")
    assert "16 of 64 trials (25.0%, 95% CI 16.0%–36.8%) were catastrophic" in reading
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["bitflip-bits.png", "bitflip-distribution.png", "bitflip-heatmap.png",
                             "bitflip-matrices.png"]
    assert "| flip | n | × baseline (95% CI) | q25–q75 | worst | ppl | top-1 agree | KL | catastrophic |" in md
    assert "| sign | 16 | 1.00 (1.00–1.00) |" in md and "**Per field asked for**\n\n| flip |" in md and "*Sorted in IEEE order.*" in md
    assert "All 64 trials, sortable and filterable: `report.html`" in md


def test_every_ranked_table_states_its_order(analysed):
    md = (analysed / "analysis" / "report.md").read_text()
    tables_ = re.findall(r"((?:^\|.*\|\n)+)\n(.*)", md, re.M)
    assert len(tables_) >= 6
    for table, note in tables_:
        assert "Sorted " in note, (table.splitlines()[0], note)


def test_report_html_is_self_contained(analysed):
    page = (analysed / "analysis" / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))  # in-page links only
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    assert '<script type="application/json" id="trial-data">' in page and "<code>exponent_msb</code>" in page
    assert '<span class="nw">16.0%–36.8%</span>' in page  # ranges never break across lines
    assert '<span class="nw">--threshold</span> 10' in page  # nor do the Next commands' options


def test_summary_json_is_strict_json_with_every_metric(analysed):
    summary = _strict_json((analysed / "analysis" / "summary.json").read_text())
    assert summary["catastrophic"]["catastrophic"] == 16 and summary["catastrophic"]["n"] == 64
    assert summary["catastrophic"]["ci_low"] == pytest.approx(0.160, abs=1e-3)
    assert summary["baseline"]["ppl_low"] < 20 < summary["baseline"]["ppl_high"]
    assert summary["ceiling"] == pytest.approx(102.4) and summary["run"]["command"].startswith("sensray sweep")
    fields = {r["fault"]: r for r in summary["sections"]["fields"]["by_field_flipped"]}
    assert fields["sign"]["top1"] == pytest.approx(0.999) and fields["sign"]["kl"] > 0
    asked = {r["flip"]: r for r in summary["sections"]["fields"]["by_field_asked"]}
    assert asked["exponent_msb"]["worst"] == "inf"  # non-finite as a string: strict JSON
    top = summary["sections"]["conditions"]["most_sensitive_conditions"][0]
    assert (top["target"], top["field"], top["median"]) == ("blocks.0", "exponent_msb", "inf")
    assert summary["run"]["replicas"] == 2 and summary["baseline"]["ppl"] == 20.0
    assert set(summary["figures"]) == {"bitflip-heatmap", "bitflip-bits", "bitflip-matrices", "bitflip-distribution"}
    assert summary["findings"][0].startswith("**Catastrophic faults by the field")


def test_the_bitflip_reading_separates_overlapping_fields():
    text = "\n".join(analyse(load_run(_run("bitflip", bitflip_table()))).findings)
    assert "`exponent MSB` (bit 30): 16 of 20 (80.0%, 95% CI 58.4%–91.9%)" in text
    assert "`mantissa` (bits 0–22): 0 of 16 (95% CI 0%–19.4%), worst ×1.00" in text
    assert "`exponent` overlaps `exponent_msb`: it draws one of bits 23–30" in text
    assert "so 4 of its 16 trials flipped bit 30" in text
    assert "By the weight matrix the flip actually landed in: `exponent MSB` flips were catastrophic whenever they hit " \
           "`attn.k` (4/4), `attn.v` (4/4), `attn.o` (4/4); in some of the flips that hit `attn.q` (4/8)." in text
    assert "Top-1 agreement moves where perplexity cannot" in text


def test_each_kind_answers_its_question():
    noise = "\n".join(analyse(load_run(_run("noise", noise_table()))).findings)
    assert "**Where each module kind breaks** (median perplexity above 2× the baseline), most fragile first: " \
           "`mlp.down` at sigma 0.3" in noise
    assert "Never breaking (median perplexity above 2× the baseline) up to the largest sigma run (1); there, most " \
           "damaged first: `attn.q` ×1.52" in noise and "1 trial failed" in noise
    ablation = "\n".join(analyse(load_run(_run("ablation", ablation_table()))).findings)
    assert "**The components that matter most**, by ppl / baseline: with `zero` ablation, `blocks.0.mlp.down` " \
           "non-finite (top-1 95.00%), `lm_head` ×3.00 (top-1 20.00%)" in ablation
    prune = "\n".join(analyse(load_run(_run("prune", prune_table()))).findings)
    assert ("**How far, and which criterion keeps the model best**: 2 of 4 methods reach sparsity 0.5 under 2× the "
            "baseline perplexity; there, from best to worst: `wanda (row)` ×1.65 (95% CI") in prune
    assert "Lowest perplexity per sparsity above 0: `wanda (row)` at 0.2, 0.4, 0.5, 0.6, 0.8." in prune
    assert "paired on the same eval sequences" in prune
    assert "Highest sparsity under 2× the baseline perplexity, per method: `wanda (row)` 0.5" in prune
    assert "Achieved sparsity (zeros in the pruned matrices after each trial) is within 0.1 percentage points" in prune


def test_prune_tables_as_pruning_papers_report_them(tmp_path):
    analysis = analyse(load_run(_run("prune", prune_table(), tmp_path)))
    section = next(s for s in analysis.sections if s.key == "methods")
    limits, ppl, top1 = [b for b in section.blocks if hasattr(b, "headers")][:3]
    assert limits.headers[:2] == ["method", "highest sparsity ≤ 2×"] and limits.rows[0][:2] == ["wanda (row)", "0.5"]
    assert ppl.headers == ["sparsity", "achieved", "magnitude (row)", "magnitude (tensor)", "wanda (row)",
                           "wanda (tensor)"]
    assert [r[0] for r in ppl.rows] == ["0.0", "0.2", "0.4", "0.5", "0.6", "0.8"]
    assert ppl.rows[0][2] == "20.00" and ppl.rows[3][1] == "50.0%–50.1%"
    assert top1.rows[-1][2].endswith("%")


def test_reading_spots_a_saturated_output():
    """Every exponent_msb flip lands on ppl 2048 (a uniform guess over 2048 tokens), in every layer."""
    saturated = bitflip_table().with_columns(
        pl.when(pl.col("field") == "exponent_msb").then(2048 / BASELINE_PPL).otherwise(pl.col("delta_ppl")).alias("delta_ppl"),
        pl.lit(False).alias("nonfinite"),
    ).with_columns((pl.col("delta_ppl") * BASELINE_PPL).alias("ppl"))
    text = "\n".join(findings(saturated, vocab=2048))
    assert "4 conditions tie as the most damaging, e.g. `blocks.0` with `field=exponent_msb`: median perplexity ×102 (ppl 2,048.00)" in text
    assert ("16 of the 16 catastrophic trials that stayed finite land on the same perplexity, 2,048.00, across 4 "
            "targets: the damaged model's output saturates at the uniform-output ceiling") in text
    assert "No layer stands out: every block has 4 of 16 trials catastrophic (25.0%), worst ×102; medians" in text


def test_reading_says_when_a_saturated_output_is_worse_than_guessing():
    """One level above the vocabulary size: a fixed, confidently wrong distribution, not the uniform ceiling."""
    level = 2920.25
    stuck = bitflip_table().with_columns(
        pl.when(pl.col("field") == "exponent_msb").then(level / BASELINE_PPL).otherwise(pl.col("delta_ppl")).alias("delta_ppl"),
        pl.lit(False).alias("nonfinite"),
    ).with_columns((pl.col("delta_ppl") * BASELINE_PPL).alias("ppl"))
    text = "\n".join(findings(stuck, vocab=2048))
    assert ("land on the same perplexity, 2,920.25, across 4 targets: the damaged model's output saturates at one fixed "
            "output distribution, above the uniform-output ceiling (ppl 2,048, the vocabulary size): confidently "
            "wrong, worse than guessing.") in text


def test_a_run_from_before_per_sequence_nlls_says_what_it_lacks(tmp_path):
    old = bitflip_table().drop("seq_nll", "changes", "tensors", "tensor", "index", "flipped_bit", "old", "new",
                               "elements_changed", "bit_counts")
    run = write_run(tmp_path, old, recorded=False)
    assert main([str(run)]) == 0
    md = (run / "analysis" / "report.md").read_text()
    assert "no interval: this run did not record per-sequence NLLs" in md and "command: not recorded" in md
    assert "≈" not in md.split("## Bit fields")[1] and "## Bit positions" not in md  # no provenance: no bit table
    assert "| sign | 16 | 1.00 |" in md and "## Bit fields" in md and "(the rows do not record which bit" in md


def test_other_kinds_report_end_to_end(tmp_path, capsys):
    for name, table in (("noise", noise_table()), ("ablation", ablation_table()), ("prune", prune_table())):
        run = write_run(tmp_path, table, name=name)
        assert main([str(run), "--out", str(tmp_path / f"{name}-out")]) == 0
        assert (tmp_path / f"{name}-out" / "report.html").is_file()
    out = capsys.readouterr().out
    assert "Where each module kind breaks" in out  # the noise run's section
    assert re.search(r"^ +module kind +≈ baseline up to", out, re.M)
    assert re.search(r"^ +module kind +zero +mean", out, re.M)  # the ablation run's per-kind table
    assert re.search(r"^ +method +highest sparsity ≤ 2×", out, re.M)  # the prune run's limits


def _run(name: str, table: pl.DataFrame, root=None):
    import tempfile
    from pathlib import Path

    return write_run(Path(root or tempfile.mkdtemp()), table, name=name)


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


# --- what a run records for its report's reproducibility header ---


def test_baseline_json_records_versions_and_the_command_a_resume_keeps(tmp_path, monkeypatch):
    import json as json_

    from sensray.results import RunDir, command_line, git_commit, versions

    run = RunDir(tmp_path)
    monkeypatch.setattr("sys.argv", ["/venv/bin/sensray", "sweep", "experiments/bitflip.yaml", "--set", "x=a b"])
    assert command_line() == "sensray sweep experiments/bitflip.yaml --set 'x=a b'"
    run.write_baseline({"ppl": 1.0})
    monkeypatch.setattr("sys.argv", ["/venv/bin/sensray", "sweep", "--resume", str(tmp_path)])
    run.write_baseline({"ppl": 1.0, "checksum_after_sweep": "abc"})  # the end of a resumed run
    baseline = json_.loads((tmp_path / "baseline.json").read_text())
    assert baseline["command"] == "sensray sweep experiments/bitflip.yaml --set 'x=a b'"  # what was run
    found = versions()
    assert {"sensray", "python", "torch", "transformers", "numpy", "polars"} <= set(found)
    assert baseline["versions"].keys() == found.keys()
    assert git_commit(tmp_path) is None  # not a checkout of sensray: no commit claimed
