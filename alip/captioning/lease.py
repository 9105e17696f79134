"""One writer per output folder: the caption job's lease (no Ray here).

``<output>/_lease.json`` names the run that writes the folder: run id, host, pid, start time
and a heartbeat the driver refreshes every ``heartbeat_s`` seconds (a thread). A second run on
the same output is refused with an error naming the holder, unless the lease is stale:

* its heartbeat is older than ``stale_after_s`` (default 5 minutes: the holder died, or lost
  its storage, without releasing it), or
* the holder is on this host and its process is gone (a killed driver is replaced at once).

Every change is a compare-and-swap, so two runs racing for a free or stale lease cannot both win:

* S3: ``PutObject`` with ``If-None-Match: *`` to create and ``If-Match: <etag>`` to renew, take
  over or delete (conditional writes; AWS S3, MinIO and the tests' moto server implement them).
  An S3-compatible store that ignores these headers turns the check into read-then-write,
  leaving a window of one request round trip in which two starting runs can both acquire.
* Local: the lease is created with ``link()`` (fails if the file exists, after its content is
  complete) and replaced or deleted under ``flock`` on ``_lease.lock``; a local output is only
  valid on one host (the job refuses multi-host clusters), where flock is reliable.

A run whose renewal finds the lease taken over (it stalled for longer than ``stale_after_s``)
stops with :class:`LeaseLostError` at its next finished unit. Clock skew between hosts shifts
the staleness test by the skew: keep ``stale_after_s`` far above it (NTP: milliseconds).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from alip.captioning.config import CaptionJobError
from alip.data.dataset import s3_client
from alip.data.storage import Location, StorageError, ensure_dir

LEASE = "_lease.json"
STALE_AFTER_S = 300.0
HEARTBEAT_S = 30.0


class LeaseHeldError(CaptionJobError):
    """Another live run writes this output."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over by another run: it must stop writing."""


class _Conflict(Exception):
    """A conditional write/delete lost its race (the lease is not what we expected)."""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class LeaseInfo:
    run_id: str
    host: str
    pid: int
    started: float  # unix time
    heartbeat: float  # unix time of the last renewal

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return (f"run {self.run_id} on host {self.host} (pid {self.pid}), started {started}, "
                f"last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago")


# ----------------------------------------------------------------------------- storage backends

class _S3Store:
    """The lease object on S3, changed only with conditional requests (version = ETag)."""

    def __init__(self, loc: Location):
        self.bucket, _, self.key = loc.path.partition("/")
        self.client = s3_client()

    @staticmethod
    def _code(exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def read(self) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise StorageError(f"cannot read the lease s3://{self.bucket}/{self.key}: {exc}") from exc
        return obj["Body"].read(), obj["ETag"]

    def write(self, body: bytes, expected: str | None) -> str:
        """Create (``expected=None``) or replace the version ``expected``; returns the new version."""
        cond = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **cond)["ETag"]
        except Exception as exc:
            # 412: the precondition failed; 409: a concurrent conditional write won.
            if self._code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise _Conflict() from exc
            raise StorageError(f"cannot write the lease s3://{self.bucket}/{self.key}: {exc}") from exc

    def delete(self, expected: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=expected)
        except Exception as exc:
            code = self._code(exc)
            if code in ("PreconditionFailed", "412"):
                raise _Conflict() from exc
            if code in ("NoSuchKey", "404"):
                return
            raise StorageError(f"cannot delete the lease s3://{self.bucket}/{self.key}: {exc}") from exc


class _LocalStore:
    """The lease file on a local disk (version = hash of its content)."""

    def __init__(self, loc: Location):
        self.path = loc.path
        self.lock_path = os.path.join(os.path.dirname(loc.path), "_lease.lock")

    @staticmethod
    def _version(body: bytes) -> str:
        return hashlib.sha256(body).hexdigest()

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None
        return body, self._version(body)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _temp(self, body: bytes) -> str:
        tmp = f"{self.path}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def write(self, body: bytes, expected: str | None) -> str:
        tmp = self._temp(body)
        try:
            if expected is None:
                try:
                    os.link(tmp, self.path)  # atomic create-if-absent, with the content complete
                except FileExistsError as exc:
                    raise _Conflict() from exc
            else:
                with self._locked():
                    current = self.read()
                    if current is None or current[1] != expected:
                        raise _Conflict()
                    os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return self._version(body)

    def delete(self, expected: str) -> None:
        with self._locked():
            current = self.read()
            if current is None:
                return
            if current[1] != expected:
                raise _Conflict()
            os.unlink(self.path)


