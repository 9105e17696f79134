"""The pretraining job on a simulated multi-node cluster (real Ray processes, one machine):
a head with no CPUs and 3 worker nodes, each with one "trainer" slot so it hosts exactly one train
worker. `ray_jobs/pretrain.py --num-workers 2-3` runs as a real subprocess attached to the cluster.

- node loss: a node is removed without notice (`remove_node`, not graceful) -> the group restarts
  with 2 workers from the last checkpoint, same global batch; the node is added back -> the group
  grows to 3 again; every step 1..N is in the metrics JSONL exactly once.
- preemption notice: a node is drained through Ray's drain API with reason PREEMPTION and a
  deadline, then removed after it -> a just-in-time checkpoint exists from before the removal and
  the resumed run trains the step after it next (the run is stopped a few steps later: the
  node-loss run shows a resized run training to its end).
"""
import json
import time

import pytest

from pretrain_helpers import (
    free_port, kill_session, metric_steps, registered_checkpoints, small_args, start_job,
    wait_for_registered_checkpoint, wait_for_step, wait_for_text,
)
from world_fixtures import write_reference_captioned_world

pytestmark = pytest.mark.slow

ENV = {
    "ALIP_TRAIN_WORKER_RESOURCES": json.dumps({"trainer": 1}),  # one train worker per node
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",  # Ray Train's drain watcher (default 5 s)
    # Right after a node dies Ray Train may still count it and try the old size first; it falls back
    # to the workers left when the group cannot start within this time (default 60 s).
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
}


def add_worker_node(cluster):
    return cluster.add_node(num_cpus=1, resources={"trainer": 1})


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from alip.ray_setup import RAYLET_ENV

    # The raylets inherit this process's environment: set what cluster.yaml's `ray start` lines set
    # (without it, read tasks restart a worker process per item and the runs crawl).
    env = pytest.MonkeyPatch()
    for name, value in RAYLET_ENV.items():
        env.setenv(name, value)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": free_port(),
                                                      "include_dashboard": False})
    try:
        for _ in range(3):
            add_worker_node(c)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        env.undo()


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    return write_reference_captioned_world(tmp_path_factory.mktemp("captioned"), n=480, shards=4)


def elastic_args(data, storage, run, steps, *extra):
    return small_args(data, storage, run, "--num-workers", "2-3", "--max-steps", str(steps),
                      "--elastic-resize-interval-s", "3", "--min-node-uptime-s", "5", "--preemption-check-every", "1",
                      "--eval-samples", "0", "--no-export", *extra)


def resumes(text: str) -> list[tuple[int, int]]:
    """(step, workers) of every '[pretrain] resumed from checkpoint at step k/N ... with W worker(s)'."""
    out = []
    for line in text.splitlines():
        if "resumed from checkpoint at step" in line:
            step = int(line.split("at step ")[1].split("/")[0])
            workers = int(line.rsplit("with ", 1)[1].split(" worker")[0])
            out.append((step, workers))
    return out


def test_node_loss_shrinks_then_a_returning_node_is_used_again(cluster, captioned, tmp_path):
    steps = 40
    log = tmp_path / "job.log"
    proc = start_job(elastic_args(captioned, tmp_path, "elastic", steps, "--checkpoint-every", "4"),
                     log, ENV, ray_address=cluster.address)
    metrics = tmp_path / "elastic" / "metrics.jsonl"
    try:
        wait_for_text(log, "starting with 3 worker(s)", proc)
        registered = wait_for_registered_checkpoint(tmp_path / "elastic", proc)
        lost_at = wait_for_step(metrics, registered + 2, proc)
        victim = next(n for n in cluster.worker_nodes)
        cluster.remove_node(victim, allow_graceful=False)  # the node is gone, no notice
        wait_for_text(log, "resumed from checkpoint", proc)
        add_worker_node(cluster)  # a replacement node joins: the group grows back
        wait_for_text(log, "resumed from checkpoint", proc, count=2)
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    events = resumes(text)
    assert [w for _, w in events][:2] == [2, 3], events  # shrink, then grow
    assert events[0][0] % 4 == 0 and registered <= events[0][0] <= lost_at
    # The grow waited for a checkpoint written for it (alip.pretrain.elastic's join rule): the
    # larger group resumed from it or a later one, so a grow redoes only the handshake's seconds.
    grow_at = [int(x.split(" for the group to grow")[0].rsplit(" ", 1)[1])
               for x in text.split("[pretrain] checkpoint at step")[1:]]
    assert grow_at and events[1][0] >= grow_at[-1], (events, grow_at)
    # Same global batch after every resize: the schedule and every step's samples are unchanged.
    assert metric_steps(metrics) == list(range(1, steps + 1))
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert all(r["samples_per_s"] > 0 for r in records)
    summary = json.loads((tmp_path / "elastic" / "summary.json").read_text())
    assert summary["final_step"] == steps
    # Checkpoints stay small: no metric history inside (the JSONL offset is in position.json).
    # Only the registered ones: a rank killed with its node mid-upload leaves a partial directory
    # Ray Train never registered, never resumes from (seen under load: 1 MiB of a 19 MB trainer.pt).
    snapshot = json.loads((tmp_path / "elastic" / "checkpoint_manager_snapshot.json").read_text())
    registered_dirs = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    ckpts = sorted(p for p in (tmp_path / "elastic").glob("checkpoint_*") if p.is_dir() and p.name in registered_dirs)
    assert ckpts and all(sorted(p.name for p in c.iterdir()) == ["position.json", "trainer.pt"] for c in ckpts)
    sizes = {c.name: (c / "trainer.pt").stat().st_size for c in ckpts}
    assert max(sizes.values()) - min(sizes.values()) < 1024, sizes


