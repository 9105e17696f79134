"""The caption pool's sizing rule (alip/captioning/pool.py): pure arithmetic on Ray's node view.

The cluster shapes below are the issue's hangs and the ones around them: a rule that lets the
actors take the CPUs their own decode tasks need fails here without a cluster."""

from __future__ import annotations

import itertools
import random

import pytest

from alip.captioning import CaptionJobConfig
from alip.captioning.pool import (
    NodeGroup,
    NodeResources,
    PoolShape,
    actors_fitting,
    groups_can_grow,
    groups_could_hold,
    pool_capacity,
    pool_target,
    why_no_capacity,
)

CPU_ACTOR = PoolShape(cpus_per_actor=1.0, gpus_per_actor=0.0, decode_cpus=0.5, finish_cpus=0.25)
GPU_ACTOR = PoolShape(cpus_per_actor=1.0, gpus_per_actor=1.0, decode_cpus=0.5, finish_cpus=0.25)


def nodes(*sizes, gpus=None, draining=()):
    gpus = gpus or [0.0] * len(sizes)
    return [NodeResources(f"n{i}", float(c), float(g), i in draining) for i, (c, g) in enumerate(zip(sizes, gpus))]


def test_the_issue_hangs_get_a_pool_that_leaves_room_for_decode():
    # One 2-CPU node left after a loss, 1-CPU actors: one actor, not two.
    assert pool_capacity(nodes(0, 2), CPU_ACTOR) == 1
    # A 2-core machine and --cpus-per-actor 2: no actor fits beside the decode tasks.
    two_cpu = PoolShape(2.0, 0.0, 0.5, 0.25)
    assert pool_capacity(nodes(2), two_cpu) == 0
    assert "--cpus-per-actor 1.25 or less" in why_no_capacity(nodes(2), two_cpu)
    # The suite's old shape (three 2-CPU workers) holds 5 actors + the reserve.
    assert pool_capacity(nodes(0, 2, 2, 2), CPU_ACTOR) == 5


def test_gpu_actors_leave_the_reserve_on_a_cpu_node_or_a_gpu_nodes_spare_cpus():
    # GPU nodes with spare CPUs: every GPU gets an actor, the reserve sits beside one of them.
    assert pool_capacity(nodes(8, 8, gpus=[1, 1]), GPU_ACTOR) == 2
    # GPU nodes whose CPUs the actors fill: without a CPU node, one GPU must stay idle...
    assert pool_capacity(nodes(1, 1, gpus=[1, 1]), GPU_ACTOR) == 1
    # ...and a CPU node takes the reserve so every GPU works.
    assert pool_capacity(nodes(1, 1, 2, gpus=[1, 1, 0]), GPU_ACTOR) == 2
    # No GPU anywhere: nothing can run, and the reason says so.
    assert pool_capacity(nodes(4, 4), GPU_ACTOR) == 0
    assert "no usable node has one" in why_no_capacity(nodes(4, 4), GPU_ACTOR)
    # Fractional GPUs: 4 actors of 0.25 GPU per GPU, bounded by CPUs.
    quarter = PoolShape(1.0, 0.25, 0.5, 0.25)
    assert pool_capacity(nodes(8, gpus=[1]), quarter) == 4
    assert pool_capacity(nodes(3, gpus=[1]), quarter) == 2  # 3 CPUs - 0.75 reserve


def test_draining_and_missing_nodes_hold_nothing():
    assert pool_capacity(nodes(0, 2, 2, draining=(1,)), CPU_ACTOR) == 1
    assert pool_capacity(nodes(0, 2, draining=(1,)), CPU_ACTOR) == 0
    assert "being drained" in why_no_capacity(nodes(2, draining=(0,)), CPU_ACTOR)
    assert pool_capacity([], CPU_ACTOR) == 0 and "no live node" in why_no_capacity([], CPU_ACTOR)
    big_decode = PoolShape(1.0, 0.0, 4.0, 0.25)
    assert "--decode-cpus" in why_no_capacity(nodes(2, 2), big_decode)


def test_target_is_bounded_by_max_units_capacity_and_the_starvation_cap():
    assert pool_target(capacity=5, max_actors=2, units_left=10) == 2
    assert pool_target(capacity=5, max_actors=8, units_left=3) == 3
    assert pool_target(capacity=1, max_actors=8, units_left=10) == 1
    assert pool_target(capacity=5, max_actors=8, units_left=10, starvation_cap=2) == 2
    assert pool_target(capacity=0, max_actors=8, units_left=10) == 0


def _fits_together(ns: list[NodeResources], shape: PoolShape, k: int) -> bool:
    """Brute force: can k actors and one reserve be placed on these nodes at once?"""
    usable = [n for n in ns if not n.draining]
    for counts in itertools.product(*[range(actors_fitting(n.cpus, n.gpus, shape) + 1) for n in usable]):
        if sum(counts) != k:
            continue
        for n, c in zip(usable, counts):
            left_cpu = n.cpus - c * shape.cpus_per_actor
            if left_cpu + 1e-6 >= shape.reserve_cpus:
                return True
    return False


@pytest.mark.parametrize("seed", range(200))
def test_capacity_is_the_most_actors_that_fit_with_the_reserve(seed):
    """Against brute force on random shapes: capacity fits, capacity + 1 does not."""
    rng = random.Random(seed)
    ns = [NodeResources(f"n{i}", float(rng.choice([0, 1, 2, 3, 4, 8])), float(rng.choice([0, 0, 1, 2])),
                        rng.random() < 0.15) for i in range(rng.randint(1, 4))]
    gpu = rng.random() < 0.4
    shape = PoolShape(cpus_per_actor=rng.choice([0.5, 1.0, 1.5, 2.0]), gpus_per_actor=rng.choice([0.5, 1.0]) if gpu else 0.0,
                      decode_cpus=rng.choice([0.25, 0.5, 1.0]), finish_cpus=0.25)
    cap = pool_capacity(ns, shape)
    assert cap == 0 or _fits_together(ns, shape, cap), (ns, shape, cap)
    assert not _fits_together(ns, shape, cap + 1), (ns, shape, cap)
    if cap == 0:
        assert why_no_capacity(ns, shape)


