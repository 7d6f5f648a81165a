"""A node lost mid-sweep: several Ray nodes on this machine (ray.cluster_utils.Cluster, all on
127.0.0.1), one removed while its replica runs a trial; the sweep finishes on the rest, a
replacement joins when a node comes back, and every trial is recorded exactly once."""

from __future__ import annotations


import pytest
from ray_support import (is_loopback, listening_sockets, plan_of, ray_descendants, slow_replica,
                         spec_text)

MB = 2**20


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the shared local Ray (conftest's local_ray): the executor must join the Cluster
        ray.shutdown()
    # The head holds no CPU, so replicas run on the two workers only: losing one leaves one.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 * MB, "node_ip_address": "127.0.0.1"})
    try:
        workers = [cluster.add_node(num_cpus=1, object_store_memory=100 * MB, node_ip_address="127.0.0.1")
                   for _ in range(2)]
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow  # three Ray nodes on one machine
def test_a_removed_node_leaves_the_sweep_to_the_rest(cluster, tiny, tmp_path):
    import ray

    from sensray.executors.ray import RayExecutor

    cluster, workers = cluster
    plan = plan_of(spec_text(*tiny, tmp_path, num_samples=25))  # 100 trials
    executor = RayExecutor(plan.spec, address=cluster.address, replica_factory=slow_replica(0.05),
                           log=(logs := []).append)
    rows, lost = [], {}

    def hold_until_loaded() -> None:
        # Hold the driver (in on_row) until every replica that is loading has loaded, however slow
        # this machine is, so that the sweep cannot run out of trials first. Only watches: the
        # driver itself takes the load results in once on_row returns.
        loading = [ref for ref, (_, trial) in executor.refs.items() if trial is None]
        if loading:
            ray.wait(loading, num_returns=len(loading), timeout=60)

    def on_row(row):
        rows.append(row)
        if not lost and executor.replicas < 2:
            hold_until_loaded()
        elif not lost and len(rows) >= 4:
            victim = next(s for s in executor.slots if s.ready and s.inflight)
            done, running = ray.wait(list(victim.inflight), num_returns=len(victim.inflight), timeout=0)
            lost.update(replica=victim.replica_id, at=len(rows), alive=executor.replicas,
                        trials={executor.refs[r][1].trial_id for r in running},  # lost with the node
                        finished={executor.refs[r][1].trial_id for r in done})  # returned already: kept
            cluster.remove_node(next(n for n in workers if n.node_id == victim.node_id))
        elif lost and "rows_alone" not in lost and len(rows) >= lost["at"] + 8:
            # The survivor carried the sweep alone for 8 trials; now a node comes back.
            lost["rows_alone"] = [r["replica"] for r in rows[lost["at"]:] if r["trial_id"] not in lost["finished"]]
            cluster.add_node(num_cpus=1, object_store_memory=100 * MB, node_ip_address="127.0.0.1")
            hold_until_loaded()  # the replacement, launched when the node was lost, now fits

    try:
        executor.start()
        executor.run(plan.trials, on_row)
        checksums = executor.checksums()
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        outside = [s for s in listening_sockets(ray_descendants()) if not is_loopback(s[2])]
        assert not outside, f"a node listens beyond loopback: {outside}"
    finally:
        executor.close()

    ids = [row["trial_id"] for row in rows]
    assert len(ids) == len(set(ids)) == len(plan.trials)  # every trial, each once
    assert all(row["error"] is None for row in rows)
    assert lost["alive"] == 2 and any("died" in line for line in logs)
    assert lost["replica"] not in lost["rows_alone"]  # the rest went on without the lost node
    rerun = [row for row in rows if row["trial_id"] in lost["trials"]]
    assert rerun and all(row["replica"] != lost["replica"] for row in rerun)
    assert executor.launched == 3  # the replacement, scheduled once the new node joined...
    assert any(row["replica"].startswith("ray-2@") for row in rows)  # ...ran trials
    assert set(checksums) == {executor.baseline["checksum_at_load"]}