# ----------------------------------------------------------------------------- the lease

class OutputLease:
    """Hold ``<root>/_lease.json`` for one run: ``acquire``, heartbeat thread, ``release``.

    Use as a context manager (acquire + heartbeat on enter, release on exit); :meth:`check`
    raises :class:`LeaseLostError` once a renewal found the lease taken over.
    """

    def __init__(self, root: Location, run_id: str | None = None, stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S, log: Callable[[str], None] | None = None):
        if heartbeat_s >= stale_after_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be well below stale_after_s ({stale_after_s})")
        self.root = root
        self.loc = root.child(LEASE)
        self.run_id = run_id or new_run_id()
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.log = log or (lambda _msg: None)
        self.host = socket.gethostname()
        self.started = time.time()
        self.taken_over: LeaseInfo | None = None  # the stale lease this run replaced, if any
        self._store = _S3Store(self.loc) if self.loc.is_s3 else _LocalStore(self.loc)
        self._version: str | None = None
        self._lost: LeaseLostError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()  # renewals (thread) vs release (driver)

    # -- helpers
    def _body(self) -> bytes:
        info = LeaseInfo(self.run_id, self.host, os.getpid(), self.started, time.time())
        return json.dumps(asdict(info), sort_keys=True).encode()

    @staticmethod
    def _parse(body: bytes) -> LeaseInfo | None:
        try:
            return LeaseInfo(**json.loads(body.decode()))
        except (ValueError, TypeError):
            return None

    def stale_reason(self, info: LeaseInfo | None, now: float | None = None) -> str | None:
        """Why ``info`` may be taken over (None: it is live)."""
        now = time.time() if now is None else now
        if info is None:
            return "the lease file is unreadable"
        age = now - info.heartbeat
        if age > self.stale_after_s:
            return f"its last heartbeat was {age:.0f} s ago (> {self.stale_after_s:.0f} s)"
        if info.host == self.host and not _pid_alive(info.pid):
            return f"its process {info.pid} on this host is gone"
        return None

    # -- protocol
    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeldError` naming the live holder."""
        ensure_dir(self.root)
        for _ in range(5):  # each round loses only to a concurrent change; retry with fresh state
            current = self._store.read()
            try:
                if current is None:
                    self._version = self._store.write(self._body(), None)
                    return
                body, version = current
                info = self._parse(body)
                reason = self.stale_reason(info)
                if reason is None:
                    raise LeaseHeldError(
                        f"output {self.root.uri!r} is being written by another caption job: "
                        f"{info.describe(time.time())}. Two runs on one output would caption everything twice. "
                        f"Wait for that run to finish (or stop it); if it died, its lease expires "
                        f"{self.stale_after_s:.0f} s after its last heartbeat and a rerun takes over."
                    )
                self._version = self._store.write(self._body(), version)
                self.taken_over = info
                self.log(f"[caption] took over the lease of {info.describe(time.time()) if info else 'a dead run'}: "
                         f"{reason}")
                return
            except _Conflict:
                time.sleep(0.2)
        raise LeaseHeldError(f"could not take the lease of {self.root.uri!r}: other runs keep changing it")

    def renew(self) -> None:
        """Refresh the heartbeat; marks the lease lost if another run replaced it."""
        with self._io:
            if self._version is None or self._lost is not None:
                return
            try:
                self._version = self._store.write(self._body(), self._version)
            except _Conflict:
                current = self._store.read()
                holder = self._parse(current[0]) if current else None
                who = holder.describe(time.time()) if holder else "nobody (deleted)"
                self._lost = LeaseLostError(
                    f"the lease of {self.root.uri!r} was taken over while this run ({self.run_id}) held it; "
                    f"it is now held by {who}. This run stops writing; rerun once the other run is done."
                )
                self._version = None

    def check(self) -> None:
        if self._lost is not None:
            raise self._lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._io:
            if self._version is None:
                return
            try:
                self._store.delete(self._version)
            except _Conflict:
                pass  # someone took it over: it is theirs now
            self._version = None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as exc:  # a storage hiccup: retry at the next beat
                self.log(f"[caption] warning: lease heartbeat failed ({exc}); retrying in {self.heartbeat_s:.0f} s")
            if self._lost is not None:
                self.log(f"[caption] error: {self._lost}")
                return

    def __enter__(self) -> "OutputLease":
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="caption-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # exists, owned by someone else
    # A zombie (killed, not yet reaped by its parent) no longer runs.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
