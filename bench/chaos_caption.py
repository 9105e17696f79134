"""Randomized chaos trials for the caption job: cluster shapes and event schedules drawn from a seed.

    .venv/bin/python bench/chaos_caption.py --trials 50            # seeds 0..49, alone (~1 min a trial on 2 CPUs)
    .venv/bin/python bench/chaos_caption.py --seeds 17 23          # replay trials by seed
    .venv/bin/python bench/chaos_caption.py --trials 3 --json out.json   # what tests/test_chaos_caption.py runs

Each trial is one real simulated cluster (``ray.cluster_utils.Cluster``: a head with 0 or 1 CPUs and
1-4 worker nodes of 1-4 CPUs each, real raylet processes) and one caption job on it, with a pool
shape (``min_actors``/``max_actors``, ``cpus_per_actor``, ``decode_cpus``, ``rows_per_unit``, batch
size) and an event schedule drawn from ``random.Random(seed)``:

* ``lose``   a worker node removed without notice (its processes SIGKILLed: a spot loss);
* ``drain``  Ray's drain API with reason PREEMPTION and a deadline (what ``alip spot-watch`` sends),
             then the node is removed at the deadline;
* ``join``   a new worker node;
* ``kill``   a caption actor process SIGKILLed (an OOM kill);
* ``poison`` images that crash the captioner's or the decoder's process (drawn up front: the
             job's test hooks ``ALIP_CAPTION_CRASH_ON_KEYS`` / ``ALIP_DECODE_CRASH_ON_KEYS``).

Events fire after a drawn number of committed units, so they land while the job runs. A schedule
that leaves no node able to hold the pool is allowed: the job must then fail with its clear
``CaptionJobStalled`` error within ``--stall-timeout-s`` (unless a node joins in time), and a
rerun on a repaired cluster must finish the output. Every trial asserts:

* the job ends within a bound printed before it starts: (start-up + rows / a slow rate + the
  event delays + stall timeouts) x ``SAFETY`` -- a hang fails the trial with the job's last lines;
* output keys == input keys, exactly once (rejects included), after the rerun if there was one;
* every reject carries its reason: corrupt images their decode error, poison images "given up";
* no actor or task of the job is left running: every live node's CPUs are all free again.

A failing trial prints its seed and shape: ``--seeds N`` replays it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the caption tests' world writer and exactly-once check

#: the bound's safety factor over the estimate (2 cores shared by every simulated node)
SAFETY = 3.0
#: start-up of a job (actors import torch and load the captioner), seconds, on this class of machine
START_S = 40.0
#: a slow captioning rate (images/s) of the builtin captioner with 1 thread, greedy, 6 tokens
SLOW_RATE = 8.0
#: what one event may cost (a node's death noticed by the GCS ~15 s, a replacement actor's start-up)
EVENT_S = 30.0
#: a decode-poison unit is probed row by row (a task each; a crash restarts the worker process)
PROBE_S = 1.0
#: the job's clear refusals to run on the cluster it found (it says why and exits non-zero)
CLEAR_REFUSALS = ("cannot run on", "no node of the Ray cluster can run work yet")


@dataclass
class Event:
    kind: str  # lose | drain | join | kill
    after_units: int  # fires once this many units are committed
    cpus: int = 0  # join: the new node's CPUs
    deadline_s: float = 0.0  # drain: the notice's deadline


@dataclass
class Trial:
    seed: int
    head_cpus: int
    workers: list[int]  # CPUs per worker node
    min_actors: int
    max_actors: int
    cpus_per_actor: float
    decode_cpus: float
    rows_per_unit: int
    batch_size: int
    rows: int
    shards: int
    corrupt: int
    caption_poison: int  # images that crash the caption actor
    decode_poison: int  # images that crash the decode task
    events: list[Event] = field(default_factory=list)

    @property
    def units(self) -> int:
        per_shard = -(-self.rows // self.shards)
        return self.shards * -(-per_shard // self.rows_per_unit)

    def describe(self) -> str:
        ev = ", ".join(f"{e.kind}@{e.after_units}" + (f"({e.cpus} CPU)" if e.kind == "join" else "")
                       + (f"({e.deadline_s:.0f} s)" if e.kind == "drain" else "") for e in self.events)
        return (f"seed {self.seed}: head {self.head_cpus} CPU, workers {self.workers} CPU; actors "
                f"{self.min_actors}-{self.max_actors} x {self.cpus_per_actor:g} CPU, decode {self.decode_cpus:g} CPU; "
                f"{self.rows} rows in {self.shards} shard(s), {self.units} unit(s) of <= {self.rows_per_unit}, batch "
                f"{self.batch_size}; {self.corrupt} corrupt, {self.caption_poison}+{self.decode_poison} poison; "
                f"events: {ev or 'none'}")


def draw_trial(seed: int) -> Trial:
    """The shape and schedule of trial ``seed`` (the same seed always draws the same trial)."""
    rng = random.Random(seed)
    workers = [rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
    min_actors = rng.randint(1, 2)
    t = Trial(seed=seed, head_cpus=rng.choice([0, 1]), workers=workers, min_actors=min_actors,
              max_actors=rng.randint(min_actors, 3), cpus_per_actor=rng.choice([0.5, 1.0, 1.0, 1.5, 2.0]),
              decode_cpus=rng.choice([0.25, 0.5, 0.5, 1.0]), rows_per_unit=rng.choice([20, 40, 60]),
              batch_size=rng.choice([4, 8, 16]), rows=rng.randint(8, 20) * 10, shards=rng.randint(1, 3),
              corrupt=rng.randint(0, 3), caption_poison=int(rng.random() < 0.2), decode_poison=int(rng.random() < 0.2))
    n_events = rng.randint(0, 3)
    for _ in range(n_events):
        kind = rng.choice(["lose", "drain", "join", "kill", "lose", "drain"])
        t.events.append(Event(kind, after_units=rng.randint(0, max(0, t.units - 2)), cpus=rng.randint(1, 4),
                              deadline_s=rng.uniform(3, 12)))
    t.events.sort(key=lambda e: e.after_units)
    return t


def bound_s(t: Trial, stall_timeout_s: float) -> float:
    """The time the job may take, stated before it starts (module docstring)."""
    losses = sum(e.kind in ("lose", "drain") for e in t.events)
    events = sum(EVENT_S + (e.deadline_s if e.kind == "drain" else 0.0) for e in t.events)
    # A caption-poison batch crashes its actor, then the poison row twice alone (--max-unit-attempts
    # 2): three actor restarts; a decode-poison unit is probed row by row.
    poison = t.caption_poison * 3 * EVENT_S + t.decode_poison * (EVENT_S + t.rows_per_unit * PROBE_S)
    return SAFETY * (START_S + t.rows / SLOW_RATE + events + poison + losses * stall_timeout_s)


# ------------------------------------------------------------------------------------------- a trial

class JobProcess:
    """The caption job as its own driver process (``python ray_jobs/caption.py``, as a user runs it):
    a hung job can be killed without taking the harness (and its Ray connection) down."""

    def __init__(self, args: list[str], env: dict, log_path: str):
        import subprocess

        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ray_jobs", "caption.py"), *args],
                                     env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            return None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()

    def lines(self, n: int = 15) -> list[str]:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            keep = [ln.rstrip() for ln in f if ln.startswith(("[caption]", "  ", "alip caption", "caption job"))]
        return keep[-n:]


def committed(out: str) -> int:
    return sum(1 for f in os.listdir(out) if f.endswith(".parquet")) if os.path.isdir(out) else 0


def actor_pids(log_dir: str) -> dict[int, str]:
    out = {}
    for name in os.listdir(log_dir) if os.path.isdir(log_dir) else []:
        if name.endswith(".node"):
            with open(os.path.join(log_dir, name)) as f:
                out[int(name[:-5])] = f.read().strip()
    return out


def all_cpus_free(timeout: float = 30.0) -> tuple[bool, str]:
    """Every live node's CPUs free again (no actor or task of the job left), within ``timeout``."""
    import ray
    from ray._private.state import available_resources_per_node

    deadline = time.time() + timeout
    busy = ""
    while time.time() < deadline:
        totals = {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]}
        avail = available_resources_per_node()
        busy = ", ".join(f"{k[:8]}: {avail.get(k, {}).get('CPU', 0.0):g}/{v:g}" for k, v in totals.items()
                         if abs(avail.get(k, {}).get("CPU", 0.0) - v) > 1e-6)
        if not busy:
            return True, ""
        time.sleep(0.5)
    return False, f"CPUs still held after the job: {busy}"


