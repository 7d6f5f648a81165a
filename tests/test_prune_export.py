"""python -m sensray.prune: the exported directory loads with from_pretrained, holds exactly the
pruned weights and truthful metadata, sweeps like any model, and bad arguments write nothing."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from sensray.models import BUNDLED_MODEL
from sensray.perturbations import PERTURBATIONS
from sensray.prune import METADATA, main

PRUNE = PERTURBATIONS.get("prune")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped model pruned to 50% by wanda, exported once for the tests below."""
    out = tmp_path_factory.mktemp("export") / "tiny-wanda50"
    assert main(["--model", "sensray-tiny", "--method", "wanda", "--sparsity", "0.5", "--calib-sequences", "8",
                 "--out", str(out)]) == 0
    return out


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def test_the_export_holds_exactly_the_weights_the_kind_prunes(exported):
    pruned = load(exported)
    expected = load(BUNDLED_MODEL)
    PRUNE.apply(expected, PRUNE.parse({"target": "blocks.*", "method": "wanda", "sparsity": 0.5,
                                       "calib_sequences": 8}))
    got, want = dict(pruned.named_parameters()), dict(expected.named_parameters())
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in got), [n for n in got if not torch.equal(got[n], want[n])]
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in exported.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", METADATA} <= {p.name for p in exported.iterdir()}


def test_the_metadata_says_what_was_done_and_what_came_out(exported):
    meta = json.loads((exported / METADATA).read_text())
    assert (meta["method"], meta["score"], meta["pattern"], meta["scope"]) == ("wanda", "wanda", "unstructured", "row")
    assert meta["requested_sparsity"] == 0.5 and meta["target"] == "blocks.*"
    assert meta["source"]["model"] == "sensray-tiny" and meta["source"]["resolved"] == str(BUNDLED_MODEL)
    assert meta["calibration"] == {"corpus": "bundled-train", "sequences": 8, "seq_len": 128}
    tensors = meta["achieved"]["tensors"]
    assert len(tensors) == 8 * 7 and all(t["sparsity"] == 0.5 for t in tensors.values())
    assert meta["achieved"]["overall"] == 0.5
    pruned = load(exported)
    down = pruned.get_parameter(tensors["blocks.3.mlp.down.weight"]["param"])
    assert int((down == 0).sum()) == tensors["blocks.3.mlp.down.weight"]["zeros"] == down.numel() // 2
    assert meta["source"]["weights_checksum"] != meta["weights_checksum"]


def test_the_exported_model_sweeps_and_its_baseline_is_the_pruned_trial(exported, tmp_path):
    from sensray.sweep import main as sweep

    shrink = ["--executor", "local", "--set", f"output_dir={tmp_path}", "--set", "data.num_sequences=2",
              "--set", "num_samples=1"]
    assert sweep(["experiments/noise.yaml", "--set", f"model.name={exported}", "--set", "space.target=blocks.0.mlp.up",
                  "--set", "space.sigma=0.1", *shrink]) == 0
    assert sweep(["experiments/prune.yaml", "--set", "space.method=wanda", "--set", "space.scope=row",
                  "--set", "space.sparsity=0.5", "--set", "space.calib_sequences=8", *shrink]) == 0
    (noise_run,) = (tmp_path / "noise").iterdir()
    (prune_run,) = (tmp_path / "prune").iterdir()
    baseline = json.loads((noise_run / "baseline.json").read_text())
    assert baseline["source"] == str(exported)
    trial = pl.read_parquet(prune_run / "trials.parquet").row(0, named=True)
    assert baseline["ppl"] == pytest.approx(trial["ppl"], rel=1e-6)


@pytest.mark.parametrize("args, flag", [
    (["--sparsity", "1.5"], "--sparsity"),
    (["--pattern", "3:7"], "--pattern"),
    (["--pattern", "2:4", "--sparsity", "0.3"], "--sparsity"),
    (["--method", "sensitivity", "--sparsity", "0.5"], "--run"),
    (["--method", "sensitivity", "--sparsity", "0.5", "--run", "no/such/run"], "--run"),
    (["--sparsity", "0.5", "--target", "blocks.0.norm1"], "--target"),
    ([], "--sparsity"),
])
def test_bad_arguments_exit_2_naming_the_argument_and_write_nothing(args, flag, tmp_path, capsys):
    out = tmp_path / "out" / "model"
    assert main(["--model", "sensray-tiny", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}:"), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_unknown_model_or_an_existing_out_exits_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "no-model"), "--sparsity", "0.5", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.startswith("error: --model:")
    (tmp_path / "b").mkdir()
    assert main(["--model", "sensray-tiny", "--sparsity", "0.5", "--out", str(tmp_path / "b")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and not any((tmp_path / "b").iterdir())


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedTokenizerBase

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", broken)
    assert main(["--model", "sensray-tiny", "--pattern", "2:4", "--out", str(tmp_path / "m")]) == 2
    assert "disk full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither --out nor the temporary directory beside it


def test_a_local_fused_qkv_model_exports_with_wanda_2_4(tmp_path, char_tokenizer):
    from sensray.testing import tiny_model

    source = tmp_path / "neox"
    tiny_model("gpt_neox").save_pretrained(source)
    char_tokenizer.save_pretrained(source)
    out = tmp_path / "neox-2of4"
    assert main(["--model", str(source), "--method", "wanda", "--pattern", "2:4", "--calib-sequences", "4",
                 "--calib-seq-len", "64", "--out", str(out)]) == 0
    qkv = load(out).get_parameter("gpt_neox.layers.1.attention.query_key_value.weight")  # (3 * hidden, hidden)
    assert ((qkv.view(qkv.shape[0], -1, 4) == 0).sum(-1) == 2).all()
    meta = json.loads((out / METADATA).read_text())
    assert "blocks.1.attn.qkv.weight" in meta["achieved"]["tensors"] and meta["achieved"]["overall"] == 0.5
