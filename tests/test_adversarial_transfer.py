"""Transfer of found inputs to damaged weights (sweep trials, exported models), and the Ray replica pool."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from adversarial_support import build, spec_of, spec_text
from sensray.adversarial.damage import parse_selection, select_rows
from sensray.errors import SpecError

DATA = {"seq_len": 32, "num_sequences": 2, "batch_size": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("adv-transfer"))


@pytest.fixture(scope="module")
def attacked(tiny, tmp_path_factory):
    """A finished attack on the tiny model, measuring damage on the same windows as the sweep below."""
    from sensray.adversarial.run import run_attack

    model, corpus = tiny
    spec = spec_of(spec_text(model, corpus, tmp_path_factory.mktemp("attack"), {"steps": 2},
                             data={"corpus": str(corpus), **DATA}))
    return run_attack(spec, executor="local", log=lambda line: None)


@pytest.fixture(scope="module")
def sweep_run(tiny, tmp_path_factory):
    """A finished noise sweep of the tiny model: 2 blocks x 2 sigmas."""
    from sensray.sweep import main

    model, corpus = tiny
    out = tmp_path_factory.mktemp("sweep")
    spec = out / "noise.yaml"
    spec.write_text(yaml.safe_dump({"name": "noise-small", "model": {"name": str(model)},
                                    "data": {"corpus": str(corpus), **DATA}, "perturbation": "noise",
                                    "space": {"target": {"each": "blocks.*"}, "sigma": {"grid_search": [0.3, 3.0]}},
                                    "output_dir": str(out)}))
    assert main([str(spec), "--executor", "local"]) == 0
    return next((out / "noise-small").iterdir())


def test_transfer_rows_join_to_their_weight_trials(attacked, sweep_run, capsys):
    from sensray.adversarial.damage import transfer
    from sensray.cli import main

    assert main(["adversarial", "--resume", str(attacked), "--transfer", str(sweep_run), "--trials", "top:2",
                 "--dry-run"]) == 0
    assert "transfer: 3 weight conditions" in capsys.readouterr().out
    table = pl.read_parquet(transfer(attacked, [str(sweep_run)], "top:2", executor="local", log=lambda line: None))
    trials = pl.read_parquet(sweep_run / "trials.parquet")
    damaged = table.filter(pl.col("source_kind") == "trial")
    joined = damaged.join(trials, on="trial_id", suffix="_sweep")
    assert joined.height == damaged.height == 2 * 4  # 2 trials x 4 attacks, every row joined
    top2 = trials.sort("delta_ppl", descending=True)["trial_id"][:2].to_list()
    assert sorted(damaged["trial_id"].unique()) == sorted(top2)
    # Re-applied exactly: the damage measured now is the sweep's, on the same windows.
    for r in joined.iter_rows(named=True):
        assert r["delta_ppl"] == pytest.approx(r["delta_ppl_sweep"], rel=1e-9) and r["kind"] == "noise"
        assert json.loads(r["params"])["sigma"] == r["sigma"]
    # The undamaged model measures what the attack itself measured.
    attacks = pl.read_parquet(attacked / "attacks.parquet")
    base = table.filter(pl.col("condition") == "baseline").join(attacks, on="attack", suffix="_attack")
    assert base.height == 4 and (base["nll"] == base["nll_attack"]).all() and (base["delta_ppl"] == 1.0).all()
    assert (base["success"] == base["success_attack"]).all()
    assert (attacked / "transfer.png").is_file() and (attacked / "transfer-summary.parquet").is_file()


def test_an_exported_model_transfers_and_a_rerun_skips_what_is_recorded(attacked, tiny, tmp_path):
    from sensray.adversarial.damage import transfer
    from sensray.prune import main as prune

    export = tmp_path / "tiny-mag50"
    assert prune(["--model", str(tiny[0]), "--method", "magnitude", "--sparsity", "0.5", "--output-dir",
                  str(export)]) == 0
    transfer(attacked, [str(export)], executor="local", log=lambda line: None)
    recorded = (attacked / "transfer.jsonl").read_text().splitlines()
    table = pl.read_parquet(transfer(attacked, [str(export)], executor="local", log=lambda line: None))
    assert (attacked / "transfer.jsonl").read_text().splitlines() == recorded  # nothing measured twice
    rows = table.filter(pl.col("source_kind") == "model")
    assert rows.height == 4 and rows["trial_id"].is_null().all() and (rows["delta_ppl"] != 1.0).all()


def test_transfer_refuses_a_run_of_another_model(attacked, sweep_run, tmp_path):
    from sensray.adversarial.damage import transfer

    other = tmp_path / "other-run"
    other.mkdir()
    spec = yaml.safe_load((sweep_run / "spec.yaml").read_text())
    spec["model"]["name"] = "sensray-tiny"
    (other / "spec.yaml").write_text(yaml.safe_dump(spec))
    (other / "trials.parquet").write_bytes((sweep_run / "trials.parquet").read_bytes())
    with pytest.raises(SpecError, match="ran on sensray-tiny"):
        transfer(attacked, [str(other)], executor="local", log=lambda line: None)
    with pytest.raises(SpecError, match="neither a sweep run directory"):
        transfer(attacked, [str(tmp_path)], executor="local", log=lambda line: None)


ROWS = [{"trial_id": f"{i:02d}ab", "delta_ppl": d, "error": None} for i, d in enumerate([1.5, 9.0, 1.1, 3.0])]


@pytest.mark.parametrize("text, picked", [
    ("top:2", ["01ab", "03ab"]), ("spread:3", ["02ab", "03ab", "01ab"]), ("all", ["00ab", "01ab", "02ab", "03ab"]),
    ("02,00", ["02ab", "00ab"]),
])
def test_trial_selections(text, picked):
    rows = ROWS + [{"trial_id": "04ab", "delta_ppl": float("inf"), "error": None},
                   {"trial_id": "05ab", "delta_ppl": None, "error": "RuntimeError: boom"}]
    assert [r["trial_id"] for r in select_rows(rows, parse_selection(text), "run")] == picked


@pytest.mark.parametrize("text", ["top:0", "top:", "spread:x", "best:3", ","])
def test_bad_trial_selections_say_what_is_expected(text):
    with pytest.raises(SpecError, match="expected"):
        parse_selection(text)


@pytest.mark.slow
def test_the_ray_pool_finds_exactly_what_the_local_pool_finds(tiny, tmp_path, local_ray):
    """Candidates split over two replica actors of the sweep's pool: the same losses, the same inputs."""
    from sensray.adversarial.attack import search, start_attacks
    from sensray.adversarial.plan import make_attack_plan
    from sensray.adversarial.pool import open_pool
    from sensray.models import load_tokenizer

    spec = spec_of(spec_text(*tiny, tmp_path, {"steps": 2, "candidates": 40}, resources={"cpus": 1, "replicas": 2}))
    tokenizer = load_tokenizer(spec.model)
    cases = make_attack_plan(spec, tokenizer=tokenizer).cases
    rows = {}
    for executor in ("local", "ray"):
        with open_pool(spec, executor, replicas=1 if executor == "local" else None) as pool:
            assert pool.replicas == (2 if executor == "ray" else 1)
            rows[executor] = []
            search(pool, start_attacks(cases, spec, tokenizer), spec, tokenizer, rows[executor].append,
                   log=lambda line: None)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(rows["ray"]) == strip(rows["local"])
