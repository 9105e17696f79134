"""`alip spot-watch` against a fake EC2 instance metadata service (IMDSv2) on 127.0.0.1.

Fast tests drive the watcher with a recording drainer (the IMDS side is a real HTTP server);
the slow test drains a REAL Ray node of a `ray.cluster_utils.Cluster` through the CLI and shows
that Ray marks it draining with reason PREEMPTION and the notice's deadline, and that new tasks
go elsewhere.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alip.spot_watch import (NOTICE_PATH, TOKEN_HEADER, TOKEN_PATH, TOKEN_TTL_HEADER, ImdsClient, ImdsError,
                             RayGcsDrainer, SpotWatchConfig, SpotWatcher, check_node_id, parse_notice, pick_node)

REPO = Path(__file__).resolve().parents[1]
NODE = "ab" * 28


class FakeImds:
    """IMDSv2 as EC2 serves it: PUT a token (TTL header required), GET instance-action with it
    (401 without a valid token, 404 while there is no notice, the notice's JSON once there is)."""

    def __init__(self):
        self.notice: str | None = None
        self.refuse_tokens: int | None = None  # HTTP status for token PUTs (e.g. 403: IMDS disabled)
        self.tokens: set[str] = set()
        self.puts = 0
        self.gets = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, body: str = ""):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                if self.path != TOKEN_PATH:
                    return self._send(404)
                fake.puts += 1
                if fake.refuse_tokens:
                    return self._send(fake.refuse_tokens, "Forbidden")
                if not self.headers.get(TOKEN_TTL_HEADER, "").isdigit():
                    return self._send(400, "missing TTL")
                token = f"token-{fake.puts}"
                fake.tokens.add(token)
                self._send(200, token)

            def do_GET(self):
                if self.path != NOTICE_PATH:
                    return self._send(404)
                fake.gets += 1
                if self.headers.get(TOKEN_HEADER) not in fake.tokens:
                    return self._send(401, "Unauthorized")
                if fake.notice is None:
                    return self._send(404, "Not Found")
                self._send(200, fake.notice)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def announce(self, when: dt.datetime, action: str = "terminate") -> int:
        """Post a notice; returns its time in ms since the epoch."""
        self.notice = json.dumps({"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
        return int(when.replace(microsecond=0).timestamp() * 1000)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def imds():
    fake = FakeImds()
    yield fake
    fake.close()


class RecordingDrainer:
    """Stands in for the GCS in the fast tests; the slow test uses the real one."""

    def __init__(self, fail_first: int = 0):
        self.drains: list[tuple[str, int, str]] = []
        self.fail_first = fail_first
        self.node = NODE

    def resolve(self) -> str:
        return self.node

    def drain(self, node_id, deadline_ms, message):
        if self.fail_first:
            self.fail_first -= 1
            raise ConnectionError("GCS unavailable")
        self.drains.append((node_id, deadline_ms, message))


def utc(seconds_from_now: float) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds_from_now)


def make_watcher(url, drainer, **kw):
    cfg = SpotWatchConfig(metadata_url=url, poll_interval_s=2.0, max_backoff_s=16.0, **kw)
    return SpotWatcher(cfg, ImdsClient(url, timeout_s=1.0), drainer)


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------- fast

def test_notice_drains_once_with_the_notices_deadline(imds):
    drainer = RecordingDrainer()
    w = make_watcher(imds.url, drainer)
    assert w.step() == 2.0 and drainer.drains == []  # 404: no notice, nothing drained

    when_ms = imds.announce(utc(110))
    assert w.step() == 2.0
    assert len(drainer.drains) == 1
    node, deadline, message = drainer.drains[0]
    assert node == NODE and deadline == when_ms
    assert "spot interruption" in message and "terminate" in message

    w.step(), w.step()  # the same notice again: no second drain request
    assert len(drainer.drains) == 1

    later_ms = imds.announce(utc(200))  # EC2 moved the time: Ray gets the new deadline
    w.step()
    assert [d[1] for d in drainer.drains] == [when_ms, later_ms]

    drainer.node = "cd" * 28  # Ray was restarted here (new node id): drain the new node too
    w.step()
    assert drainer.drains[-1][:2] == ("cd" * 28, later_ms)

    def gone():
        raise LookupError("no alive Ray node on this machine's IP")

    drainer.resolve = gone  # the drained node left (Ray stops it once idle): expected, no retries
    assert w.step() == 2.0 and len(drainer.drains) == 3


def test_token_is_reused_refreshed_on_401_and_before_its_ttl(imds):
    clock = [0.0]
    client = ImdsClient(imds.url, token_ttl_s=100, clock=lambda: clock[0])
    for _ in range(3):
        assert client.spot_notice() is None
    assert imds.puts == 1 and imds.gets == 3  # one token for many polls

    imds.tokens.clear()  # IMDS forgot/revoked the token: 401, then a fresh token, no error
    assert client.spot_notice() is None
    assert imds.puts == 2 and imds.gets == 5

    clock[0] = 81.0  # past 80% of the TTL: refreshed before it can expire between polls
    assert client.spot_notice() is None
    assert imds.puts == 3


def test_token_refused_is_a_clear_error_and_the_watcher_keeps_going(imds, caplog):
    imds.refuse_tokens = 403
    with pytest.raises(ImdsError, match=r"HTTP 403.*HttpEndpoint=enabled"):
        ImdsClient(imds.url).spot_notice()

    drainer = RecordingDrainer()
    w = make_watcher(imds.url, drainer)
    with caplog.at_level(logging.INFO, logger="alip.spot_watch"):
        delays = [w.step() for _ in range(3)]
    assert delays == [4.0, 8.0, 16.0] and drainer.drains == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "refused a session token" in errors[0].getMessage()

    imds.refuse_tokens = None  # fixed (e.g. hop limit raised): back to normal polling
    imds.announce(utc(100))
    assert w.step() == 2.0 and len(drainer.drains) == 1


def test_notice_time_in_the_past_drains_with_deadline_now(imds):
    drainer = RecordingDrainer()
    w = make_watcher(imds.url, drainer)
    past_ms = imds.announce(utc(-30))
    before = time.time_ns() // 1_000_000
    w.step()
    after = time.time_ns() // 1_000_000
    (_, deadline, _), = drainer.drains
    assert deadline > past_ms and before <= deadline <= after


def test_unreachable_imds_keeps_retrying_with_capped_backoff_then_drains(imds, caplog):
    drainer = RecordingDrainer()
    w = make_watcher(closed_port_url(), drainer)
    slept: list[float] = []

    def sleep(s):
        slept.append(s)
        if len(slept) == 6:  # IMDS comes back (e.g. the link was down) with a notice
            imds.announce(utc(90))
            w.imds.base_url = imds.url

    with caplog.at_level(logging.INFO, logger="alip.spot_watch"):
        w.run(sleep=sleep, stop=lambda: len(slept) >= 7)
    assert slept[:6] == [4.0, 8.0, 16.0, 16.0, 16.0, 16.0]  # doubling, capped at --max-backoff
    assert slept[6] == 2.0 and len(drainer.drains) == 1
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert 1 <= len(warnings) <= 4  # logged, but not once per failed poll


def test_failed_drain_is_retried_and_exit_after_drain_stops(imds):
    drainer = RecordingDrainer(fail_first=2)
    w = make_watcher(imds.url, drainer, exit_after_drain=True)
    when_ms = imds.announce(utc(100), action="stop")
    slept = []
    assert w.run(sleep=slept.append) == 0
    assert slept == [4.0, 8.0]  # two GCS failures, then the drain went through and the loop ended
    assert drainer.drains[0][1] == when_ms and "stop" in drainer.drains[0][2]


def test_parse_notice():
    n = parse_notice(b'{"action": "terminate", "time": "2026-11-29T12:00:00Z"}')
    assert n.action == "terminate"
    assert n.time_ms == int(dt.datetime(2026, 11, 29, 12, tzinfo=dt.timezone.utc).timestamp() * 1000)
    undated = parse_notice('{"action": "hibernate", "time": "soon"}')  # unreadable: 2 minutes, EC2's lead
    assert undated.time_ms is None and undated.deadline_ms(1_000) == 121_000
    for bad in (b"<html>", b'{"time": "2026-11-29T12:00:00Z"}', b"[1]"):
        with pytest.raises(ImdsError):
            parse_notice(bad)


def test_pick_node_is_this_machines_only_alive_node():
    rows = [("aa" * 28, "10.0.0.5", True), ("bb" * 28, "10.0.0.6", True), ("cc" * 28, "10.0.0.6", False)]
    assert pick_node(rows, "10.0.0.6") == "bb" * 28  # the dead node of an earlier `ray start` is ignored
    with pytest.raises(LookupError, match="no alive Ray node"):
        pick_node(rows, "10.0.0.7")
    with pytest.raises(LookupError, match="--node-id"):
        pick_node(rows + [("dd" * 28, "10.0.0.5", True)], "10.0.0.5")
    assert check_node_id("AB" * 28) == "ab" * 28
    for bad in ("00" * 28, "ab" * 27, "zz" * 28):
        with pytest.raises(ValueError):
            check_node_id(bad)


@pytest.mark.parametrize("args, message", [
    (["--metadata-url", "169.254.169.254"], "http"),
    (["--poll-interval", "0"], "poll-interval"),
    (["--node-id", "nope"], "node id"),
])
def test_cli_rejects_bad_flags_clearly(args, message):
    p = subprocess.run([sys.executable, "-m", "alip.cli", "spot-watch", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and message in p.stderr


def _wait_for(path: Path, text: str, timeout_s: float = 60) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if text in (content := path.read_text()):
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path.read_text()!r}")


def test_one_watcher_per_lock_and_sigterm_stops_it(imds, tmp_path):
    lock = tmp_path / "spot-watch.lock"
    cmd = [sys.executable, "-m", "alip.cli", "spot-watch", "--metadata-url", imds.url, "--node-id", NODE,
           "--poll-interval", "0.2", "--lock-file", str(lock)]
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        first = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(first_log, "watching")
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0 and "another spot-watch holds" in second.stderr
        assert lock.read_text() == str(first.pid)
        polls = imds.gets
        time.sleep(1.0)
        assert imds.gets > polls  # the first one is still polling
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert "stopped" in first_log.read_text()


# ----------------------------------------------------------------------------- slow: a real Ray node

@pytest.mark.slow
def test_spot_notice_drains_the_real_ray_node_and_new_tasks_avoid_it(imds, tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Like cluster.yaml's head, less the dashboard: nothing here needs it, and another test's Ray may
    # hold port 8265 (a head that loses that race has no dashboard, and the State API then fails).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        victim = cluster.add_node(num_cpus=3, resources={"victim": 1})
        other = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)

        @ray.remote(num_cpus=1)
        def where():
            time.sleep(0.2)
            return ray.get_runtime_context().get_node_id()

        @ray.remote(num_cpus=1, resources={"victim": 1})
        class Busy:  # keeps the victim busy: an idle node that is drained exits at once
            def node(self):
                return ray.get_runtime_context().get_node_id()

        busy = Busy.remote()
        assert ray.get(busy.node.remote()) == victim.node_id
        prefer_victim = NodeAffinitySchedulingStrategy(victim.node_id, soft=True)
        # Control: before the notice, a task that prefers the victim runs there.
        assert ray.get(where.options(scheduling_strategy=prefer_victim).remote()) == victim.node_id

        deadline_ms = imds.announce(utc(120))
        log_path = tmp_path / "spot-watch.log"
        with open(log_path, "w") as log_file:
            p = subprocess.run(
                [sys.executable, "-m", "alip.cli", "spot-watch", "--metadata-url", imds.url,
                 "--address", cluster.address, "--node-id", victim.node_id, "--poll-interval", "0.2",
                 "--exit-after-drain"],
                cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, timeout=120)
        log_text = log_path.read_text()
        assert p.returncode == 0, log_text
        assert f"drained Ray node {victim.node_id} with reason PREEMPTION" in log_text

        # What Ray Train's PreemptionWatcher polls: the victim, with the notice's deadline.
        assert ray._private.state.state.get_draining_nodes() == {victim.node_id: deadline_ms}
        gcs_view = RayGcsDrainer(cluster.address)
        assert gcs_view.draining() == {victim.node_id: deadline_ms}
        # Without --node-id the watcher would refuse to guess: three alive nodes share this IP.
        with pytest.raises(LookupError, match="3 alive Ray nodes share") as ambiguous:
            gcs_view.resolve()
        assert victim.node_id in str(ambiguous.value) and other.node_id in str(ambiguous.value)
        gcs = ray._raylet.GcsClient(address=cluster.address)
        info = {nid.hex(): i for nid, i in gcs.get_all_node_info().items()}
        assert info[victim.node_id].state_snapshot.state == info[victim.node_id].state_snapshot.DRAINING

        # New tasks avoid the draining node even when they prefer it and it has free CPUs.
        ran_on = ray.get([where.options(scheduling_strategy=prefer_victim).remote() for _ in range(4)])
        assert set(ran_on) == {other.node_id}

        # Once its work is gone the node leaves, and Ray records why: preemption, our message.
        ray.kill(busy)
        from ray.core.generated.common_pb2 import NodeDeathInfo
        from ray.dashboard.utils import compose_state_message

        for _ in range(100):
            node = {nid.hex(): i for nid, i in gcs.get_all_node_info().items()}[victim.node_id]
            if node.state == node.DEAD:
                break
            time.sleep(0.2)
        assert node.state == node.DEAD, node
        # Read from the GCS, composed as `ray list nodes --detail` shows it (that needs a dashboard,
        # and a second dashboard on this machine can lose the race for port 8265).
        shown = compose_state_message(NodeDeathInfo.Reason.Name(node.death_info.reason),
                                      node.death_info.reason_message)
        assert shown.startswith("Terminated due to preemption: EC2 spot interruption notice"), shown
        with pytest.raises(LookupError, match="2 alive Ray nodes share") as ambiguous:  # the dead one is out
            gcs_view.resolve()
        assert victim.node_id not in str(ambiguous.value)
    finally:
        ray.shutdown()
        cluster.shutdown()