def test_autoscaler_groups():
    gpu_group = NodeGroup("gpu", 8.0, 1.0, max_count=10)
    cpu_group = NodeGroup("cpu", 4.0, 0.0, max_count=4)
    assert groups_can_grow([gpu_group]) and not groups_can_grow([NodeGroup("fixed", 4, 0, 2, 2)])
    assert not groups_can_grow([])
    assert groups_could_hold([gpu_group], GPU_ACTOR) and not groups_could_hold([cpu_group], GPU_ACTOR)


def test_local_sizing_rule_uses_the_machine_and_keeps_what_the_user_set():
    base = CaptionJobConfig(input="a", output="b")
    two = base.sized(2.0)
    assert (two.max_actors, two.cpus_per_actor, two.threads) == (1, 1.25, 2)
    eight = base.sized(8.0)
    assert (eight.max_actors, eight.threads) == (2, 4) and eight.max_actors * eight.cpus_per_actor <= 8 - 0.75
    # The sized pool always fits the local machine beside its decode tasks.
    for cpus in (1, 2, 3, 4, 6, 8, 16, 64):
        s = base.sized(float(cpus))
        shape = PoolShape(s.cpus_per_actor, 0.0, s.decode_cpus, 0.25)
        assert pool_capacity(nodes(cpus), shape) >= s.max_actors, (cpus, s)
    cluster = base.sized(None)
    assert (cluster.max_actors, cluster.cpus_per_actor, cluster.threads) == (1, 1.0, 1)
    mine = CaptionJobConfig(input="a", output="b", max_actors=3, cpus_per_actor=0.5, torch_threads=1).sized(8.0)
    assert (mine.max_actors, mine.cpus_per_actor, mine.threads) == (3, 0.5, 1)
    gpu = CaptionJobConfig(input="a", output="b", gpus_per_actor=1.0).sized(16.0, local_gpus=2.0)
    assert (gpu.max_actors, gpu.cpus_per_actor) == (2, 1.0)


# ----------------------------------------------------------------------------- Ray's own views

@pytest.mark.slow
def test_ray_views_of_gpu_and_cpu_nodes_and_drains_give_the_rule_its_inputs(tmp_path):
    """On a real simulated cluster (GPU nodes with and without spare CPUs, a CPU node): the view the
    scheduler reads is Ray's, drains are seen, and a GPU job on a cluster without a GPU fails with
    the reason instead of waiting silently."""
    import time

    import ray
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    from alip.captioning import run_captioning
    from alip.captioning.cluster_view import read_view
    from alip.captioning.pool_control import CaptionJobStalled
    from test_caption_job_support import write_world

    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=80 * 2**20,
                                                      include_dashboard=False))  # the view reads the GCS
    try:
        gpu_roomy = c.add_node(num_cpus=4, num_gpus=1, object_store_memory=80 * 2**20)
        gpu_tight = c.add_node(num_cpus=1, num_gpus=1, object_store_memory=80 * 2**20)
        cpu_node = c.add_node(num_cpus=2, object_store_memory=80 * 2**20)
        ray.init(address=c.address, log_to_driver=False)
        c.wait_for_nodes()
        view = read_view()
        by_id = {n.node_id: n for n in view.nodes}
        assert (by_id[gpu_roomy.node_id].cpus, by_id[gpu_roomy.node_id].gpus) == (4.0, 1.0)
        assert (by_id[gpu_tight.node_id].cpus, by_id[gpu_tight.node_id].gpus) == (1.0, 1.0)
        assert view.groups == []  # no autoscaler configured this cluster
        gpu_actor = PoolShape(1.0, 1.0, 0.5, 0.25)
        assert pool_capacity(view.nodes, gpu_actor) == 2  # both GPUs work; the reserve sits elsewhere
        assert pool_capacity(view.nodes, CPU_ACTOR) == 6  # 4 + 1 + 2 CPUs, 0.75 kept free
        gcs = ray._raylet.GcsClient(address=c.gcs_address)
        accepted, _ = gcs.drain_node(cpu_node.node_id,
                                     autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                     "test notice", int((time.time() + 60) * 1000))
        assert accepted
        # An idle node drains at once (the raylet exits); a busy one shows in the drain table until
        # its deadline. Either way it is no longer usable in the view.
        deadline = time.time() + 30
        view = read_view()
        while cpu_node.node_id in {n.node_id for n in view.nodes if not n.draining}:
            assert time.time() < deadline, view
            time.sleep(0.2)
            view = read_view()
        # Without the CPU node, the tight GPU node's only CPU is its actor's; the roomy one keeps the reserve.
        assert pool_capacity(view.nodes, gpu_actor) == 2 and pool_capacity(view.nodes, CPU_ACTOR) == 4
        for node in (gpu_roomy, gpu_tight, cpu_node):  # only the head (0 CPUs) is left
            c.remove_node(node, allow_graceful=False)
        write_world(str(tmp_path / "in"), 20, shards=1)
        cfg = CaptionJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), captioner="builtin",
                               gpus_per_actor=1.0, stall_timeout_s=3.0, progress=False)
        t0 = time.time()
        with pytest.raises(CaptionJobStalled, match="needs 1 GPU and no usable node has one"):
            run_captioning(cfg, log=None)
        assert time.time() - t0 < 60
    finally:
        ray.shutdown()
        c.shutdown()
