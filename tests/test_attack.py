"""The attack on a tiny model, in this process: committed state, known answers, resume, utility, generate."""

from __future__ import annotations

import json
import textwrap

import polars as pl
import pytest

from sensray.attack.cli import main
from sensray.attack.replica import AttackReplica
from sensray.attack.spec import parse_attack_spec
from sensray.errors import RestoreError
from sensray.executors.local import LocalExecutor
from sensray.space import Trial, trial_id


def attack_text(tiny, out, **sections) -> str:
    model_dir, corpus = tiny
    parts = {"attack": "{target: final_norm, bit: 22, per_tensor: 64, evaluate: 64}",
             "stop": "{max_flips: 2}", "random": "{seeds: 0}"} | sections
    return textwrap.dedent(f"""\
        name: tiny-attack
        model: {{name: "{model_dir}"}}
        data: {{corpus: "{corpus}", seq_len: 32, num_sequences: 4, batch_size: 4}}
        output_dir: "{out}"
        """) + "".join(f"{key}: {value}\n" for key, value in parts.items())


def run(capsys, tmp_path, text: str, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "attack.yaml"
    path.write_text(text, encoding="utf-8")
    code = main([str(path), "--executor", "local", *extra])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines()[-1] if captured.out.strip() else "", captured.err


def flip_trial(target: str, index: int, bit: int, coords: list[int]) -> Trial:
    params = {"target": target, "bit": bit, "coords": [coords]}
    return Trial(trial_id("bitflip", params), "bitflip", params, 0)


@pytest.fixture
def replica(tiny, tmp_path):
    spec = parse_attack_spec(attack_text(tiny, tmp_path)).trials()
    return AttackReplica(spec)


# -- committed state ------------------------------------------------------------------------------------


def test_trials_restore_to_the_committed_state_and_the_prefix_follows_it(replica):
    clean = replica.checksum()
    row = replica.run_trial(flip_trial("blocks.0.mlp.down.weight", 0, 22, [3, 5]))
    replica.commit(row["changes"])
    committed = replica.checksum()
    assert committed != clean and len(replica.committed) == 1
    later = flip_trial("blocks.1.mlp.up.weight", 0, 21, [2, 7])  # after the committed block: prefix reuse applies
    with_prefix = replica.run_trial(later)
    assert replica.checksum() == committed  # the trial restored to the committed state, not the loaded one
    replica.prefix = None
    without = replica.run_trial(later)
    assert with_prefix["nll"] == without["nll"] and with_prefix["kl"] == without["kl"]


def test_a_change_recorded_on_other_weights_is_refused_and_nothing_is_applied(replica):
    clean = replica.checksum()
    good = replica.run_trial(flip_trial("blocks.0.mlp.down.weight", 0, 22, [3, 5]))["changes"][0]
    stale = dict(good, tensor="blocks.1.mlp.down.weight")  # the same bits claimed for another tensor
    with pytest.raises(RestoreError, match="not the weights the change was recorded on"):
        replica.commit([good, stale])
    assert replica.checksum() == clean and replica.committed == []


def test_the_local_executor_answers_only_the_replicas_questions(tiny, tmp_path):
    from sensray.attack.replica import AttackFactory
    from sensray.errors import SensrayError

    spec = parse_attack_spec(attack_text(tiny, tmp_path)).trials()
    executor = LocalExecutor(spec, replica_factory=AttackFactory())
    executor.start()
    request = {"target": "final_norm", "field": None, "bit": 22, "per_tensor": 3, "evaluate": 2, "exclude": []}
    assert len(executor.ask("candidates", request)) == 2
    with pytest.raises(SensrayError, match="does not answer"):
        executor.ask("commit", [])


# -- known answers --------------------------------------------------------------------------------------


def exhaustive_best(replica: AttackReplica, candidates: list[dict]) -> tuple[str, int, int]:
    rows = [replica.run_trial(flip_trial(c["tensor"], c["index"], c["bit"], c["coords"])) for c in candidates]
    best = max(rows, key=lambda r: r["nll"])
    return best["changes"][0]["tensor"], best["changes"][0]["index"], best["changes"][0]["bit"]


def test_each_step_commits_the_exactly_best_flip_among_the_gradients_candidates(tiny, tmp_path, capsys, replica):
    code, out, err = run(capsys, tmp_path, attack_text(tiny, tmp_path))
    assert code == 0, err
    flips = pl.read_parquet(f"{out}/flips.parquet").sort("step").to_dicts()
    assert len(flips) == 2
    request = {"target": "final_norm", "field": None, "bit": 22, "per_tensor": 64, "evaluate": 64, "exclude": []}
    for flip in flips:  # brute force: every candidate the gradient allows, measured, on the same committed state
        candidates = replica.candidates(request)
        assert (flip["tensor"], flip["index"], flip["bit"]) == exhaustive_best(replica, candidates)
        replica.commit(flip["changes"])
        request["exclude"].append([flip["tensor"], flip["index"], flip["bit"]])
    summary = json.loads((tmp_path / out / "attack.json").read_text())
    assert summary["checksum_committed"] == replica.checksum() != summary["checksum_at_load"]
    assert summary["stop_reason"] == "the budget of 2 flips is spent"


def test_unrestricted_one_flip_breaks_a_float_model(tiny, tmp_path, capsys):
    text = attack_text(tiny, tmp_path, attack="{target: '**', per_tensor: 1, evaluate: 4}",
                       stop="{max_flips: 5, ppl_ratio: 100}", random="{seeds: 2}")
    code, out, err = run(capsys, tmp_path, text)
    assert code == 0, err
    summary = json.loads((tmp_path / out / "attack.json").read_text())
    assert summary["flips"] == 1 and summary["flips_to"] == {"x10": 1, "x100": 1}
    assert summary["final"]["nonfinite"] and "target reached" in summary["stop_reason"]
    random = pl.read_parquet(f"{out}/random.parquet")
    assert sorted(random["count"].unique().to_list()) == [1, 2, 5] and len(random) == 6
    assert (tmp_path / out / "damage.png").is_file() and "Bit-flip attack" in (tmp_path / out / "report.md").read_text()


def test_the_utility_bound_is_kept_and_a_bound_nothing_can_keep_stops_the_search(tiny, tmp_path, capsys):
    _, corpus = tiny
    same = f"{{data: {{corpus: '{corpus}', seq_len: 32, num_sequences: 4, batch_size: 4}}, max_increase: 1.0e-9}}"
    code, out, err = run(capsys, tmp_path, attack_text(tiny, tmp_path, utility=same))  # utility text = attack text
    assert code == 0, err
    summary = json.loads((tmp_path / out / "attack.json").read_text())
    assert summary["flips"] == 0 and "within the utility bound" in summary["stop_reason"]

    other = f"{{data: {{corpus: '{corpus}', seq_len: 16, num_sequences: 2}}, max_increase: 0.001}}"
    code, out, err = run(capsys, tmp_path, attack_text(tiny, tmp_path, utility=other))
    assert code == 0, err
    flips = pl.read_parquet(f"{out}/flips.parquet").sort("step")
    candidates = pl.read_parquet(f"{out}/candidates.parquet")
    for flip in flips.iter_rows(named=True):
        assert flip["utility_ratio"] <= 1.001
        step = candidates.filter(pl.col("step") == flip["step"])
        feasible = step.filter(pl.col("utility_ratio") <= 1.001)
        assert flip["nll"] == feasible["nll"].max()  # the most damaging candidate that keeps the bound


# -- resume ---------------------------------------------------------------------------------------------


def test_an_interrupted_attack_resumes_into_the_same_sequence(tiny, tmp_path, capsys, monkeypatch):
    text = attack_text(tiny, tmp_path, stop="{max_flips: 3}")
    code, whole, err = run(capsys, tmp_path, text)
    assert code == 0, err
    expected = pl.read_parquet(f"{whole}/flips.parquet").select("tensor", "index", "bit", "nll").to_dicts()

    calls = {"commit": 0, "rows": 0}
    real_commit, real_run = LocalExecutor.commit, LocalExecutor.run

    def commit_then_die(self, changes):  # killed after the 2nd flip is journaled, before replicas commit it
        calls["commit"] += 1
        if calls["commit"] == 2:
            raise KeyboardInterrupt
        return real_commit(self, changes)

    monkeypatch.setattr(LocalExecutor, "commit", commit_then_die)
    code, _, err = run(capsys, tmp_path, text)
    assert code == 130 and "--resume" in err
    (partial,) = [p for p in (tmp_path / "tiny-attack").iterdir() if not (p / "attack.json").exists()]
    assert len((partial / "flips.jsonl").read_text().splitlines()) == 2

    def run_then_die(self, trials, on_row):  # killed again mid-step, after 5 candidates of step 2
        def counted(row):
            on_row(row)
            calls["rows"] += 1
            if calls["rows"] == 5:
                raise KeyboardInterrupt
        return real_run(self, trials, counted)

    monkeypatch.setattr(LocalExecutor, "commit", real_commit)
    monkeypatch.setattr(LocalExecutor, "run", run_then_die)
    assert main(["--resume", str(partial), "--executor", "local"]) == 130
    monkeypatch.setattr(LocalExecutor, "run", real_run)
    ran = []
    monkeypatch.setattr(LocalExecutor, "run", lambda self, trials, on_row: (ran.extend(trials),
                                                                          real_run(self, trials, on_row))[1])
    assert main(["--resume", str(partial), "--executor", "local"]) == 0
    got = pl.read_parquet(partial / "flips.parquet").select("tensor", "index", "bit", "nll").to_dicts()
    assert got == expected
    step2 = pl.read_parquet(partial / "candidates.parquet").filter(pl.col("step") == 2)
    assert len(step2) == step2["trial_id"].n_unique() == len(ran) + 5  # the 5 journaled ones were not rerun
    capsys.readouterr()
    assert main(["--resume", str(partial), "--executor", "local"]) == 0  # finished: says so, runs nothing
    assert "is finished" in capsys.readouterr().err


def test_resume_refuses_a_changed_spec(tiny, tmp_path, capsys, monkeypatch):
    text = attack_text(tiny, tmp_path, stop="{max_flips: 1}")
    code, out, _ = run(capsys, tmp_path, text)
    (tmp_path / out / "attack.json").unlink()
    assert main(["--resume", out, "--executor", "local", "--set", "stop.max_flips=5"]) == 2
    assert "only resources" in capsys.readouterr().err


# -- generate -------------------------------------------------------------------------------------------


def test_generate_applies_the_committed_flips_and_reverts_them(tiny, tmp_path, capsys):
    from sensray.generate import main as generate

    code, out, err = run(capsys, tmp_path, attack_text(tiny, tmp_path))
    assert code == 0, err
    assert generate(["--attack", out, "--max-new-tokens", "5"]) == 0
    said = capsys.readouterr().out
    assert "2 committed flips" in said and "final_norm.weight" in said and "verified bit-exact" in said
    assert generate(["--attack", out, "--model", "x"]) == 2
    assert generate(["--attack", str(tmp_path)]) == 2 and "not an attack's directory" in capsys.readouterr().err
