"""Committed state on the Ray replica pool: a commit reaches every replica, a replaced replica replays the
list, trials restore to the committed state there exactly as locally, and the attack runs on the pool."""

from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest

from sensray.attack.replica import AttackFactory
from sensray.attack.spec import parse_attack_spec
from sensray.executors.local import LocalExecutor
from sensray.executors.ray import RayExecutor
from sensray.space import Trial, trial_id

pytestmark = pytest.mark.slow


def spec_of(tiny, out):
    model_dir, corpus = tiny
    return parse_attack_spec(textwrap.dedent(f"""\
        name: ray-attack
        model: {{name: "{model_dir}"}}
        data: {{corpus: "{corpus}", seq_len: 32, num_sequences: 4, batch_size: 4}}
        attack: {{target: "blocks.*", field: mantissa, per_tensor: 1, evaluate: 4}}
        stop: {{max_flips: 2}}
        random: {{seeds: 1, counts: [1, 2]}}
        resources: {{cpus: 1, replicas: 2}}
        output_dir: "{out}"
        """))


def trial(target: str, bit: int, coords: list[int]) -> Trial:
    params = {"target": target, "bit": bit, "coords": [coords]}
    return Trial(trial_id("bitflip", params), "bitflip", params, 0)


PROBES = [trial("blocks.1.mlp.up.weight", 21, [2, 7]), trial("blocks.0.attn.q.weight", 20, [1, 1]),
          trial("lm_head.weight", 22, [5, 9]), trial("blocks.1.norm2.weight", 22, [3])]


def test_a_replaced_replica_replays_the_committed_flips(tiny, local_ray, tmp_path):
    spec = spec_of(tiny, tmp_path).trials()
    local = LocalExecutor(spec, replica_factory=AttackFactory())
    local.start()
    change = local.replica.run_trial(trial("blocks.0.mlp.down.weight", 22, [3, 5]))["changes"]
    local.commit(change)
    expected = {row["trial_id"]: row for row in [local.replica.run_trial(t) for t in PROBES]}

    executor = RayExecutor(spec, replicas=2, replica_factory=AttackFactory(), log=lambda line: None)
    try:
        executor.start()
        while executor.replicas < 2:
            executor._step()
        executor.commit(change)
        victim = executor.slots[0]
        os.kill(victim.pid, signal.SIGKILL)  # it dies holding the committed flip; its replacement must replay it
        rows = []
        executor.run(PROBES * 3, rows.append)
        while executor.replicas < 2:
            executor._step()
        checksums, launched = executor.checksums(), executor.launched
    finally:
        executor.close()
    assert launched == 3 and len(checksums) == 2  # the replacement loaded, replayed, and is checksummed too
    assert len(set(checksums)) == 1 and checksums[0] == local.replica.checksum()  # everyone holds the flip
    for row in rows:  # every trial, on any replica (old or replacement), measured the committed state
        want = expected[row["trial_id"]]
        assert (row["nll"], row["kl"], row["top1_agreement"]) == (want["nll"], want["kl"], want["top1_agreement"])


def test_the_attack_runs_on_the_pool_like_locally(tiny, local_ray, tmp_path, capsys):
    from sensray.attack.cli import main

    path = tmp_path / "attack.yaml"
    spec = spec_of(tiny, tmp_path)
    path.write_text(json.dumps(spec.resolved()), encoding="utf-8")  # JSON is YAML
    runs = {}
    for executor in ("local", "ray"):
        assert main([str(path), "--executor", executor, "--set", f"output_dir={tmp_path / executor}"]) == 0
        out = capsys.readouterr().out.strip().splitlines()[-1]
        runs[executor] = json.loads((tmp_path / executor / out.split(str(tmp_path / executor))[1].lstrip("/")
                                     / "attack.json").read_text())
    assert runs["local"]["replicas"] == 1 and runs["ray"]["replicas"] in (1, 2)  # the 2nd may still be loading
    for key in ("flips", "checksum_committed", "final"):
        assert runs["ray"][key] == runs["local"][key]


def test_a_quantized_attack_commits_packed_codes_on_the_pool_like_locally(local_ray, tmp_path, capsys):
    """nf4 with double quantization: the flips (4-bit codes in packed bytes, 8-bit scale codes) reach every
    replica, and the pool ends where this process does, bit for bit."""
    pytest.importorskip("bitsandbytes")
    from sensray.attack.cli import main

    path = tmp_path / "attack.yaml"
    path.write_text(textwrap.dedent("""\
        name: nf4-pool
        model: {name: sensray-tiny, quantization: nf4, double_quant: true}
        data: {corpus: bundled, seq_len: 32, num_sequences: 4, batch_size: 4}
        attack: {target: "blocks.0-1.*.*", field: magnitude, per_tensor: 1, evaluate: 4}
        stop: {max_flips: 2}
        random: {seeds: 0}
        resources: {cpus: 1, replicas: 2}
        """), encoding="utf-8")
    runs = {}
    for executor in ("local", "ray"):
        assert main([str(path), "--executor", executor, "--set", f"output_dir={tmp_path / executor}"]) == 0
        (run,) = (tmp_path / executor / "nf4-pool").iterdir()
        runs[executor] = json.loads((run / "attack.json").read_text())
    capsys.readouterr()
    assert runs["local"]["flips"] == 2 and runs["ray"]["checksum_committed"] != runs["ray"]["checksum_at_load"]
    for key in ("flips", "checksum_committed", "final"):
        assert runs["ray"][key] == runs["local"][key]
