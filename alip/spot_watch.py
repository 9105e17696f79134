"""`alip spot-watch`: an EC2 spot interruption notice drains this machine's Ray node.

EC2 announces a spot reclaim about two minutes ahead through the instance metadata service
(IMDSv2): `PUT /latest/api/token` gives a session token, then
`GET /latest/meta-data/spot/instance-action` answers 404 until a notice exists and then
`{"action": "terminate", "time": "2026-01-01T12:00:00Z"}`. Ray only learns about the reclaim
when the node vanishes, so this watcher (started on every worker by cluster.yaml) turns the
notice into what the autoscaler would send: a GCS drain request for its own node with reason
DRAIN_NODE_REASON_PREEMPTION and the notice's time as the deadline (ms since the epoch), the same
call `ray drain-node` makes. From then on Ray schedules no new tasks or actors there, Ray Train's
`get_preemption_info()` reports the node (the pretraining job writes a just-in-time checkpoint)
and the caption job gets no new units there.

Robustness: the token is cached and refreshed before its TTL runs out or when IMDS answers 401;
an unreachable IMDS or GCS is retried with a capped backoff (the watcher never crashes on it);
each drain is sent once per (node, notice), and again if the notice changes or Ray was restarted
on this machine with a new node id. With `--exit-after-drain` it stops after the drain.
"""
from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Protocol

log = logging.getLogger("alip.spot_watch")

DEFAULT_METADATA_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
# A notice whose time cannot be read still means the machine goes soon: EC2 gives two minutes.
DEFAULT_NOTICE_LEAD_S = 120
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class SpotWatchConfig:
    metadata_url: str = DEFAULT_METADATA_URL
    poll_interval_s: float = 5.0  # EC2 recommends polling every 5 s
    address: str | None = None  # Ray GCS host:port; None: $RAY_ADDRESS, else this machine's `ray start`
    node_id: str | None = None  # hex id of the node to drain; None: the one Ray node on this machine's IP
    node_ip: str | None = None  # None: the IP Ray itself picks for this machine
    token_ttl_s: int = 21600  # IMDSv2 session token lifetime (the maximum EC2 allows)
    request_timeout_s: float = 2.0  # per HTTP request to IMDS (link-local: answers in ms or never)
    max_backoff_s: float = 60.0  # cap of the retry backoff when IMDS or Ray is unreachable
    exit_after_drain: bool = False  # stop once the node is drained (default: keep watching)
    lock_file: str | None = None  # one watcher per machine: a second one exits at once

    def validate(self) -> None:
        if not self.metadata_url.startswith(("http://", "https://")):
            raise ValueError(f"--metadata-url must be http(s)://host[:port], got {self.metadata_url!r}")
        if self.poll_interval_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("--poll-interval and --request-timeout must be > 0 seconds")
        if self.max_backoff_s < self.poll_interval_s:
            raise ValueError("--max-backoff must be >= --poll-interval")
        if not 1 <= self.token_ttl_s <= 21600:
            raise ValueError(f"--token-ttl must be 1..21600 s (EC2's limits), got {self.token_ttl_s}")
        if self.node_id is not None:
            check_node_id(self.node_id)


def check_node_id(node_id: str) -> str:
    try:
        raw = bytes.fromhex(node_id)
    except ValueError:
        raw = b""
    if len(raw) != 28 or not any(raw):  # Ray node ids are 28 bytes; all zeros is the nil id
        raise ValueError(f"not a Ray node id (56 hex digits, not nil): {node_id!r}")
    return node_id.lower()


# ----------------------------------------------------------------------------- IMDS

class ImdsError(RuntimeError):
    """IMDS answered something this watcher cannot use (the message says what and why)."""


class ImdsUnreachable(ImdsError):
    """No answer from IMDS at all (not on EC2, link down, timeout): retried quietly."""


@dataclass(frozen=True)
class SpotNotice:
    action: str  # terminate | stop | hibernate
    time_ms: int | None  # when EC2 reclaims the instance; None when the notice's time was unreadable
    raw: str

    def deadline_ms(self, now_ms: int) -> int:
        """Ray's drain deadline: the notice's time; now if that already passed (the machine can
        vanish any moment); two minutes from now if the notice had no readable time."""
        if self.time_ms is None:
            return now_ms + DEFAULT_NOTICE_LEAD_S * 1000
        return max(self.time_ms, now_ms)


