"""The Ray pool's safety checks (sensray/executors/ray.py, actor.py): replicas that loaded different
weights, replicas that die in a loop, an actor that cannot be constructed, the wait for resources, and
the sharded (gpus >= 2) load path.

Integration tests on the shared local Ray (conftest's `local_ray`), except the last, which needs none.
"""

from __future__ import annotations

import re

import pytest
import torch
from ray_support import different_weights, faulty_replica, plan_of, run_executor, spec_text, unconstructible_actor

from sensray.errors import SensrayError


def test_a_replica_that_loaded_different_weights_stops_the_sweep(tiny, local_ray, tmp_path):
    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=3))  # 12 trials

    def hold_until_both_loaded(executor, rows):
        # Only the first replica has loaded when trials start; wait here for the other, so that the sweep
        # cannot finish before the driver hears from it, however slow this machine is.
        loading = [ref for ref, (_, trial) in executor.refs.items() if trial is None]
        local_ray.wait(loading, num_returns=len(loading), timeout=60)

    with pytest.raises(SensrayError) as err:
        run_executor(plan, hold_until_both_loaded, replicas=2, replica_factory=different_weights(1))
    message = str(err.value)
    assert re.match(r"replica ray-[01]@127\.0\.0\.1 loaded different weights \(checksum [0-9a-f]{32}\) than the "
                    r"first replica \([0-9a-f]{32}\): are the nodes' model caches the same\?", message), message
    first, other = re.findall(r"[0-9a-f]{32}", message)
    assert first != other


def test_replicas_that_keep_dying_without_finishing_a_trial_stop_the_sweep(tiny, local_ray, tmp_path):
    from sensray.executors.ray import RayExecutor

    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=1))
    logs, rows = [], []
    executor = RayExecutor(plan.spec, replicas=1, replica_factory=faulty_replica(dies_loading=True), log=logs.append)
    with pytest.raises(SensrayError, match=r"^4 replicas died in a row without finishing a trial; last: \w+Error: "):
        try:
            executor.start()
            executor.run(plan.trials, rows.append)
        finally:
            executor.close()
    assert not rows and executor.launched == 4 and len(logs) == 4  # four starts, then no fifth
    assert all(re.match(r"replica ray-\d \(loading\) died \(\w+Error: .*\); 0 trial\(s\) requeued", line)
               for line in logs), logs


def test_an_actor_that_cannot_be_constructed_stops_the_sweep_with_its_error(tiny, local_ray, tmp_path, monkeypatch):
    import sensray.executors.ray as pool

    monkeypatch.setattr(pool, "ReplicaActor", unconstructible_actor("no usable accelerator (simulated)"))
    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=1))
    with pytest.raises(SensrayError, match=r"^a replica failed to start: ") as err:
        run_executor(plan, replicas=1)
    message = str(err.value)
    assert "\x1b[" not in message and "\n" not in message  # one plain line, as every CLI error
    assert "RuntimeError: no usable accelerator (simulated)" in message  # what went wrong, not only where


def test_the_driver_says_what_it_waits_for_while_no_replica_fits(tiny, local_ray, tmp_path):
    """One replica needs both CPUs of this Ray; a placement group holds one of them until the driver
    has said, once a wait times out, what each replica needs and what is free."""
    from ray.util.placement_group import placement_group, remove_placement_group

    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=1).replace("cpus: 1, replicas: 2", "cpus: 2, replicas: 1"))
    holder = placement_group([{"CPU": 1}])
    local_ray.get(holder.ready(), timeout=60)
    from sensray.executors.ray import RayExecutor

    logs, rows = [], []

    def log(line: str) -> None:
        logs.append(line)
        if line.startswith("waiting for replicas") and len(logs) == 1:
            remove_placement_group(holder)  # the CPU comes free: the replica can start

    executor = RayExecutor(plan.spec, replicas=1, report_every=0.2, log=log)
    try:
        executor.start()
        executor.run(plan.trials, rows.append)
    finally:
        executor.close()
    assert logs[0] == "waiting for replicas: 1 starting, each needs 2 CPU and 0 GPU; free now: {'CPU': 1.0}", logs
    assert len(rows) == len(plan.trials) == 4 and all(row["error"] is None for row in rows)


# -- resources.gpus >= 2: one model spread over the actor's GPUs ----------------------------------------


def test_the_sharded_load_path_builds_a_replica_that_answers_like_an_unsharded_one(monkeypatch):
    """No GPU here: from_pretrained gets device_map="auto" as on a multi-GPU node, and the model is then
    dispatched as accelerate dispatches a multi-device map (an AlignDevicesHook and an instance-level
    forward on every module of the map), all on the CPU. Trials must read exactly as on a plain replica,
    restore every bit, and leave accelerate's forwards in place."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    from sensray.executors.actor import build_replica
    from sensray.replica import METRICS, Replica
    from sensray.space import Trial, trial_id
    from sensray.spec import validate

    loads, real = [], AutoModelForCausalLM.from_pretrained

    def from_pretrained(source, **kwargs):
        loads.append(kwargs)
        model = real(source, **kwargs)
        names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
        device_map = dict.fromkeys(names + [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)], "cpu")
        return dispatch_model(model, device_map=device_map, force_hooks=True)

    raw = {"name": "sharded", "perturbation": "noise", "space": {"target": "blocks.0", "sigma": 0.1},
           "data": {"seq_len": 32, "num_sequences": 4, "batch_size": 2}, "resources": {"gpus": 2}}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    sharded = build_replica(validate(raw), "ray-0@127.0.0.1")
    monkeypatch.undo()
    [kwargs] = loads
    assert kwargs["device_map"] == "auto" and kwargs["weights_only"] is True and kwargs["dtype"] == torch.float32
    blocks = sharded.model.model.layers
    assert all(hasattr(block, "_hf_hook") and "forward" in vars(block) for block in blocks)
    hooked = [vars(block)["forward"] for block in blocks]

    plain = Replica(validate(raw | {"resources": {"gpus": 0}}))
    assert sharded.baseline == plain.baseline
    for params in ({"target": "blocks.3", "sigma": 0.5, "seed": 0}, {"target": "blocks.6.mlp.*", "sigma": 0.5, "seed": 1},
                   {"target": "embed", "sigma": 0.2, "seed": 2}):
        trial = Trial(trial_id("noise", params), "noise", params, 0)
        got, want = sharded.run_trial(trial), plain.run_trial(trial)
        assert got["kl"] > 0 and {m: got[m] for m in METRICS} == {m: want[m] for m in METRICS}, params
    assert sharded.checksum() == sharded.baseline.checksum_at_load
    assert [vars(block)["forward"] for block in blocks] == hooked  # prefix reuse put accelerate's forwards back
