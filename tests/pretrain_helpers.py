"""Helpers for the pretraining job tests: run ray_jobs/pretrain.py as a real subprocess, follow its
metrics log and Ray Train's registered checkpoints, and clean up exactly the processes it started."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def small_args(data, storage, run, *extra):
    return ["--config", "tiny", "--data", str(data), "--storage-path", str(storage), "--run-name", run,
            "--model", "alip-micro", "--global-batch-size", "24", "--log-every", "1", "--eval-samples", "30",
            "--cpus-per-worker", "0.5", "--data-cpus", "0.25", "--shuffle-buffer-mb", "0", *extra]


def start_job(args, log_path, env_extra: dict | None = None, ray_address: str | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.Popen([sys.executable, str(REPO / "ray_jobs" / "pretrain.py"), *args],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=REPO)


def metric_steps(metrics_file: Path) -> list[int]:
    if not metrics_file.exists():
        return []
    return [json.loads(x)["step"] for x in metrics_file.read_text().splitlines() if x.strip()]


def wait_for_step(metrics_file: Path, step: int, proc, timeout=900) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = metric_steps(metrics_file)
        if steps and steps[-1] >= step:
            return steps[-1]
        assert proc.poll() is None, "job ended before reaching the step"
        time.sleep(0.3)
    raise TimeoutError(f"step {step} not reached")


def registered_checkpoints(run_dir: Path) -> list[dict]:
    """Metrics of the checkpoints Ray Train has *registered* (its manager snapshot)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return [r["metrics"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def wait_for_registered_checkpoint(run_dir: Path, proc, timeout=900, after: int = 0) -> int:
    """Step of the latest registered checkpoint, once there is one past `after`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [m["step"] for m in registered_checkpoints(run_dir)]
        if steps and max(steps) > after:
            return max(steps)
        assert proc.poll() is None, "job ended before registering a checkpoint"
        time.sleep(0.3)
    raise TimeoutError("no checkpoint registered")


def wait_for_text(log: Path, text: str, proc, timeout=900, count: int = 1) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = log.read_text()
        if content.count(text) >= count:
            return content
        assert proc.poll() is None, f"job ended before printing {text!r}:\n{content[-3000:]}"
        time.sleep(0.3)
    raise TimeoutError(f"{text!r} not printed:\n{log.read_text()[-3000:]}")


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command) of the live processes in session `sid` (the job was started with
    start_new_session; its local Ray stays in that session)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    procs = []
    for line in out.splitlines():
        pid, proc_sid, stat, args = (line.split(None, 3) + [""])[:4]
        if int(proc_sid) == sid and not stat.startswith("Z"):
            procs.append((int(pid), args))
    return procs


def train_worker_pids(sid: int) -> list[int]:
    return [pid for pid, args in session_processes(sid) if "RayTrainWorker" in args]


def kill_session(sid: int) -> None:
    for pid, _ in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
