"""One writer per output: the lease on the local S3 server (conditional writes) and on a local
disk; and the refusal of a local output on a multi-host cluster (decision function)."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from alip.captioning.config import CaptionJobError
from alip.captioning.lease import LEASE, LeaseHeldError, LeaseLostError, OutputLease
from alip.captioning.output import check_output_reachable
from alip.data.storage import Location, resolve


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return resolve(str(tmp_path / "out"))
    return resolve(f"{request.getfixturevalue('s3_bucket')}/out")


def _read(root) -> dict:
    loc = root.child(LEASE)
    with loc.fs.open_input_stream(loc.path) as f:
        return json.loads(f.read())


def _age_lease(root, seconds: float) -> None:
    """Make the current lease look like its holder stopped heartbeating ``seconds`` ago."""
    lease = _read(root)
    lease["heartbeat"] -= seconds
    loc = root.child(LEASE)
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(json.dumps(lease).encode())


def test_second_run_is_refused_naming_the_holder_and_first_keeps_its_lease(root):
    first = OutputLease(root, run_id="run-A", heartbeat_s=1, stale_after_s=60)
    with first:
        second = OutputLease(root, run_id="run-B")
        with pytest.raises(LeaseHeldError, match=f"run run-A on host {socket.gethostname()} \\(pid {os.getpid()}\\)"):
            second.acquire()
        assert isinstance(LeaseHeldError("x"), CaptionJobError)  # the CLI's exit code 2 + message
        beat = _read(root)["heartbeat"]
        time.sleep(1.5)  # the heartbeat thread renews the lease
        assert _read(root)["heartbeat"] > beat and _read(root)["run_id"] == "run-A"
        first.check()
    # Released: the file is gone and the next run acquires at once.
    assert root.fs.get_file_info(root.child(LEASE).path).type.name == "NotFound"
    with OutputLease(root, run_id="run-B"):
        assert _read(root)["run_id"] == "run-B"


def test_stale_lease_is_taken_over_and_the_stalled_run_learns_it_lost(root):
    stalled = OutputLease(root, run_id="run-A", stale_after_s=60)
    stalled.acquire()
    with pytest.raises(LeaseHeldError):
        OutputLease(root, run_id="run-B", stale_after_s=60).acquire()
    _age_lease(root, 61)
    # The aged lease no longer matches run A's version: A's renewal would fail from here on.
    taker = OutputLease(root, run_id="run-B", stale_after_s=60)
    taker.acquire()
    assert taker.taken_over.run_id == "run-A" and _read(root)["run_id"] == "run-B"
    stalled.renew()
    with pytest.raises(LeaseLostError, match="now held by run run-B"):
        stalled.check()
    stalled.release()  # must not delete the new holder's lease
    assert _read(root)["run_id"] == "run-B"
    taker.release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(root):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = OutputLease(root, run_id="run-dead")
    holder.acquire()
    lease = _read(root)
    lease["pid"] = int(dead.stdout)
    loc = root.child(LEASE)
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(json.dumps(lease).encode())
    taker = OutputLease(root, run_id="run-new")
    taker.acquire()
    assert taker.taken_over.pid == int(dead.stdout)
    taker.release()


def _race(uri: str, run_id: str, start_at: float, results, done) -> None:
    lease = OutputLease(resolve(uri), run_id=run_id)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        lease.acquire()
        results.put(run_id)
        done.wait(30)  # a winner stays alive (a dead holder's lease may be taken over at once)
    except LeaseHeldError:
        results.put(None)


def test_concurrent_acquires_have_exactly_one_winner(root):
    """Processes that start at the same instant: conditional create lets exactly one win."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(3):
        if attempt:
            root.fs.delete_file(root.child(LEASE).path)
        results, done = ctx.Queue(), ctx.Event()
        start = time.time() + 1.0
        procs = [ctx.Process(target=_race, args=(root.uri, f"run-{i}", start, results, done)) for i in range(4)]
        for p in procs:
            p.start()
        got = [results.get(timeout=30) for _ in procs]
        done.set()
        for p in procs:
            p.join(timeout=30)
        winners = [g for g in got if g]
        assert len(winners) == 1, got
        assert _read(root)["run_id"] == winners[0]


def _node(ip: str, host: str, alive: bool = True, cpus: float = 2) -> dict:
    return {"NodeManagerAddress": ip, "NodeManagerHostname": host, "Alive": alive, "Resources": {"CPU": cpus}}


def test_local_output_is_refused_when_nodes_are_on_several_hosts(tmp_path):
    local = resolve(str(tmp_path / "out"))
    one_host = [_node("10.0.0.5", "gpu-a")] * 3  # a simulated cluster: every node on this machine
    check_output_reachable(local, one_host)
    check_output_reachable(local, one_host + [_node("10.0.0.6", "gpu-b", alive=False)])  # dead nodes don't count
    with pytest.raises(CaptionJobError, match=r"local path, but the Ray cluster's nodes are on 2 hosts "
                                              r"\(gpu-a \(10.0.0.5\), gpu-b \(10.0.0.6\)\).*s3://"):
        check_output_reachable(local, one_host + [_node("10.0.0.6", "gpu-b")])
    s3 = Location(None, "bucket/out", "s3://bucket/out")  # type: ignore[arg-type]
    check_output_reachable(s3, one_host + [_node("10.0.0.6", "gpu-b")])
    # cluster.yaml before the autoscaler starts workers: a head without CPUs, alone.
    check_output_reachable(local, [_node("10.0.0.5", "head", cpus=0), _node("10.0.0.5", "head")])
    with pytest.raises(CaptionJobError, match="no node of the Ray cluster can run work yet"):
        check_output_reachable(local, [_node("10.0.0.5", "head", cpus=0)])
    check_output_reachable(s3, [_node("10.0.0.5", "head", cpus=0)])
