"""The prune kind: exact sparsities and N:M groups, Wanda against a hand computation, sensitivity
budgets, validation on meta models, exact restore on every family, and the shipped model's sweep."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from sensray.checksum import weights_checksum
from sensray.errors import SpecError
from sensray.perturbations import PERTURBATIONS, ParamError
from sensray.perturbations.base import as_bits
from sensray.perturbations.prune import matrices, prune_mask
from sensray.pruning import allocation, calibration
from sensray.pruning.calibration import Calibration, calibrate
from sensray.targets import select
from sensray.testing import FAMILIES, tiny_config, tiny_model

PRUNE = PERTURBATIONS.get("prune")
TOKENS = torch.arange(2 * 16).remainder(97).view(2, 16)
CALIB = Calibration("bundled-train", sequences=4, seq_len=32)  # the key the tests' norms are cached under


def apply(model, **params):
    parsed = PRUNE.parse(params)
    PRUNE.check(model, parsed)
    return PRUNE.apply(model, parsed)


def check(model, **params):
    return PRUNE.check(model, PRUNE.parse(params))


def logits(model):
    with torch.inference_mode():
        return model(input_ids=TOKENS, use_cache=False).logits.clone()


def calibrated(model, seed=0):
    """Cache Wanda's input norms for a tiny model (no tokenizer): random tokens of its vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    calibrate(model, [torch.randint(0, model.config.vocab_size, (2, 32), generator=gen)], CALIB)
    return model


WANDA = {"calibration": CALIB.corpus, "calib_sequences": CALIB.sequences, "calib_seq_len": CALIB.seq_len}


def live_matrices(model, target="blocks.*"):
    refs = matrices(model, select(model, target).tensors, target)
    return {ref.name: ref.resolve(model).reshape(-1, ref.resolve(model).shape[-1]) for ref in refs}


def meta(family="llama", **overrides):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(family, **overrides))


# ---------------------------------------------------------------- exact sparsities and patterns

@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_every_row_has_the_requested_share_of_zeros(sparsity, method):
    model = calibrated(tiny_model("llama"))
    assert all((w != 0).all() for w in live_matrices(model).values())
    apply(model, target="blocks.*", method=method, sparsity=sparsity, scope="row", **WANDA)
    for name, w in live_matrices(model).items():
        zeros = (w == 0).sum(dim=1)  # (rows,)
        assert (zeros == math.floor(sparsity * w.shape[1] + 0.5)).all(), name


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.61, 1.0])
def test_every_matrix_has_the_requested_share_of_zeros(sparsity):
    model = tiny_model("gpt_neox")
    apply(model, target="blocks.*", method="magnitude", sparsity=sparsity, scope="tensor")
    for name, w in live_matrices(model).items():
        assert int((w == 0).sum()) == math.floor(sparsity * w.numel() + 0.5), name


def test_magnitude_zeroes_the_smallest_weights():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in live_matrices(model).items()}
    apply(model, target="blocks.*", method="magnitude", sparsity=0.4)  # scope tensor by default
    for name, w in live_matrices(model).items():
        dropped, kept = before[name][w == 0].abs(), before[name][w != 0].abs()
        assert dropped.max() <= kept.min(), name


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_n_m_keeps_n_of_every_m_consecutive_weights(pattern, n, m, method):
    model = calibrated(tiny_model("llama"))
    before = {k: v.clone() for k, v in live_matrices(model).items()}
    apply(model, target="blocks.*", method=method, pattern=pattern, **WANDA)
    for name, w in live_matrices(model).items():
        groups = w.view(w.shape[0], -1, m)  # (rows, groups, M)
        assert ((groups == 0).sum(-1) == m - n).all(), name  # 2:4 and 4:8: exactly N zeros, N nonzeros
        if method == "magnitude":
            old = before[name].view_as(groups).abs()
            dropped = torch.where(groups == 0, old, -1.0).amax(-1)
            kept = torch.where(groups != 0, old, math.inf).amin(-1)
            assert (dropped <= kept).all(), name


def test_prune_mask_is_a_pure_function_of_the_scores():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 5.0, 7.0, 6.0]])
    assert prune_mask(score, 0.5, None, "row").tolist() == [[True] * 4 + [False] * 4]
    assert prune_mask(score, None, (2, 4), "row").tolist() == [[False, True, False, True, False, True, False, True]]
    assert prune_mask(score, 0.25, None, "tensor").tolist() == [[False, True, False, True] + [False] * 4]
    assert not prune_mask(score, 0.0, None, "tensor").any()


# ---------------------------------------------------------------- wanda against a hand computation