class Chaos:
    """Fires a trial's events as units commit."""

    def __init__(self, cluster, trial: Trial, out: str, log_dir: str, say):
        self.cluster, self.trial, self.out, self.log_dir, self.say = cluster, trial, out, log_dir, say
        self.pending = list(trial.events)
        self.fired: list[str] = []
        self.removals: list[threading.Thread] = []

    def workers(self):
        return [n for n in self.cluster.worker_nodes if n.any_processes_alive()]

    def tick(self) -> None:
        import ray
        from ray.core.generated import autoscaler_pb2

        done = committed(self.out)
        while self.pending and self.pending[0].after_units <= done:
            e = self.pending.pop(0)
            live = self.workers()
            if e.kind == "join":
                self.cluster.add_node(num_cpus=e.cpus, object_store_memory=80 * 2**20)
                self.fired.append(f"join {e.cpus} CPU")
            elif e.kind == "lose" and live:
                node = random.Random(self.trial.seed + len(self.fired)).choice(live)
                self.cluster.remove_node(node, allow_graceful=False)
                self.fired.append(f"lose {node.node_id[:8]}")
            elif e.kind == "drain" and live:
                node = random.Random(self.trial.seed + len(self.fired)).choice(live)
                gcs = ray._raylet.GcsClient(address=self.cluster.gcs_address)
                accepted, _why = gcs.drain_node(node.node_id,
                                                autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                                "chaos: spot interruption notice",
                                                int((time.time() + e.deadline_s) * 1000))
                self.fired.append(f"drain {node.node_id[:8]} ({e.deadline_s:.0f} s, accepted={accepted})")
                th = threading.Thread(target=self._remove_at, args=(node, e.deadline_s), daemon=True)
                th.start()
                self.removals.append(th)
            elif e.kind == "kill":
                pids = [p for p in actor_pids(self.log_dir) if _alive(p)]
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    self.fired.append(f"kill actor pid {pids[-1]}")
                else:
                    self.fired.append("kill (no live actor)")
            else:
                self.fired.append(f"{e.kind} (no live worker)")
            self.say(f"    event at {done} unit(s): {self.fired[-1]}")

    def _remove_at(self, node, after_s: float) -> None:
        time.sleep(after_s)
        if node in self.cluster.worker_nodes:
            self.cluster.remove_node(node, allow_graceful=False)

    def finish(self) -> None:
        for th in self.removals:
            th.join(60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def run_trial(trial: Trial, work: str, stall_timeout_s: float = 20.0, say=print) -> dict:
    """Run one trial; returns its record (``ok`` False with ``why`` on a failed assertion)."""
    import ray
    from ray.cluster_utils import Cluster

    from alip.ray_setup import RAYLET_ENV
    from test_caption_job_support import assert_exactly_once, read_output, write_world

    os.environ.update(RAYLET_ENV)
    inp, out, log_dir = f"{work}/in", f"{work}/out", f"{work}/calls"
    keys, bad = write_world(inp, trial.rows, shards=trial.shards, n_corrupt=trial.corrupt, seed=trial.seed)
    rng = random.Random(trial.seed * 7919)
    clean = [k for k in keys if k not in bad]
    poison_caption = rng.sample(clean, trial.caption_poison)
    poison_decode = rng.sample([k for k in clean if k not in poison_caption], trial.decode_poison)
    env = {"ALIP_CAPTION_CALL_LOG": log_dir, "ALIP_CAPTION_CRASH_ON_KEYS": ",".join(poison_caption),
           "ALIP_DECODE_CRASH_ON_KEYS": ",".join(poison_decode)}
    limit = bound_s(trial, stall_timeout_s)
    say(f"  {trial.describe()}\n    bound {limit:.0f} s")
    record = {"seed": trial.seed, "shape": trial.describe(), "bound_s": round(limit, 1), "ok": False}
    # No dashboard: the job needs none (the GCS answers what it asks), and on a 2-core box its
    # process is CPU a trial does not have to spare.
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=trial.head_cpus, include_dashboard=False,
                                                                object_store_memory=120 * 2**20))
    try:
        for cpus in trial.workers:
            cluster.add_node(num_cpus=cpus, object_store_memory=80 * 2**20)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        args = ["--input", inp, "--output", out, "--captioner", "builtin", "--min-actors", str(trial.min_actors),
                "--max-actors", str(trial.max_actors), "--cpus-per-actor", str(trial.cpus_per_actor),
                "--decode-cpus", str(trial.decode_cpus), "--rows-per-unit", str(trial.rows_per_unit),
                "--batch-size", str(trial.batch_size), "--num-beams", "1", "--max-new-tokens", "6",
                "--max-unit-attempts", "2", "--stall-timeout-s", str(stall_timeout_s), "--ray-address",
                cluster.address]
        chaos = Chaos(cluster, trial, out, log_dir, say)
        t0 = time.time()
        job = JobProcess(args, env, f"{work}/job.log")
        while job.running() and time.time() - t0 < limit:
            chaos.tick()
            time.sleep(0.2)
        elapsed = time.time() - t0
        record.update(elapsed_s=round(elapsed, 1), events=chaos.fired)
        if job.running():
            job.kill()
            record["why"] = f"HANG: still running after {limit:.0f} s; last lines:\n" + "\n".join(job.lines(40))
            return record
        chaos.finish()
        rc = job.proc.returncode
        text = "\n".join(job.lines(200))
        if rc in (1, 2) and any(r in text for r in CLEAR_REFUSALS):  # it said why it cannot run: repair, rerun
            said = next(ln for ln in text.splitlines() if any(r in ln for r in CLEAR_REFUSALS))
            record["stalled"] = said[:300]
            say(f"    stalled (clear error): {said[:200]}")
            cluster.add_node(num_cpus=4, object_store_memory=80 * 2**20)
            cluster.wait_for_nodes()
            rerun = JobProcess(args, env, f"{work}/rerun.log")
            rc = rerun.wait(limit)
            if rc is None:
                rerun.kill()
                record["why"] = "HANG on the rerun after a repair:\n" + "\n".join(rerun.lines(40))
                return record
            text = "\n".join(rerun.lines(200))
        if rc != 0:
            record["why"] = f"the job failed (exit {rc}):\n" + "\n".join(text.splitlines()[-15:])
            return record
        ok, why = all_cpus_free()
        if not ok:
            record["why"] = why
            return record
        poison = poison_caption + poison_decode
        _data, rejects = assert_exactly_once(out, keys, bad + poison)
        reasons = dict(zip(rejects.column("key").to_pylist(), rejects.column("reason").to_pylist()))
        for k in poison:
            if "time(s) on this image" not in reasons[k]:
                record["why"] = f"poison image {k} rejected without its reason: {reasons[k]!r}"
                return record
        data, _ = read_output(out)
        record.update(ok=True, rows_out=data.num_rows, rejects=len(reasons))
        return record
    except AssertionError as exc:
        record["why"] = f"assertion: {exc}"
        return record
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=50, help="run seeds first-seed .. first-seed + trials - 1")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="*", help="replay exactly these seeds")
    p.add_argument("--stall-timeout-s", type=float, default=20.0, help="the job's --stall-timeout-s in every trial")
    p.add_argument("--json", help="write every trial's record here")
    p.add_argument("--ray-log", default=None,
                   help="where Ray's own stderr goes (raylet death notices of every removed node); default: a "
                        "file in the temp dir, named at the start")
    a = p.parse_args(argv)
    ray_log = a.ray_log or os.path.join(tempfile.gettempdir(), f"chaos_caption-{os.getpid()}.stderr")
    print(f"Ray's console output (node death notices, worker logs) -> {ray_log}", flush=True)
    # Ray prints node deaths (with 20 lines of raylet log each) to the driver's stdout and stderr:
    # both go to the log file; this bench's own lines go to the original stdout.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    fd = os.open(ray_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)
    seeds = a.seeds if a.seeds else list(range(a.first_seed, a.first_seed + a.trials))
    records = []
    t_all = time.time()
    for seed in seeds:
        trial = draw_trial(seed)
        say(f"trial {len(records) + 1}/{len(seeds)}")
        with tempfile.TemporaryDirectory(prefix=f"chaos-caption-{seed}-") as work:
            rec = run_trial(trial, work, a.stall_timeout_s, say=say)
            if not rec["ok"]:  # keep the job's own console: what it said happened, for the replay
                kept = os.path.join(tempfile.gettempdir(), f"chaos-caption-failed-{seed}-{os.getpid()}")
                shutil.copytree(work, kept, ignore=shutil.ignore_patterns("in", "out"), dirs_exist_ok=True)
                rec["kept"] = kept
                say(f"    the job's logs are kept in {kept}")
        records.append(rec)
        say(f"    {'ok' if rec['ok'] else 'FAILED'} in {rec.get('elapsed_s', 0):.0f} s"
              + (f" (stalled with a clear error, then resumed: {rec['stalled'][:160]})" if rec.get("stalled") else "")
              + ("" if rec["ok"] else f": {rec['why']}\n    replay: bench/chaos_caption.py --seeds {seed}"))
    failed = [r for r in records if not r["ok"]]
    stalled = [r for r in records if r.get("stalled")]
    say(f"\n{len(records)} trial(s) in {time.time() - t_all:.0f} s: {len(records) - len(failed)} passed, "
          f"{len(failed)} failed ({', '.join(str(r['seed']) for r in failed) or 'none'}); "
          f"{len(stalled)} ended with a clear 'cannot run' error and finished on the rerun; "
          f"{sum(len(r.get('events', [])) for r in records)} event(s) fired")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"records": records, "trials": [asdict(draw_trial(s)) for s in seeds]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
