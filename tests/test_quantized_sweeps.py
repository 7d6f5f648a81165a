"""Quantized sweeps from the command line (in-process `sensray sweep`): dry-run errors, int8 and nf4 runs
on the local executor and on Ray, early stopping, and the format study (same positions in every format,
interrupted and resumed, analysed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sweep_support import fails, spec_writer, sweep

from sensray.spec import load_spec

pytest.importorskip("bitsandbytes")
REPO = Path(__file__).resolve().parents[1]

QUANTIZED = """\
name: {spec_name}
model: {{quantization: {quantization}{extra}}}
data: {{seq_len: 32, num_sequences: 2, batch_size: {batch}}}
perturbation: bitflip
space:
  target: {{each: "blocks.{blocks}"}}
  field: {{grid_search: [sign, magnitude_msb, exponent_msb]}}
  count: 1
num_samples: {samples}
output_dir: {out}
"""

STUDY = """\
name: study
model: {{name: sensray-tiny}}
formats:
  fp32: {{dtype: float32}}
  int8: {{quantization: int8}}
  nf4: {{quantization: nf4}}
data: {{seq_len: 32, num_sequences: 2, batch_size: 2}}
perturbation: bitflip
space:
  target: "blocks.*"
  role: {{grid_search: [sign, high, scale]}}
  count: 1
