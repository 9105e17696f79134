"""SIGKILL the caption job's driver mid-run, rerun the same command: exactly once, and the
captioner only sees rows that were not written yet. Runs ray_jobs/caption.py as a subprocess
with its own local Ray; the killed run's Ray processes are reaped by session id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alip.data.dataset import list_shards, read_shard
from test_caption_job_support import FAST, assert_exactly_once, make_tiny_blip, read_call_log, write_world

REPO = Path(__file__).resolve().parents[1]


def _session_pids(sid: int) -> list[int]:
    """Live processes in session ``sid`` (the killed driver started it: start_new_session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after "pid (comm)": state, ppid, pgrp, session
            pids.append(int(entry))
    return pids


def _reap_session(sid: int, grace_s: float = 5.0) -> list[str]:
    """Give the killed run's Ray processes a moment to exit by themselves, then SIGKILL the rest.
    Returns the names of those that had to be killed."""
    deadline = time.time() + grace_s
    while time.time() < deadline and _session_pids(sid):
        time.sleep(0.25)
    left = []
    for pid in _session_pids(sid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                left.append(f.read().strip())
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, FileNotFoundError):
            pass
    deadline = time.time() + 10
    while time.time() < deadline and _session_pids(sid):
        time.sleep(0.1)
    return left


def _command(inp, out, spec) -> list[str]:
    cmd = [sys.executable, "ray_jobs/caption.py", "--input", str(inp), "--output", str(out),
           "--captioner", spec, "--rows-per-unit", "20", "--batch-size", "8", "--ray-address", "local",
           "--no-progress"]
    for k, v in FAST.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    return cmd


def _env(call_log) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(ALIP_CAPTION_CALL_LOG=str(call_log), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_sigkill_driver_then_rerun_resumes_exactly_once(tmp_path):
    spec = make_tiny_blip(tmp_path / "blip")
    keys, bad = write_world(str(tmp_path / "in"), 200, shards=2, n_corrupt=6)
    out = tmp_path / "out"
    cmd = _command(tmp_path / "in", out, spec)

    with open(tmp_path / "run1.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path / "log1"), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and len(list(out.glob("world-*.parquet"))) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "run 1 ended before it could be killed:\n" + (tmp_path / "run1.log").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        stragglers = _reap_session(proc.pid)
    assert not _session_pids(proc.pid)

    written = [k for s in list_shards(str(out), format="parquet") for k in read_shard(s).column("key").to_pylist()]
    assert 0 < len(written) < len(keys) - len(bad), "the kill did not land mid-run"
    assert not (out / "_SUCCESS").exists()

    rerun = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path / "log2"), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "skipped as done" in rerun.stdout
    assert_exactly_once(str(out), keys, bad)
    # The rerun captioned exactly the rows the killed run had not written, each once.
    second = [k for ks in read_call_log(tmp_path / "log2").values() for k in ks]
    assert sorted(second) == sorted(set(keys) - set(bad) - set(written))
    print(f"killed after {len(written)} rows written; rerun captioned {len(second)}; "
          f"Ray processes of the killed run that needed SIGKILL: {stragglers}")