def test_wanda_choice_equals_the_hand_computation():
    """Embeddings one-hot (token t -> channel t mod 64), RMSNorm weight 1: the input of block 0's q
    projection for token t is r * e_(t mod 64), r = 1 / sqrt(1/64 + eps). So ||X_j|| = r * sqrt(count_j)
    and Wanda ranks W[i, j] by |W[i, j]| * r * sqrt(count_j)."""
    model = tiny_model("llama")
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(hidden).repeat(2, 1))  # (vocab 128, hidden 64)
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
    tokens = torch.tensor([[j for j in range(hidden) for _ in range(1 + j % 5)][:96]])  # channel j seen 1..5 times
    counts = torch.bincount(tokens.flatten() % hidden, minlength=hidden).double()
    norms = calibrate(model, [tokens], CALIB)
    r = 1 / math.sqrt(1 / hidden + model.config.rms_norm_eps)
    expected_norms = r * counts.sqrt()
    q = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(norms[q].double(), expected_norms, rtol=1e-5)

    weight = model.get_parameter(q + ".weight")
    original = weight.detach().clone()
    apply(model, target="blocks.0.attn.q", method="wanda", sparsity=0.5, **WANDA)
    k = weight.shape[1] // 2
    for i in range(weight.shape[0]):  # by hand: per output row, the k smallest |W| * ||X_j||
        scores = [(abs(original[i, j].item()) * expected_norms[j].item(), j) for j in range(weight.shape[1])]
        pruned = {j for _, j in sorted(scores)[:k]}
        assert {j for j in range(weight.shape[1]) if weight[i, j] == 0} == pruned, i
    by_magnitude = torch.topk(original.abs(), k, dim=1, largest=False).indices
    assert not torch.equal(torch.zeros_like(original, dtype=torch.bool).scatter_(1, by_magnitude, True), weight == 0)


def test_norms_are_measured_once_per_model_and_calibration(monkeypatch):
    model = tiny_model("llama")
    calls = []
    monkeypatch.setattr(calibration, "calibration_batches",
                        lambda m, c: calls.append(c) or [torch.randint(0, 128, (2, c.seq_len))])
    for _ in range(3):
        apply(model, target="blocks.*", method="wanda", sparsity=0.3, calib_sequences=2, calib_seq_len=16).restore()
    apply(model, target="blocks.*", method="wanda", sparsity=0.3, calib_sequences=2, calib_seq_len=8).restore()
    assert [c.seq_len for c in calls] == [16, 8]
    assert len(calibration._NORMS[model]) == 2 and tiny_model("llama") not in calibration._NORMS


# ---------------------------------------------------------------- sensitivity: per-layer budgets

def sensitivity_run(tmp_path, deltas: dict[str, float]):
    run = tmp_path / "results" / "layers" / "20260101-000000-abcdef"
    run.mkdir(parents=True)
    pl.DataFrame({"target": list(deltas), "delta_ppl": list(deltas.values()), "error": [None] * len(deltas)},
                 schema_overrides={"error": pl.String}).write_parquet(run / "trials.parquet")
    return run


def test_allot_keeps_the_total_and_prunes_the_least_sensitive_most():
    sizes = np.array([100.0, 300.0, 100.0, 500.0])
    sens = np.array([1.01, 3.0, math.inf, 1.5])
    got = allocation.allot(sizes, sens, 0.5, 0.2)
    assert math.isclose(sizes @ got / sizes.sum(), 0.5, abs_tol=1e-9)
    assert got[0] > got[3] > got[1] and got[2] == got[1]  # inf counts as the most sensitive finite value
    assert np.allclose(allocation.allot(sizes, sens, 0.5, 0.0), 0.5)
    high = allocation.allot(sizes, sens, 0.95, 0.2)  # clipped at 1: the others take up the rest
    assert high.max() <= 1.0 and math.isclose(sizes @ high / sizes.sum(), 0.95, abs_tol=1e-9)


def test_sensitivity_prunes_the_insensitive_block_more_at_the_same_total(tmp_path):
    run = sensitivity_run(tmp_path, {"blocks.0": 1.02, "blocks.1": 1.8})
    model = tiny_model("llama")
    apply(model, target="blocks.*", method="sensitivity", sparsity=0.5, spread=0.2, run=str(run.parent))
    w = live_matrices(model)
    share = {b: sum(int((v == 0).sum()) for k, v in w.items() if k.startswith(b)) /
             sum(v.numel() for k, v in w.items() if k.startswith(b)) for b in ("blocks.0", "blocks.1")}
    total = sum(int((v == 0).sum()) for v in w.values()) / sum(v.numel() for v in w.values())
    assert abs(total - 0.5) < 1e-3 and share["blocks.0"] == pytest.approx(0.7, abs=1e-2)
    assert share["blocks.1"] == pytest.approx(0.3, abs=1e-2)


