"""Chaos benchmark: tiny ALIP pretraining on a simulated 3-worker-node cluster while nodes are
removed (no notice) or drained with a deadline (a spot preemption notice) and added back later.

    .venv/bin/python bench/bench_chaos.py                    # ~10 min of chaos + a clean run (2-core box: ~25 min)
    .venv/bin/python bench/bench_chaos.py --minutes 3 --event-every 50 --return-after 25 --deadline 15   # quick look

The cluster is real Ray processes on this machine (`ray.cluster_utils.Cluster`): a head with no
CPUs and 3 worker nodes, each with one "trainer" slot, so each hosts exactly one train worker.
Two runs of `ray_jobs/pretrain.py` on it, same steps and global batch:
  clean : `--num-workers 3`, no events: its steady step time is the "clean step time";
  chaos : `--num-workers 2-3`; every `--event-every` s one worker node is removed without notice or
          (alternating) drained with reason PREEMPTION and a `--deadline` s deadline, then removed
          at the deadline; `--return-after` s later a fresh node joins (the elastic group grows).
Printed: goodput = (steps kept x clean step time) / wall time for both runs and their ratio (goal
>= 95%), and per event: its kind, steps lost (trained then redone after the restart), and restart
seconds (from the last step before the restart to the first step after it); where the time went.
The chaos run's length is set by --minutes (its step count is estimated from the clean run).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP = re.compile(r"\[pretrain\] step (\d+)/(\d+)")
RESUMED = re.compile(r"resumed from checkpoint at step (\d+)/\d+ .*with (\d+) worker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(out: Path, n: int) -> str:
    import pyarrow as pa

    from alip.data.dataset import write_shard
    from alip.data.world import describe, world_table

    table = world_table(n, noise=0.5, seed=0)
    table = table.append_column("caption", pa.array([describe(r, include_pattern=False) for r in table.to_pylist()]))
    per = -(-n // 8)
    for s in range(8):
        write_shard(table.slice(s * per, per), f"{out}/part-{s:05d}.parquet", validate=False)
    return str(out)


class Job:
    """ray_jobs/pretrain.py attached to the cluster; every output line is kept with its time."""

    def __init__(self, cluster_address: str, args: list[str], log: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": cluster_address,
               "ALIP_TRAIN_WORKER_RESOURCES": json.dumps({"trainer": 1}),
               "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
               # After a node dies Ray Train may still count it and try the old size first; it falls
               # back to the workers left once a group start times out (Ray's default: 60 s).
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")}
        self.lines: list[tuple[float, str]] = []
        self.log = log.open("w")
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "ray_jobs" / "pretrain.py"), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True, cwd=REPO)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))
            self.log.write(line)
            self.log.flush()

    def steps(self) -> list[tuple[float, int]]:
        return [(t, int(m.group(1))) for t, line in list(self.lines) if (m := STEP.search(line))]

    def last_step(self) -> int:
        s = self.steps()
        return s[-1][1] if s else 0

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._reader.join(timeout=10)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def clean_step_time(job: Job) -> float:
    """Median seconds per step once the run is going (its first 20% left out: start-up)."""
    steps = job.steps()
    deltas = sorted(b[0] - a[0] for a, b in zip(steps, steps[1:]) if b[1] == a[1] + 1)
    deltas = deltas[len(deltas) // 5:] or deltas
    return deltas[len(deltas) // 2]


def analyse_restarts(job: Job) -> list[dict]:
    """Each restart: the step it resumed from, steps lost (trained before it, redone after),
    seconds from the last step before it to the first step after it, and the new worker count."""
    out, last_step, last_t = [], 0, job.t0
    pending = None
    for t, line in job.lines:
        if (m := RESUMED.search(line)):
            pending = {"resumed_from": int(m.group(1)), "steps_lost": max(0, last_step - int(m.group(1))),
                       "workers": int(m.group(2)), "t_before": last_t}
        elif (m := STEP.search(line)):
            if pending is not None:
                pending["restart_s"] = round(t - pending.pop("t_before"), 1)
                out.append(pending)
                pending = None
            last_step, last_t = int(m.group(1)), t
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the chaos run")
    p.add_argument("--event-every", type=float, default=120.0, help="seconds between node events")
    p.add_argument("--return-after", type=float, default=60.0, help="seconds until a replacement node joins")
    p.add_argument("--deadline", type=float, default=30.0, help="drain deadline of a preemption notice (s)")
    p.add_argument("--clean-steps", type=int, default=60, help="steps of the clean run")
    p.add_argument("--global-batch-size", type=int, default=24)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--rows", type=int, default=2400)
    a = p.parse_args(argv)

    from ray._raylet import GcsClient
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    work = Path(tempfile.mkdtemp(prefix="alip-chaos-"))
    data = write_data(work / "data", a.rows)
    common = ["--config", "tiny", "--data", data, "--storage-path", str(work / "runs"), "--model", "alip-micro",
              "--global-batch-size", str(a.global_batch_size), "--log-every", "1", "--eval-samples", "0",
              "--no-export", "--cpus-per-worker", "0.5", "--data-cpus", "0.25", "--shuffle-buffer-mb", "0",
              "--checkpoint-every", str(a.checkpoint_every), "--preemption-check-every", "1",
              "--elastic-resize-interval-s", "10"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": free_port(),
                                                            "include_dashboard": False})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1, resources={"trainer": 1})
        cluster.wait_for_nodes()

        print(f"[chaos] clean run: 3 workers, {a.clean_steps} steps", flush=True)
        clean = Job(cluster.address, [*common, "--run-name", "clean", "--num-workers", "3",
                                      "--max-steps", str(a.clean_steps)], work / "clean.log")
        assert clean.wait(timeout=3600) == 0, f"clean run failed: see {work / 'clean.log'}"
        clean_wall = time.time() - clean.t0
        step_s = clean_step_time(clean)
        clean_goodput = a.clean_steps * step_s / clean_wall
        chaos_steps = max(a.clean_steps, int(a.minutes * 60 / step_s * clean_goodput))
        print(f"[chaos] clean: {clean_wall:.0f}s wall, {step_s:.2f}s/step, goodput {100 * clean_goodput:.1f}%; "
              f"chaos run: {chaos_steps} steps (~{a.minutes:g} min)", flush=True)

        chaos = Job(cluster.address, [*common, "--run-name", "chaos", "--num-workers", "2-3",
                                      "--max-steps", str(chaos_steps)], work / "chaos.log")
        events, returns, gcs = [], [], GcsClient(address=cluster.address)
        next_event, kind = time.time() + a.event_every, "remove"
        while chaos.proc.poll() is None:
            now = time.time()
            for r in [r for r in returns if r <= now]:
                cluster.add_node(num_cpus=1, resources={"trainer": 1})
                returns.remove(r)
                print(f"[chaos] t={now - chaos.t0:.0f}s a replacement node joined", flush=True)
            if now >= next_event and chaos.last_step() > 0 and len(cluster.worker_nodes) == 3:
                victim = next(iter(cluster.worker_nodes))
                at_step = chaos.last_step()
                if kind == "drain":
                    ok, why = gcs.drain_node(victim.node_id,
                                             autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                             "bench_chaos spot notice", int((now + a.deadline) * 1000))
                    print(f"[chaos] t={now - chaos.t0:.0f}s step {at_step}: preemption notice, deadline "
                          f"{a.deadline:g}s (accepted={ok}{'' if ok else ': ' + why})", flush=True)
                    time.sleep(a.deadline)
                cluster.remove_node(victim, allow_graceful=False)
                print(f"[chaos] t={time.time() - chaos.t0:.0f}s step {chaos.last_step()}: node removed "
                      f"({'after the notice' if kind == 'drain' else 'no notice'})", flush=True)
                events.append({"kind": "preemption notice" if kind == "drain" else "node lost", "at_step": at_step})
                returns.append(time.time() + a.return_after)
                kind = "drain" if kind == "remove" else "remove"
                next_event = time.time() + a.event_every
            time.sleep(0.5)
        rc = chaos.wait(timeout=60)
        assert rc == 0, f"chaos run failed: see {work / 'chaos.log'}"
        chaos_wall = time.time() - chaos.t0
    finally:
        cluster.shutdown()

    restarts = analyse_restarts(chaos)
    chaos_goodput = chaos_steps * step_s / chaos_wall
    print("\n| run | steps | wall s | goodput |\n|---|---|---|---|")
    print(f"| clean (3 workers) | {a.clean_steps} | {clean_wall:.0f} | {100 * clean_goodput:.1f}% |")
    print(f"| chaos (2-3 workers) | {chaos_steps} | {chaos_wall:.0f} | {100 * chaos_goodput:.1f}% |")
    print(f"\nchaos / clean goodput: {100 * chaos_goodput / clean_goodput:.1f}% (goal >= 95%)")
    print(f"clean step time {step_s:.2f}s (3 workers, global batch {a.global_batch_size})")
    print("\nevents:", ", ".join(f"{e['kind']} at step {e['at_step']}" for e in events) or "none")
    print("| restart | resumed from step | steps lost | restart s | workers after |\n|---|---|---|---|---|")
    for i, r in enumerate(restarts, 1):
        print(f"| {i} | {r['resumed_from']} | {r['steps_lost']} | {r.get('restart_s', float('nan'))} | {r['workers']} |")
    lost = sum(r["steps_lost"] for r in restarts)
    restart_s = sum(r.get("restart_s", 0) for r in restarts)
    print(f"\nwhere the chaos run's {chaos_wall:.0f}s went: {chaos_steps * step_s:.0f}s of kept steps at the "
          f"clean rate, {restart_s:.0f}s in {len(restarts)} restarts (group stop, placement, model "
          f"and data pipeline start), {lost * step_s:.0f}s redoing {lost} lost steps, the rest in "
          f"start-up and steps slower than the clean rate (fewer workers after a shrink)")
    print(f"logs: {work}/clean.log, {work}/chaos.log")
    return {"clean_goodput": clean_goodput, "chaos_goodput": chaos_goodput, "restarts": restarts, "events": events}


if __name__ == "__main__":
    main()