def parse_notice(body: bytes | str) -> SpotNotice:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ImdsError(f"spot instance-action is not JSON ({e}): {text[:200]!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("action"), str):
        raise ImdsError(f"spot instance-action without an 'action': {text[:200]!r}")
    when = data.get("time")
    time_ms = None
    if isinstance(when, str):
        try:
            t = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
            if t.tzinfo is None:  # EC2 times are UTC
                t = t.replace(tzinfo=dt.timezone.utc)
            time_ms = int(t.timestamp() * 1000)
        except ValueError:
            log.warning("spot notice time %r is unreadable; assuming %d s from now", when, DEFAULT_NOTICE_LEAD_S)
    return SpotNotice(action=data["action"], time_ms=time_ms, raw=text)


class ImdsClient:
    """IMDSv2 over plain urllib (no AWS SDK needed on the nodes)."""

    def __init__(self, base_url: str, token_ttl_s: int = 21600, timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.base_url = base_url.rstrip("/")
        self.token_ttl_s = token_ttl_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._token: str | None = None
        self._token_expires = 0.0

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:  # refused, timeout, no route
            reason = getattr(e, "reason", e)
            raise ImdsUnreachable(f"instance metadata service {self.base_url} unreachable: {reason}") from None

    def token(self) -> str:
        # Refresh at 80% of the TTL so a token never expires between two polls.
        if self._token is None or self._clock() >= self._token_expires:
            status, body = self._request("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(self.token_ttl_s)})
            if status != 200 or not body.strip():
                raise ImdsError(
                    f"IMDSv2 refused a session token (PUT {TOKEN_PATH} -> HTTP {status}): is the "
                    "instance metadata service enabled for this instance (HttpEndpoint=enabled), and "
                    "its PUT response hop limit high enough (HttpPutResponseHopLimit >= 2 inside a "
                    "container)?")
            self._token = body.decode().strip()
            self._token_expires = self._clock() + 0.8 * self.token_ttl_s
        return self._token

    def spot_notice(self) -> SpotNotice | None:
        """The pending spot interruption notice, or None when there is none (404)."""
        for attempt in (1, 2):
            status, body = self._request("GET", NOTICE_PATH, {TOKEN_HEADER: self.token()})
            if status == 401 and attempt == 1:  # token expired or revoked: get a new one, once
                log.info("IMDS token rejected (401): requesting a new one")
                self._token = None
                continue
            break
        if status == 404:
            return None
        if status != 200:
            raise ImdsError(f"GET {NOTICE_PATH} -> HTTP {status}: {body[:200]!r}")
        return parse_notice(body)


# ----------------------------------------------------------------------------- Ray

class DrainRejected(RuntimeError):
    pass


class NodeDrainer(Protocol):
    def resolve(self) -> str: ...

    def drain(self, node_id: str, deadline_ms: int, message: str) -> None: ...


def pick_node(nodes: list[tuple[str, str, bool]], ip: str) -> str:
    """This machine's Ray node among (node_id_hex, node_ip, alive) rows: the one alive node on `ip`.

    Several alive nodes on one IP (a simulated cluster on one machine, or a stale restart) are
    ambiguous: draining the wrong one would be worse than not draining, so that is an error."""
    mine = [nid for nid, nip, alive in nodes if alive and nip == ip]
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise LookupError(f"no alive Ray node on this machine's IP {ip} yet (Ray not started, or "
                          "restarting); will look again")
    raise LookupError(f"{len(mine)} alive Ray nodes share this machine's IP {ip} ({', '.join(mine)}): "
                      "pass --node-id to say which one to drain")


class RayGcsDrainer:
    """Talks to the GCS directly (no driver, no worker process): what `ray drain-node` does."""

    def __init__(self, address: str | None, node_id: str | None = None, node_ip: str | None = None,
                 rpc_timeout_s: float = 5.0):
        self._address_arg = address
        self._node_id = node_id
        self._node_ip = node_ip
        self._timeout = rpc_timeout_s
        self._client = None
        self.address: str | None = None

    def _gcs(self):
        if self._client is None:
            import ray
            from ray._private import services
            from ray._private.authentication.authentication_token_setup import (
                ensure_token_if_auth_enabled, maybe_enable_token_auth_if_token_available)

            address = self._address_arg or os.environ.get("RAY_ADDRESS") or "auto"
            try:
                self.address = services.canonicalize_bootstrap_address_or_die(address)
            except (ConnectionError, ValueError) as e:
                raise ConnectionError(f"no Ray cluster found at {address!r}: {e}") from None
            # Like ray.init: a cluster found on this machine turns token auth on when a token
            # exists here; with RAY_AUTH_MODE=token a missing token is a clear error.
            if self._address_arg is None:
                maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
            ensure_token_if_auth_enabled(None, create_token_if_missing=False)
            # The client GcsClient wraps, built with a bounded connect timeout: GcsClient's default
            # waits ~45 s for an unreachable GCS, a third of a spot notice's two minutes.
            self._client = ray._raylet.InnerGcsClient.standalone(self.address, None, int(self._timeout * 1000))
        return self._client

    def _call(self, fn):
        try:
            return fn(self._gcs())
        except Exception:
            self._client = None  # reconnect next time (the head may have restarted)
            raise

    def resolve(self) -> str:
        if self._node_id:
            return self._node_id
        from ray._private import services

        infos = self._call(lambda gcs: gcs.get_all_node_info(timeout=self._timeout))
        ip = self._node_ip or services.get_node_ip_address(self.address)
        rows = [(nid.hex(), info.node_manager_address, info.state == info.ALIVE) for nid, info in infos.items()]
        return pick_node(rows, ip)

    def drain(self, node_id: str, deadline_ms: int, message: str) -> None:
        from ray.core.generated import autoscaler_pb2

        accepted, why = self._call(lambda gcs: gcs.drain_node(
            node_id, autoscaler_pb2.DrainNodeReason.Value(DRAIN_REASON), message, deadline_ms,
            timeout=self._timeout))
        if not accepted:
            raise DrainRejected(f"GCS did not accept draining node {node_id}: {why}")

    def draining(self) -> dict[str, int]:
        """{node id hex: deadline ms} of every draining node (what Ray Train polls)."""
        return dict(self._call(lambda gcs: gcs.get_draining_nodes(timeout=self._timeout)))


# ----------------------------------------------------------------------------- the loop

class Backoff:
    """poll interval after success; doubling up to a cap after failures."""

    def __init__(self, base_s: float, cap_s: float):
        self.base_s, self.cap_s, self.failures = base_s, cap_s, 0

    def ok(self) -> float:
        self.failures = 0
        return self.base_s

    def fail(self) -> float:
        self.failures += 1
        return min(self.cap_s, self.base_s * 2 ** min(self.failures, 30))

    @property
    def worth_logging(self) -> bool:  # 1st, 2nd, 4th, 8th ... failure: a log that does not flood
        return self.failures & (self.failures - 1) == 0


class SpotWatcher:
    def __init__(self, cfg: SpotWatchConfig, imds: ImdsClient, drainer: NodeDrainer,
                 now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000):
        self.cfg, self.imds, self.drainer, self.now_ms = cfg, imds, drainer, now_ms
        self.backoff = Backoff(cfg.poll_interval_s, cfg.max_backoff_s)
        self.drained: tuple[str, str] | None = None  # (node id, notice) already sent
        self._last_error: str | None = None

    def _failed(self, what: str, exc: Exception, level=logging.WARNING) -> float:
        delay = self.backoff.fail()
        msg = f"{what}: {exc}"
        if self.backoff.worth_logging or msg != self._last_error:
            log.log(level, "%s (failure %d; retrying in %.0f s)", msg, self.backoff.failures, delay)
        self._last_error = msg
        return delay

    def step(self) -> float:
        """One poll (and a drain if a notice is there). Returns the seconds to wait."""
        try:
            notice = self.imds.spot_notice()
        except ImdsUnreachable as e:
            return self._failed("no spot notice check", e)
        except ImdsError as e:
            return self._failed("no spot notice check", e, logging.ERROR)
        if notice is None:
            if self.backoff.failures:
                log.info("instance metadata service answers again; no spot notice")
            self._last_error = None
            return self.backoff.ok()
        try:
            node_id = self.drainer.resolve()
        except Exception as e:  # GCS down, Ray restarting, ambiguous node: retry, never crash
            if self.drained and self.drained[1] == notice.raw:
                return self.backoff.ok()  # drained and gone (Ray stops a drained node once idle): as planned
            return self._failed(f"spot notice {notice.raw.strip()} but this Ray node is unknown", e, logging.ERROR)
        if self.drained == (node_id, notice.raw):
            return self.backoff.ok()
        now = self.now_ms()
        deadline = notice.deadline_ms(now)
        if notice.time_ms is not None and notice.time_ms < now:
            log.warning("spot notice time is %.1f s in the past: draining with deadline now",
                        (now - notice.time_ms) / 1000)
        message = f"EC2 spot interruption notice: {notice.action} at {notice.raw.strip()}"
        try:
            self.drainer.drain(node_id, deadline, message)
        except Exception as e:
            return self._failed(f"drain of Ray node {node_id} failed", e, logging.ERROR)
        self.drained = (node_id, notice.raw)
        self._last_error = None
        log.warning("spot notice (%s): drained Ray node %s with reason PREEMPTION, deadline %s (in %.0f s); "
                    "no new tasks or actors go there", notice.action, node_id,
                    dt.datetime.fromtimestamp(deadline / 1000, dt.timezone.utc).isoformat(timespec="seconds"),
                    (deadline - now) / 1000)
        return self.backoff.ok()

    def run(self, sleep: Callable[[float], None] = time.sleep, stop: Callable[[], bool] = lambda: False) -> int:
        while not stop():
            delay = self.step()
            if self.drained and self.cfg.exit_after_drain:
                return 0
            sleep(delay)
        return 0


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    d = SpotWatchConfig()
    p = argparse.ArgumentParser(
        prog="alip spot-watch",
        description="Watch EC2's instance metadata for a spot interruption notice and drain this "
                    "machine's Ray node (reason PREEMPTION, the notice's deadline). Run on each worker.")
    p.add_argument("--metadata-url", default=d.metadata_url, metavar="URL",
                   help=f"IMDS base URL (default {d.metadata_url})")
    p.add_argument("--poll-interval", dest="poll_interval_s", type=float, default=d.poll_interval_s, metavar="S",
                   help=f"seconds between polls (default {d.poll_interval_s:g})")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="Ray GCS address host:port (default: $RAY_ADDRESS, else the `ray start` on this machine)")
    p.add_argument("--node-id", default=None, metavar="HEX",
                   help="hex id of the Ray node to drain (default: the one alive node on this machine's IP)")
    p.add_argument("--node-ip", default=None, metavar="IP",
                   help="this machine's Ray node IP (default: as Ray picks it)")
    p.add_argument("--token-ttl", dest="token_ttl_s", type=int, default=d.token_ttl_s, metavar="S",
                   help=f"IMDSv2 token lifetime in seconds (default {d.token_ttl_s})")
    p.add_argument("--request-timeout", dest="request_timeout_s", type=float, default=d.request_timeout_s,
                   metavar="S", help=f"per request to IMDS (default {d.request_timeout_s:g} s)")
    p.add_argument("--max-backoff", dest="max_backoff_s", type=float, default=d.max_backoff_s, metavar="S",
                   help=f"cap of the retry delay while IMDS or Ray is unreachable (default {d.max_backoff_s:g} s)")
    p.add_argument("--exit-after-drain", action="store_true",
                   help="exit 0 once the node is drained (default: keep watching: a restarted Ray node "
                        "or a changed notice is drained again)")
    p.add_argument("--lock-file", default=None, metavar="PATH",
                   help="hold this lock while running; a second watcher with the same lock exits 0 at once")
    return p


def _take_lock(path: str):
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = SpotWatchConfig(**vars(args))
    try:
        cfg.validate()
    except ValueError as e:
        build_parser().error(str(e))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s spot-watch %(levelname)s %(message)s")
    lock = _take_lock(cfg.lock_file) if cfg.lock_file else None
    if cfg.lock_file and lock is None:
        log.info("another spot-watch holds %s: nothing to do", cfg.lock_file)
        return 0
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    drainer = RayGcsDrainer(cfg.address, cfg.node_id, cfg.node_ip)
    imds = ImdsClient(cfg.metadata_url, cfg.token_ttl_s, cfg.request_timeout_s)
    target = cfg.node_id or f"the Ray node on {cfg.node_ip or 'this machine'}"
    log.info("watching %s%s every %g s for spot interruption notices; on one, %s is drained",
             cfg.metadata_url, NOTICE_PATH, cfg.poll_interval_s, target)
    try:  # early, so the log says at once whether Ray is reachable and which node this is
        node = drainer.resolve()
        log.info("Ray node to drain on a notice: %s (GCS %s)", node, drainer.address or cfg.address or "found then")
    except Exception as e:
        log.warning("Ray node not known yet (%s); looked up again when a notice comes", e)
    watcher = SpotWatcher(cfg, imds, drainer)

    def sleep(seconds: float) -> None:  # wakes up early on SIGTERM
        end = time.monotonic() + seconds
        while not stopping and time.monotonic() < end:
            time.sleep(max(0.0, min(0.2, end - time.monotonic())))

    try:
        rc = watcher.run(sleep=sleep, stop=lambda: bool(stopping))
    except KeyboardInterrupt:
        rc = 0
    log.info("stopped%s", " after draining" if watcher.drained else "")
    return rc


if __name__ == "__main__":
    sys.exit(main())