# ---------------------------------------------------------------- validation on a meta model

@pytest.mark.parametrize("params, bad", [
    ({"sparsity": 1.5}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({}, "sparsity"),
    ({"pattern": "2:4", "sparsity": 0.3}, "sparsity"),
    ({"pattern": "3:7"}, "pattern"),
    ({"pattern": "2-4", "sparsity": 0.5}, "pattern"),
    ({"pattern": "4:4"}, "pattern"),
    ({"pattern": "2:4", "scope": "tensor"}, "scope"),
    ({"method": "sensitivity", "sparsity": 0.5}, "run"),
    ({"method": "wanda", "sparsity": 0.5, "target": "embed"}, "target"),
    ({"method": "wanda", "sparsity": 0.5, "calibration": "no/such.txt"}, "calibration"),
    ({"sparsity": 0.5, "target": "blocks.0.norm1"}, "target"),
    ({"sparsity": 0.5, "target": "blocks.9"}, "target"),
    ({"sparsity": 0.5, "method": "random"}, "method"),
])
def test_bad_parameters_name_the_parameter_on_a_meta_model(params, bad):
    with pytest.raises(ParamError) as err:
        check(meta(), **{"target": "blocks.*", **params})
    assert err.value.param == bad


def test_a_run_without_the_needed_rows_is_a_parameter_error(tmp_path):
    run = sensitivity_run(tmp_path, {"blocks.0": 1.1, "blocks.*": 1.3})
    with pytest.raises(ParamError, match="blocks.1.attn.q") as err:
        check(meta(), target="blocks.*", method="sensitivity", sparsity=0.5, run=str(run))
    assert err.value.param == "run"
    with pytest.raises(ParamError) as missing:
        check(meta(), target="blocks.*", method="sensitivity", sparsity=0.5, run=str(tmp_path / "nothing"))
    assert missing.value.param == "run"
    check(meta(), target="blocks.0.mlp.*", method="sensitivity", sparsity=0.5, run=str(run))  # blocks.0 is there


def test_the_plan_rejects_a_bad_trial_before_anything_runs(write_spec):
    from sensray.plan import make_plan
    from sensray.spec import load_spec

    spec = write_spec("""
        name: p
        perturbation: prune
        space: {target: "blocks.*", pattern: {grid_search: ["2:4", "3:7"]}}
    """)
    with pytest.raises(SpecError, match="does not divide") as err:
        make_plan(load_spec(spec))
    assert err.value.path == "space.pattern"


# ---------------------------------------------------------------- exact restore on every family

CASES = [("magnitude", {"sparsity": 0.6}), ("magnitude", {"sparsity": 0.6, "scope": "row"}),
         ("wanda", {"sparsity": 0.6}), ("wanda", {"pattern": "2:4"}), ("sensitivity", {"sparsity": 0.6})]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_restores_bit_exactly_on_every_family(family, tmp_path):
    run = sensitivity_run(tmp_path, {"blocks.0": 1.05, "blocks.1": 1.6})
    model = calibrated(tiny_model(family))
    checksum, clean = weights_checksum(model), logits(model)
    targets = ["blocks.*", "blocks.1.attn.q"]  # the second is a strided view in BLOOM, NeoX, Falcon
    for (method, extra), target in [(case, t) for case in CASES for t in targets]:
        params = {"target": target, "method": method, "score": "wanda", "run": str(run), **WANDA, **extra}
        undo = apply(model, **params)
        assert undo.touches() and not torch.equal(logits(model), clean), (method, extra, target)
        undo.restore()
        assert undo.verify() and weights_checksum(model) == checksum, (method, extra, target)
    assert torch.equal(logits(model), clean)


@pytest.mark.parametrize("family", ["bloom", "gpt_neox", "falcon"])
def test_fused_views_prune_only_their_rows_and_touch_only_their_block(family):
    model = tiny_model(family)
    (qkv,) = [p for n, p in model.named_parameters() if "query_key_value.weight" in n and ".1." in n]
    before = qkv.detach().clone()
    undo = apply(model, target="blocks.1.attn.k", sparsity=0.5, scope="row")
    changed = (as_bits(qkv) != as_bits(before)).any(dim=1)  # (fused rows,)
    view = select(model, "blocks.1.attn.k").tensors[0].resolve(model)  # (groups, head_dim, in)
    assert int(changed.sum()) == view.shape[0] * view.shape[1] and ((view == 0).sum(-1) == view.shape[-1] // 2).all()
    assert all(t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for t in undo.touches())
    undo.restore()
    assert undo.verify() and torch.equal(as_bits(qkv), as_bits(before))


def test_biases_and_norms_are_never_pruned():
    model = tiny_model("opt")
    vectors = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}
    apply(model, target="blocks.*", sparsity=0.9)
    assert all(torch.equal(model.get_parameter(n), v) for n, v in vectors.items())


# ---------------------------------------------------------------- the shipped model

@pytest.fixture(scope="module")
def replica():
    from sensray.replica import Replica
    from sensray.spec import parse_spec

    spec = parse_spec("""
        name: prune-test
        perturbation: prune
        data: {corpus: bundled, seq_len: 128, num_sequences: 2, batch_size: 2}
        space: {target: "blocks.*", sparsity: 0.5}
    """)
    return Replica(spec)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_shipped_model_ppl_rises_with_sparsity_and_is_untouched_at_zero(replica, method):
    from sensray.space import Trial

    rows = [replica.run_trial(Trial(f"t{s}", "prune", {"target": "blocks.*", "method": method, "sparsity": s,
                                                        "calib_sequences": 8}, 0))
            for s in (0.0, 0.3, 0.5, 0.7, 0.9)]
    assert all(r["error"] is None for r in rows)
    assert rows[0]["ppl"] == replica.baseline.ppl and rows[0]["kl"] == 0 and rows[0]["top1_agreement"] == 1
    ppls = [r["ppl"] for r in rows]
    assert all(a < b for a, b in zip(ppls, ppls[1:])), ppls
    assert replica.checksum() == replica.baseline.checksum_at_load


def test_prune_sweep_and_its_figure_end_to_end(tmp_path):
    from sensray.analyze.__main__ import main as analyze
    from sensray.sweep import main as sweep

    code = sweep(["experiments/prune.yaml", "--executor", "local", "--set", f"output_dir={tmp_path}",
                  "--set", "space.sparsity={grid_search: [0.0, 0.6]}", "--set", "space.scope=row",
                  "--set", "data.num_sequences=2", "--set", "space.calib_sequences=4"])
    assert code == 0
    (run,) = (tmp_path / "prune").iterdir()
    trials = pl.read_parquet(run / "trials.parquet")
    assert len(trials) == 4 and trials["error"].is_null().all()
    at_zero = trials.filter(pl.col("sparsity") == 0.0)
    assert (at_zero["delta_ppl"] == 1.0).all() and (trials.filter(pl.col("sparsity") == 0.6)["delta_ppl"] > 1).all()
    assert analyze([str(run)]) == 0
    assert (run / "analysis" / "prune-sparsity.png").is_file()
    assert "prune-sparsity.png" in (run / "analysis" / "report.md").read_text()


# ---------------------------------------------------------------- the figure

def test_the_sparsity_figure_draws_curves_n_m_points_and_non_finite_trials(tmp_path):
    from sensray.analyze import curves, figures

    rows = [{"trial_id": f"{m}{s}{p}", "kind": "prune", "target": "blocks.*", "method": m, "pattern": p,
             "sparsity": s if p == "unstructured" else None, "ppl": 40 * (1 + s) ** (3 if m == "magnitude" else 2),
             "nonfinite": False, "seconds": 0.1, "error": None}
            for m in ("magnitude", "wanda") for s in (0.0, 0.5, 0.8) for p in ("unstructured", "2:4")
            if p == "unstructured" or s == 0.5]
    rows.append({**rows[-1], "trial_id": "broken", "sparsity": 0.99, "ppl": math.inf, "nonfinite": True})
    t = pl.DataFrame(rows).with_columns((pl.col("ppl") / 40).alias("delta_ppl"))
    plot = curves.prune_curves(t, 40.0, context="synthetic")
    fig = plot.fig
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {"magnitude (tensor)", "wanda (row)"} <= set(labels) and any("baseline" in x for x in labels)
    texts = [a.get_text() for a in fig.axes[0].texts]
    assert texts.count("2:4") == 2 and "Crosses on the top edge" in plot.caption and "Diamonds" in plot.caption
    figures.save(fig, tmp_path / "f")
    assert curves.prune_curves(t.filter(pl.col("sparsity") == 0.5), 40.0) is None  # one sparsity: no curve


def test_a_failure_halfway_through_puts_back_what_was_already_pruned(monkeypatch):
    from sensray.perturbations import prune

    model = tiny_model("llama")
    checksum, calls = weights_checksum(model), []
    real = prune.prune_mask

    def fails_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(prune, "prune_mask", fails_on_the_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply(model, target="blocks.*", sparsity=0.5)
    assert len(calls) == 3 and weights_checksum(model) == checksum