num_samples: 3
output_dir: {out}
"""


@pytest.fixture
def write(tmp_path):
    return spec_writer(tmp_path, tmp_path / "results")


def quantized(write, quantization="int8", extra="", blocks="2,6", samples=2, batch=2, name="q"):
    return write(QUANTIZED, spec_name=name, quantization=quantization, extra=extra, blocks=blocks, samples=samples,
                 batch=batch)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ------------------------------------------------------------------------------ errors at --dry-run


@pytest.mark.parametrize("change, words", [
    (["--set", "space.field=exponent", "--set", "space.target=blocks.*.mlp.*.weight"],
     ("space.field", "no 'exponent' bits", "stored as int8")),
    (["--set", "space.target=lm_head", "--set", "space.field=magnitude_msb"],
     ("space.field", "lm_head.weight stored as float32")),
    (["--set", "space.target=blocks.2", "--set", "space.bit=7", "--set", "space.field=null"],
     ("space.bit", "a different bit in each storage format")),
    (["--set", "model.double_quant=true"], ("model.double_quant", "4-bit setting", "'int8'")),
    (["--set", "perturbation=noise", "--set", "space={target: blocks.2, sigma: 0.1}"],
     ("space.target", "noise cannot act on", "stored as int8")),
])
def test_a_spec_this_storage_cannot_run_is_a_dry_run_error(write, capsys, tmp_path, change, words):
    fails(capsys, 2, quantized(write), "--dry-run", *change, words=words)
    assert not (tmp_path / "results").exists()


def test_a_quantization_bitsandbytes_cannot_give_here_is_a_dry_run_error(write, capsys, monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda", "xpu"}, raising=False)
    fails(capsys, 2, quantized(write), "--dry-run", words=("model.quantization", "has no cpu backend"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    fails(capsys, 2, quantized(write, "nf4"), "--dry-run",
          words=("model.quantization", "nf4 needs bitsandbytes", "sensray[quant]"))


def test_a_format_that_is_not_a_valid_model_is_a_dry_run_error(write, capsys):
    spec = write(STUDY.replace("nf4: {{quantization: nf4}}", "nf4: {{quantization: int8, double_quant: true}}"))
    fails(capsys, 2, spec, "--dry-run", words=("formats.nf4.double_quant", "4-bit setting"))


# ------------------------------------------------------------------------------------ whole sweeps


def test_an_int8_sweep_runs_end_to_end_and_records_codes_and_dequantized_weights(write, capsys):
    code, out, err = sweep(capsys, quantized(write), "--executor", "local")
    assert code == 0, err
    run = Path(last_line(out))
    baseline = json.loads((run / "baseline.json").read_text())
    assert baseline["quantization"] == "int8, float32 elsewhere" and baseline["parameters"] > 1_000_000
    assert baseline["checksum_at_load"] == baseline["checksum_after_sweep"]
    table = pl.read_parquet(run / "trials.parquet")
    assert table.height == 2 * 3 * 2 and table["error"].is_null().all()
    codes = table.filter(pl.col("field") == "magnitude_msb")  # only int8 codes have that field
    assert all(t.endswith(".weight") and ".norm" not in t for t in codes["tensor"])
    for change in codes["changes"].to_list():
        (c,) = change
        assert c["bit"] == 6 and (c["old_bits"] ^ c["new_bits"]) == 64 and 0 <= c["new_bits"] < 256
        assert abs(c["new"] - c["old"]) > 0  # dequantized: code * scale / 127 moved by 64 * scale / 127
    scales = table.filter(pl.col("field") == "exponent_msb")  # float32 row scales and norms
    assert all(t.endswith((".weight.scale", "norm1.weight", "norm2.weight")) for t in scales["tensor"])
    assert "int8, float32 elsewhere" in err


def test_early_stopping_on_a_quantized_replica(write, capsys):
    spec = quantized(write, "nf4", extra=", double_quant: true", blocks="*", samples=1, batch=1)
    spec.write_text(spec.read_text() + "early_stop: {top_k: 2, rungs: [0.5]}\n")
    code, out, err = sweep(capsys, spec, "--executor", "local")
    assert code == 0, err
    table = pl.read_parquet(Path(last_line(out)) / "trials.parquet")
    assert table.height == 8 * 3 and table["error"].is_null().all()
    assert table.filter(pl.col("stopped_rung").is_null()).height >= 2
    assert "early stopping:" in err


@pytest.mark.slow
def test_an_nf4_sweep_on_ray_gives_the_local_rows(write, local_ray, capsys):
    spec = quantized(write, "nf4", extra=", double_quant: true", blocks="3")
    tables = {}
    for executor in ("local", "ray"):
        code, out, err = sweep(capsys, spec, "--executor", executor, "--replicas", "2") if executor == "ray" else \
            sweep(capsys, spec, "--executor", executor)
        assert code == 0, err
        run = Path(last_line(out))
        tables[executor] = pl.read_parquet(run / "trials.parquet")
        baseline = json.loads((run / "baseline.json").read_text())
        assert baseline["checksum_at_load"] == baseline["checksum_after_sweep"]
    local, ray_ = tables["local"], tables["ray"]
    assert ray_["trial_id"].to_list() == local["trial_id"].to_list() and ray_["error"].is_null().all()
    assert ray_["changes"].to_list() == local["changes"].to_list()  # the same codes, bits and values
    assert ray_["ppl"].to_list() == pytest.approx(local["ppl"].to_list(), rel=1e-6)
    assert all(r.startswith("ray-") for r in ray_["replica"])


# ----------------------------------------------------------------------------------- format study


def test_the_shipped_format_study_flips_the_same_weights_in_every_format():
    """Planned on each format's meta model: every trial id of a role names the same weight everywhere."""
    from sensray.formats import plans
    from sensray.models import meta_model
    from sensray.perturbations import PERTURBATIONS
    from sensray.perturbations.bitflip import role_flips
    from sensray.quantized.elements import elements_of
    from sensray.targets import select

    spec = load_spec(REPO / "experiments" / "bitflip-formats.yaml")
    bitflip = PERTURBATIONS.get("bitflip")
    weights: dict[str, dict[str, tuple]] = {}
    for name, plan in plans(spec, 10_000).items():
        model = meta_model(plan.spec.model)
        for trial in plan.trials:
            params = bitflip.parse(trial.params)
            targets = [elements_of(model, ref) for ref in select(model, params.target).tensors]
            ((target, element, bit),) = role_flips(targets, params)
            weights.setdefault(trial.trial_id, {})[name] = (params.role, params.seed, target.name, int(element[0]),
                                                            int(bit[0]), target.format)
    assert len(weights) == 3 * 48
    for trial_id, per_format in weights.items():
        roles = {v[0] for v in per_format.values()}
        if roles == {"scale"}:
            assert set(per_format) == {"int8", "nf4"}  # float formats have no scale
            assert all(v[5] == "float32" and v[4] == 30 for v in per_format.values())
        else:
            assert set(per_format) == set(spec.formats)
            assert len({(v[2], v[3]) for v in per_format.values()}) == 1, per_format  # one weight, every format
    sign = {(v["fp32"][1]): v["fp32"][2:4] for v in weights.values() if "fp32" in v and v["fp32"][0] == "sign"}
    scale = {v["int8"][1]: v for v in weights.values() if v["int8"][0] == "scale"}
    for seed, (tensor, element) in sign.items():  # a scale trial scales its seed's sign trial's weight
        assert scale[seed]["int8"][2:4] == (f"{tensor}.scale", element // 128 if "down" not in tensor else element // 384)
        assert scale[seed]["nf4"][2:4] == (f"{tensor}.scale", element // 64)
    bits = {v["fp16"][0]: v["fp16"][4] for v in weights.values() if "fp16" in v}
    assert bits == {"sign": 15, "high": 14}


def test_a_format_study_runs_is_interrupted_resumes_and_is_analysed(write, capsys, monkeypatch):
    from sensray import formats
    from sensray.analyze.__main__ import main as analyze

    real, calls = formats._run_format, []

    def interrupt_after_the_first(study, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(study, name, *args, **kwargs)

    spec = write(STUDY)
    code, out, err = sweep(capsys, spec, "--dry-run")
    assert code == 0 and "left out: 3 trials (role 'scale'" in out and "[int8] study.int8: 9 trials" in out
    monkeypatch.setattr(formats, "_run_format", interrupt_after_the_first)
    code, out, err = sweep(capsys, spec, "--executor", "local")
    study = Path(err.split("--resume ")[-1].strip())
    assert code == 130 and (study / "fp32" / "trials.parquet").is_file() and not (study / "int8").exists()
    finished = (study / "fp32" / "trials.parquet").stat().st_mtime_ns
    monkeypatch.setattr(formats, "_run_format", real)
    code, out, err = sweep(capsys, "--resume", study, "--executor", "local")
    assert code == 0 and Path(last_line(out)) == study, err
    assert "study.fp32: finished" in err and (study / "fp32" / "trials.parquet").stat().st_mtime_ns == finished

    tables = {f: pl.read_parquet(study / f / "trials.parquet") for f in ("fp32", "int8", "nf4")}
    assert [t.height for t in tables.values()] == [6, 9, 9]
    assert set(tables["fp32"]["trial_id"]) < set(tables["int8"]["trial_id"]) == set(tables["nf4"]["trial_id"])
    weights = {f: {(r["trial_id"]): (r["tensor"], r["index"]) for r in t.filter(pl.col("role") != "scale")
                   .iter_rows(named=True)} for f, t in tables.items()}
    assert weights["fp32"] == weights["int8"] == weights["nf4"]  # the same weights, row for row
    for f in tables:
        assert json.loads((study / f / "baseline.json").read_text())["checksum_after_sweep"]

    assert analyze([str(study)]) == 0
    out = capsys.readouterr().out
    assert "3 formats x 3 bit roles" in out and "fp32" in out
    summary = pl.read_parquet(study / "analysis" / "formats.parquet")
    assert summary.height == 2 + 3 + 3 and set(summary["role"]) == {"sign", "high", "scale"}
    assert (summary["n"] == 3).all() and summary["ci_low"].is_not_null().all()
    assert np.all(summary["ci_low"].to_numpy() <= summary["share"].to_numpy())
    assert {p.name for p in (study / "analysis").iterdir()} == {"formats.md", "formats.parquet", "formats.png"}
    header = (study / "analysis" / "formats.md").read_text().split("\n\n")[1]
    assert "None" not in header and "int8 (quantization: int8)" in header, header  # only the keys each format sets
