"""Super weights: discovery on planted models, the `zero` kind, verdicts, the CLI, the shipped 7B experiments."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from sensray.checksum import weights_checksum
from sensray.perturbations import PERTURBATIONS, ParamError
from sensray.perturbations.base import as_bits
from sensray.superweights import Thresholds, discover, judge
from sensray.superweights.cli import main
from sensray.superweights.discovery import Pair
from sensray.targets import select
from sensray.testing import FAMILIES, tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[1]
SUPER = (11, 37)  # planted in blocks.1.mlp.down: row (output channel) 11, column (input channel) 37
DECOY = (5, 3)  # a larger weight on an ordinary input channel: the top-magnitude control, not a super weight
WINDOWS = torch.randint(0, 90, (8, 32), generator=torch.Generator().manual_seed(0))


def weight(model, name):
    (ref,) = select(model, name).tensors
    return ref.resolve(model)


def plant(model):
    """Make input channel 37 of blocks.1.mlp.down spike (its up/gate rows scaled up) and the one
    weight [11, 37] carry it into a massive output at channel 11."""
    from sensray.architectures import components

    present = components(model)
    with torch.no_grad():
        for part in ("up", "gate"):  # gate only in gated (SwiGLU) families
            if f"blocks.1.mlp.{part}" in present:
                weight(model, f"blocks.1.mlp.{part}.weight")[SUPER[1]] *= 30.0
        down = weight(model, "blocks.1.mlp.down.weight")
        down[SUPER] = 4.0
        down[DECOY] = 8.0
    return model


def zero(model, **params):
    kind = PERTURBATIONS.get("zero")
    parsed = kind.parse(params)
    kind.check(model, parsed)
    return kind.apply(model, parsed)


def logits(model):
    with torch.inference_mode():
        return model(input_ids=WINDOWS[:2], use_cache=False).logits.clone()


# ---------------------------------------------------------------- discovery

@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_finds_exactly_the_planted_weight_in_every_family(family):
    found = discover(plant(tiny_model(family)), WINDOWS)
    (cand,) = found.candidates
    assert (cand.layer, cand.row, cand.col) == (1, *SUPER) and cand.name == "blocks.1.mlp.down[11, 37]"
    assert cand.output_ratio >= 20 and cand.input_ratio >= 20 and cand.share > 0.9
    assert cand.weight == 4.0 and cand.magnitude_rank == 1  # the decoy is larger
    assert 0 <= cand.window < len(WINDOWS) and WINDOWS[cand.window, cand.position] == cand.token


@pytest.mark.parametrize("family", FAMILIES)
def test_no_candidates_without_a_plant(family):
    found = discover(tiny_model(family), WINDOWS)
    assert found.candidates == []
    assert [a.layer for a in found.layers] == [0, 1] and all(a.pairs for a in found.layers)
    down = weight(tiny_model(family), "blocks.0.mlp.down.weight")
    assert all(0 <= p.row < down.shape[0] and 0 <= p.col < down.shape[1] for p in found.pairs)


def test_thresholds_decide():
    model = plant(tiny_model("llama"))
    assert discover(model, WINDOWS, Thresholds(min_magnitude=1e6)).candidates == []
    assert discover(model, WINDOWS, Thresholds(min_ratio=1e5)).candidates == []
    assert discover(model, WINDOWS, Thresholds(min_share=1.5)).candidates == []
    assert len(discover(model, WINDOWS, Thresholds(min_magnitude=0, min_ratio=0, min_share=0)).candidates) > 1


# ---------------------------------------------------------------- the zero kind

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params, count", [
    (dict(pick="coords", coords=[[11, 37], [0, 0]]), 2),
    (dict(pick="top", count=5), 5),
    (dict(pick="random", count=7, seed=3), 7),
])
def test_zero_changes_exactly_its_elements_and_restores_bit_exactly(dtype, params, count):
    model = plant(tiny_model("llama", dtype=dtype))
    w = weight(model, "blocks.1.mlp.down.weight")
    before, checksum, base = w.clone(), weights_checksum(model), logits(model)
    undo = zero(model, target="blocks.1.mlp.down.weight", **params)
    changed = as_bits(w) != as_bits(before)
    assert changed.sum() == count and (as_bits(w)[changed] == 0).all()  # +0.0: every bit clear
    if params["pick"] == "coords":
        assert changed[11, 37] and changed[0, 0]
    if params["pick"] == "top":  # the five largest |w|, the planted 8.0 and 4.0 among them
        assert changed[DECOY] and changed[SUPER] and before.abs()[changed].min() >= before.abs()[~changed].max()
    assert undo.touches()[0].data_ptr() == w.data_ptr()
    assert not torch.equal(logits(model), base)
    undo.restore()
    assert undo.verify() and weights_checksum(model) == checksum and torch.equal(logits(model), base)


def test_prefix_reuse_starts_at_the_zeroed_block():
    from sensray import prefix
    from sensray.metrics import evaluate, reference

    model, data = plant(tiny_model("llama")), [WINDOWS[:2]]
    ref = reference(model, data)
    cache = prefix.PrefixCache.record(model, data, budget_bytes=None)
    undo = zero(model, target="blocks.1.mlp.down.weight", pick="coords", coords=[list(SUPER)])
    try:
        assert cache.first_touched(undo) == 1
        start = cache.start_for(undo)
        assert evaluate(model, data, ref) == evaluate(model, data, ref, cache, start)
    finally:
        undo.restore()


def test_top_picks_the_largest_and_breaks_ties_by_index():
    model = tiny_model("llama")
    w = weight(model, "blocks.0.mlp.down.weight")
    with torch.no_grad():
        w[3, 4], w[2, 9], w[7, 1], w[0, 5] = 9.0, -9.0, 5.0, 5.0
    undo = zero(model, target="blocks.0.mlp.down.weight", pick="top", count=3)
    assert {(int(i), int(j)) for i, j in (w == 0).nonzero()} >= {(3, 4), (2, 9), (0, 5)} and w[7, 1] == 5.0
    undo.restore()


def test_random_is_seeded():
    model = tiny_model("llama")
    w = weight(model, "blocks.0.mlp.down.weight")

    def zeroed(seed):
        undo = zero(model, target="blocks.0.mlp.down.weight", pick="random", count=20, seed=seed)
        out = set(map(tuple, (w == 0).nonzero().tolist()))
        undo.restore()
        return out

    assert zeroed(1) == zeroed(1) != zeroed(2) and len(zeroed(1)) == 20


@pytest.mark.parametrize("family, params, param", [
    ("llama", dict(target="blocks.1.mlp.down.weight", coords=[[64, 0]]), "coords"),  # shape (64, 128)
    ("llama", dict(target="blocks.1.mlp.down.weight", coords=[[1, 2, 3]]), "coords"),
    ("llama", dict(target="blocks.1.mlp.down.weight", coords=[[1, 2], [1, 2]]), "coords"),
    ("llama", dict(target="blocks.1.mlp", coords=[[1, 2]]), "target"),  # three matrices
    ("llama", dict(target="blocks.0.norm1.weight", pick="top"), "target"),  # 1-D
    ("bloom", dict(target="blocks.0.attn.q.weight", pick="top"), "target"),  # a 3-D view of the fused qkv
    ("llama", dict(target="blocks.1.mlp.down.weight", pick="random", count=64 * 128 + 1), "count"),
    ("llama", dict(target="blocks.9.mlp.down.weight", pick="top"), "target"),
])
def test_zero_check_rejects_bad_params_on_a_meta_model(family, params, param):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config(family))
    kind = PERTURBATIONS.get("zero")
    with pytest.raises(ParamError) as err:
        kind.check(meta, kind.parse(params))
    assert err.value.param == param


@pytest.mark.parametrize("params, words", [
    (dict(pick="coords"), "needs 'coords'"),
    (dict(coords=[[1, 2]], count=2), "disagrees"),
    (dict(pick="biggest"), "'coords', 'top' or 'random'"),
])
def test_zero_params_are_consistent(params, words):
    with pytest.raises(ParamError, match=words):
        PERTURBATIONS.get("zero").parse({"target": "blocks.0.mlp.down.weight", **params})


# ---------------------------------------------------------------- verdicts

def _pair(row, col, candidate=True):
    return Pair(layer=1, target="blocks.1.mlp.down.weight", row=row, col=col, output=1.0, output_ratio=1.0,
                input=1.0, input_ratio=1.0, input_max=1.0, share=1.0, weight=1.0, magnitude_rank=3, window=0,
                position=0, token=0, candidate=candidate)


def _row(pick, coords, seed, delta, kl, error=None):
    return dict(target="blocks.1.mlp.down.weight", pick=pick, coords=coords, seed=seed, delta_ppl=delta, kl=kl,
                nonfinite=False, error=error)


def test_verdicts_compare_each_weight_with_its_controls():
    rows = []
    for coords, delta, kl in (([[1, 2]], 40.0, 3.0), ([[3, 4]], 1.2, 0.05), ([[5, 6]], 1.0001, 1e-4)):
        rows.append(_row("coords", coords, 0, delta, kl))
        rows += [_row("random", coords, s, 1.0, 1e-6 * (s + 1)) for s in range(3)]
        rows.append(_row("top", coords, 0, 1.001, 1e-3))
    rows.append(_row("coords", [[7, 8]], 0, None, None, error="RuntimeError: boom"))
    verdicts = judge(pl.DataFrame(rows), [_pair(1, 2), _pair(3, 4), _pair(5, 6), _pair(7, 8)])
    assert [v.verdict for v in verdicts] == ["super weight", "outsized", "ordinary", "failed"]
    assert verdicts[0].random.n == 3 and verdicts[0].random.kl_max == pytest.approx(3e-6)


# ---------------------------------------------------------------- the CLI end to end

@pytest.fixture(scope="module")
def saved(tmp_path_factory, char_tokenizer):
    """A planted tiny Llama and a character tokenizer, saved as an HF directory."""
    path = tmp_path_factory.mktemp("planted")
    model = plant(tiny_model("llama"))
    with torch.no_grad():  # a random model's predictions are near uniform: make them confident enough to move
        weight(model, "final_norm.weight").mul_(20.0)
    model.save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


def test_cli_finds_and_verifies_the_planted_weight(saved, tmp_path, capsys):
    args = ["--model", str(saved), "--executor", "local", "--output-dir", str(tmp_path), "--seq-len", "32",
            "--calibration-sequences", "8", "--num-sequences", "4", "--seeds", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    run = Path(out.strip().splitlines()[-1])
    assert run.parent.parent == tmp_path and "blocks.1.mlp.down[11, 37]" in out
    found = json.loads((run / "candidates.json").read_text())
    assert [c["name"] for c in found["candidates"]] == ["blocks.1.mlp.down[11, 37]"]
    (verdict,) = json.loads((run / "verdicts.json").read_text())["verdicts"]
    assert verdict["verdict"] in ("super weight", "outsized") and not verdict["top_includes_candidate"]
    kl = verdict["zeroed"]["kl"]
    assert kl > 1 and kl > 1000 * verdict["random"]["kl_max"] and kl > 5 * verdict["top"]["kl"]
    (sweep,) = (run / "verify-blocks.1.mlp.down").iterdir()
    trials = pl.read_parquet(sweep / "trials.parquet")
    assert trials.height == 3 * 3 and set(trials["pick"]) == {"coords", "top", "random"}
    assert trials["error"].is_null().all()
    baseline = json.loads((sweep / "baseline.json").read_text())
    assert baseline["checksum_at_load"] == baseline["checksum_after_sweep"]
    report = (run / "report.md").read_text()
    assert "blocks.1.mlp.down[11, 37]" in report and str(sweep) in report
    assert (run / "activations.png").stat().st_size > 10_000 and (run / "activations.parquet").is_file()


@pytest.mark.parametrize("args, words", [
    (["--min-ratio", "-1"], "--min-ratio: must be at least 0"),
    (["--seeds", "0"], "--seeds: must be at least 1"),
    (["--calibration", "no/such.txt"], "--calibration: no such file"),
    (["--num-sequences", "100000"], "--num-sequences: asked for 100000 windows"),
    (["--address", "auto", "--executor", "local"], "--address/--replicas: only for --executor ray"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_bad_arguments_exit_2_with_one_line_and_write_nothing(saved, tmp_path, capsys, args, words):
    code = main(["--model", str(saved), "--output-dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1 and err.startswith("error:")
    assert not (tmp_path / "out").exists()


def test_cli_unknown_model_exits_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "--model:" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the shipped 7B experiments

SEVEN_B = {  # the real shapes, built on the meta device (no weights, no Hub)
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                   sliding_window=4096)),
}
PUBLISHED = {"llama-2-7b": [2533, 7890], "mistral-7b": [2070, 7310]}


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("superweight-*.yaml")), ids=lambda p: p.name)
def test_shipped_superweight_experiments_plan_against_the_7b_structure(path):
    from transformers import AutoModelForCausalLM

    from sensray.plan import make_plan
    from sensray.spec import load_spec

    spec = load_spec(path)
    family, shape = SEVEN_B[spec.model.name]
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config(family, **shape, max_position_embeddings=4096),
                                                dtype=torch.bfloat16)
    plan = make_plan(spec, meta)
    picks = {t.params["pick"] for t in plan.trials}
    assert picks == {"coords", "top", "random"} and len({t.params["seed"] for t in plan.trials}) >= 4
    assert {tuple(map(tuple, t.params["coords"])) for t in plan.trials} == {(tuple(PUBLISHED[spec.model.name]),)}
    down = weight(meta, "blocks.1.mlp.down.weight")
    assert down.shape == (4096, shape["intermediate_size"])  # row = output (hidden), column = input channel
    assert spec.model.dtype == "bfloat16" and spec.resources.gpus == 1 and spec.data.corpus.startswith("hf:")
    assert np.all(np.array(PUBLISHED[spec.model.name]) < np.array(down.shape))