def test_preemption_notice_writes_a_just_in_time_checkpoint(cluster, captioned, tmp_path):
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    # Enough steps that the run is still training when the deadline passes and the node goes
    # (alone on this 2-core machine it trains about 5 steps/s; 80 steps finished before the deadline).
    steps = 300
    log = tmp_path / "job.log"
    # Periodic checkpoints far apart: only the checkpoints written for the notice can keep progress.
    proc = start_job(elastic_args(captioned, tmp_path, "preempt", steps, "--checkpoint-every", "1000",
                                  "--max-failures", "2"),
                     log, ENV, ray_address=cluster.address)
    metrics = tmp_path / "preempt" / "metrics.jsonl"
    try:
        wait_for_text(log, "starting with 3 worker(s)", proc)
        noticed_at = wait_for_step(metrics, 3, proc)
        victim = next(iter(cluster.worker_nodes))
        deadline_s = 15
        accepted, why = GcsClient(address=cluster.address).drain_node(
            victim.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "spot reclaim (test)", int((time.time() + deadline_s) * 1000))
        assert accepted, why
        t_drain = time.time()
        text = wait_for_text(log, "just-in-time checkpoint at step", proc, timeout=deadline_s + 60)
        jit_step = int(text.split("just-in-time checkpoint at step ")[1].split()[0])
        assert jit_step >= noticed_at
        # The checkpoint is registered before the node goes.
        while not any(m.get("reason") == "preemption" for m in registered_checkpoints(tmp_path / "preempt")):
            assert time.time() < t_drain + deadline_s, "just-in-time checkpoint not registered before the deadline"
            time.sleep(0.2)
        time.sleep(max(0.0, t_drain + deadline_s - time.time()) + 1)
        cluster.remove_node(victim, allow_graceful=False)  # the spot node is reclaimed
        # The smaller group resumes and trains on; a few steps show it. The rest of the 300 would
        # only repeat what the node-loss test shows (a resized run trains to its end): it is cut.
        text = wait_for_text(log, "resumed from checkpoint at step", proc)
        wait_for_text(log, "[FailurePolicy] RETRY", proc)
        resumed_step = resumes(text)[0][0]
        wait_for_step(metrics, resumed_step + 3, proc)
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    jit = sorted(m["step"] for m in registered_checkpoints(tmp_path / "preempt") if m.get("reason") == "preemption")
    # (The just-in-time checkpoint was registered before the deadline, checked above; it may since
    # have been rotated out by keep_checkpoints.)
    assert jit and jit[-1] >= jit_step
    events = resumes(text)
    # Resumed from the latest checkpoint written for the notice (the just-in-time one, or the
    # last-moment one written just before the deadline), never from scratch.
    assert events and events[0][0] == jit[-1] and events[0][1] == 2, (events, jit)
    before_restart = text.split("resumed from checkpoint at step")[0]
    # A last-moment checkpoint the job announced must be the one resumed from: reported too close
    # to the deadline, Ray Train tears the group down before it takes it in (bench_chaos saw one lost).
    if "last checkpoint before the preemption deadline at step " in before_restart:
        last_call = int(before_restart.split("last checkpoint before the preemption deadline at step ")[1].split()[0])
        assert events[0][0] == last_call, (events, last_call)
    last_trained = max(int(x.split("/")[0]) for x in before_restart.split("[pretrain] step ")[1:])
    print(f"preemption: notice at step {jit_step}, checkpoints {jit}, trained up to {last_trained} "
          f"before the restart: {last_trained - jit[-1]} step(s) redone")
    # Ray Train's failure policy retried it as a preemption (unlimited), not as a failure.
    policy = text.split("[FailurePolicy] RETRY")[1]
    assert "Source: preemption" in policy.split("Error:")[0] and "(max allowed: inf)" in policy.split("Error:")[0]
    # Step k + 1 is the next step trained (the log is cut back to k), every step exactly once.
    trained = metric_steps(metrics)
    assert trained == list(range(1, trained[-1] + 1)) and trained[-1] >= events[0][0] + 3, trained[-12:]
