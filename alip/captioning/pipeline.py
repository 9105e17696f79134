"""The Ray side of the caption job (the only module of the job that imports Ray).

    prepare tasks (CPU)          read + decode + resize + processor  -> (rows, model inputs)
    caption actors (GPU/CPU)     generate on slices of the model inputs -> captions
    finish tasks (CPU)           build + commit the unit's data and rejects files

driven by :class:`CaptionScheduler`, a loop in the driver over ``ray.wait``.

Why not Ray Data's ``map_batches(ActorPoolStrategy)`` (what this module used before): on a
spot cluster it hangs. With ``ActorPoolStrategy(min_size=1, max_size=2)`` on two nodes, losing
one node leaves the operator waiting for the lost actor's slot (Ray Data 2.60 restarts the
actor -- ``max_restarts=-1`` -- and the restarted actor is pending forever for resources that
are gone; the operator logs "Cluster resources are not enough to run any task" and never
hands the queued blocks to the surviving actor). Its actor retries are also unbounded
(``max_task_retries=-1``), so a unit that crashes its worker is retried forever, and it gives
no hook to stop sending work to a node that is being drained. Here every decision is ours:

* **Node loss**: actors run with ``max_restarts=0``: a dead actor is dropped from the pool
  and a replacement is requested; work goes on with the actors that are alive (a pending
  replacement never blocks anything). Chunks it had in flight are re-queued without counting
  an attempt when its node died. Prepared inputs lost with a node are rebuilt from lineage
  (tasks have ``max_retries``).
* **Preemption drain**: the driver polls the nodes being drained (Ray's drain API, which
  ``alip spot-watch`` and the autoscaler use); actors there get no new chunks, finish what
  they hold and are retired; Ray places their replacements (and new tasks) elsewhere.
* **Poison units**: see :mod:`alip.captioning.ledger` (``--max-unit-attempts``). A unit whose
  *prepare* task crashes its worker (a segfaulting decoder, an OOM kill) is isolated the same
  way: its rows are probed one by one in tasks the driver retries itself, a row that keeps
  crashing becomes a reject ("decode failed N time(s) on this image: ..."), and the unit is
  prepared again without it (see ``_on_prepare_crashed``).
* **Busy GPUs**: actors only run ``generate_prepared`` on ready arrays. The driver keeps
  ``depth`` calls queued per actor so the next batch is already there when one ends, and
  decode/prepare and commit/upload run in CPU tasks in parallel.

Exactly once: a unit is committed by one finish task, from captions held by the driver; a
re-run finish rewrites the same files with the same content (write_unit is atomic).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from alip.captioners import CaptionerConfig, load_captioner
from alip.captioning.config import CaptionJobConfig
from alip.captioning.ledger import CaptionLedger, Chunk
from alip.captioning.plan import OutputLayout, WorkUnit, read_unit
from alip.captioning.stages import finish_unit, prepare_table, prepare_unit

log = logging.getLogger(__name__)

#: Test/debug hook: a folder where every captioning process appends the keys it captions
#: to ``<pid>.keys`` (one line per key, flushed per call) and its Ray node id to ``<pid>.node``.
CALL_LOG_ENV = "ALIP_CAPTION_CALL_LOG"
#: Test hook: comma-separated keys on which a caption actor process kills itself (``os._exit``),
#: standing in for a captioner that segfaults or is OOM-killed on some image.
CRASH_ON_KEYS_ENV = "ALIP_CAPTION_CRASH_ON_KEYS"
#: Test hook: comma-separated keys on which a prepare (decode) task process kills itself,
#: standing in for a corrupt image that segfaults a native decoder (stages.prepare_table).
DECODE_CRASH_ON_KEYS_ENV = "ALIP_DECODE_CRASH_ON_KEYS"


#: Transient storage errors worth trying again (substrings of the message); anything else
#: (a missing or corrupt shard, a bad model) fails the same way again and fails the job loudly.
TRANSIENT_ERRORS = ["NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                    "REQUEST_TIMEOUT", "Connection reset", "Connection refused", "timed out"]


def with_transient_retries(fn, *args, attempts: int = 4, backoff_s: float = 1.0):
    """``fn(*args)``, retried with backoff while it fails with a :data:`TRANSIENT_ERRORS` error."""
    for attempt in range(attempts):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised unless transient
            if attempt == attempts - 1 or not any(t in str(exc) for t in TRANSIENT_ERRORS):
                raise
            log.warning("transient storage error (%s), retrying in %.0f s", exc, backoff_s * 2 ** attempt)
            time.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


def prepare_task(item: dict, captioner: CaptionerConfig, max_pixels: int, skip: dict[int, str] | None = None,
                 crash_on_keys: frozenset[str] = frozenset()):
    """Ray task body: ``(rows, inputs, info)``; ``info`` is the small part the driver reads.
    ``skip``: rows that crashed the decode before (row -> reject reason), not decoded again."""
    unit = WorkUnit.from_item(item)
    rows, inputs = with_transient_retries(prepare_unit, unit, captioner, max_pixels,
                                          max(captioner.batch_size, 64), skip, crash_on_keys)
    reasons = rows.column("_reject").to_pylist()
    keys = rows.column("key").to_pylist()
    good_keys = [k for k, r in zip(keys, reasons) if r is None]
    return rows, inputs, {"unit": unit.name, "good_keys": good_keys, "node": _node_id()}


def read_task(item: dict):
    """Ray task body: a unit's raw rows (reading never crashes on an image; the probes share them)."""
    return with_transient_retries(read_unit, WorkUnit.from_item(item))


def probe_task(table, row: int, name: str, captioner: CaptionerConfig, max_pixels: int,
               crash_on_keys: frozenset[str] = frozenset()) -> bool:
    """Ray task body: prepare one row of a unit alone, exactly as the unit's prepare would; the
    answer only says that the process survived (the row's own reject reason, if any, comes from
    the unit's prepare later)."""
    prepare_table(table.slice(row, 1), name, captioner, max_pixels, 1, None, crash_on_keys)
    return True


def finish_task(output: str, name: str, rows, captions: list, failures: dict, captioner_name: str) -> dict:
    """Ray task body: commit one unit (off the caption actors' critical path)."""
    return with_transient_retries(finish_unit, OutputLayout(output), name, rows, captions, failures, captioner_name)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class CaptionActor:
    """One captioner (weights loaded once, in ``__init__``) that only generates."""

    def __init__(self, captioner: CaptionerConfig, threads: int, call_log: str | None = None,
                 crash_on_keys: tuple[str, ...] = ()):
        import torch

        torch.set_num_threads(threads)
        self.captioner = load_captioner(captioner)
        self.crash_on_keys = frozenset(crash_on_keys)
        self.call_log = os.path.join(call_log, f"{os.getpid()}.keys") if call_log else None
        self.generate_s = 0.0  # wall time inside generate_prepared (the bench's numerator)
        self.calls = 0
        self.started = time.perf_counter()  # weights loaded: the actor's working life starts
        if self.call_log:
            os.makedirs(call_log, exist_ok=True)
            with open(os.path.join(call_log, f"{os.getpid()}.node"), "w") as f:
                f.write(_node_id())
            open(self.call_log, "a").close()  # the file's existence announces this process

    def where(self) -> dict:
        return {"node": _node_id(), "pid": os.getpid()}

    def generate(self, inputs: dict, start: int, stop: int, keys: list[str]) -> list[str]:
        if self.crash_on_keys.intersection(keys):
            os._exit(3)  # test hook: a captioner that takes its process down on this image
        t0 = time.perf_counter()
        captions = self.captioner.generate_prepared({k: v[start:stop] for k, v in inputs.items()})
        self.generate_s += time.perf_counter() - t0
        self.calls += 1
        if self.call_log:
            with open(self.call_log, "a") as f:
                f.write("".join(k + "\n" for k in keys))
        return captions

    def stats(self) -> dict:
        """Where this actor's time went since its weights loaded (bench/bench_caption.py)."""
        return {"pid": os.getpid(), "generate_s": self.generate_s, "calls": self.calls,
                "alive_s": time.perf_counter() - self.started}


def ensure_ray(address: str | None) -> bool:
    """Attach to ``address`` / $RAY_ADDRESS, else start a private local Ray (alip.ray_setup says
    which); True if this call connected."""
    from alip.ray_setup import connect_ray

    return connect_ray(address)


def remote_options(cfg: CaptionJobConfig) -> dict[str, dict]:
    """The Ray options of the job's actors and tasks (the scheduler uses exactly these)."""
    return {
        # A dead actor is never restarted by Ray and its calls are never retried by Ray: the
        # scheduler replaces it and decides per call (node lost: re-queue; crash: count an attempt).
        "actor": dict(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor, max_restarts=0,
                      max_task_retries=0),
        # System failures (a worker or node lost) re-run a task, and lineage rebuilds outputs lost
        # with a node; application errors are not retried (a bad shard fails the same way again).
        # Ray cannot tell a worker that crashed on an image from one lost with its node, so it
        # gets few retries (each one crashes again on a poison image): when they are spent the
        # driver sees NodeDiedError (node loss: prepared again, not counted) or a worker crash
        # (counted against the unit's rows, which are then probed one by one).
        "prepare": dict(num_cpus=cfg.decode_cpus, num_returns=3, max_retries=2, retry_exceptions=False),
        "read": dict(num_cpus=cfg.decode_cpus, max_retries=2, retry_exceptions=False),
        # One row alone: the driver decides every retry (crash: counted; node lost: free).
        "probe": dict(num_cpus=cfg.decode_cpus, max_retries=0, retry_exceptions=False),
        "finish": dict(num_cpus=min(cfg.decode_cpus, 0.25), max_retries=4, retry_exceptions=False),
    }


@dataclass(eq=False)  # identity: actors are dict keys and list members
class _Actor:
    handle: object
    ready_ref: object
    node: str | None = None
    pid: int | None = None
    inflight: list = field(default_factory=list)  # [(ref, chunk)] in submission order
    retiring: bool = False


@dataclass
class _Prepared:
    refs: tuple | None  # (rows, inputs, info) object refs; None while probing rows after a crash
    good_keys: list[str] | None = None
    skip: dict[int, str] = field(default_factory=dict)  # rows given up on: decode crashed them
    crashes: int = 0  # whole-unit prepares that crashed their worker
    probes: CaptionLedger | None = None  # attempts per row while isolating a crash (probe index = row)
    probe_rows: list[int] = field(default_factory=list)  # probe index -> row of the unit
    table_ref: object = None  # the unit's raw rows, shared by its probes
    probing: dict = field(default_factory=dict)  # probe ref -> Chunk (one row)


class CaptionScheduler:
    """Drives the units of one job through prepare tasks, caption actors and finish tasks."""

    #: calls queued per actor: one running + the next, so the actor never waits on the driver
    DEPTH = 2
    #: how often the driver re-reads which nodes are alive or draining (seconds)
    NODE_POLL_S = 1.0
    #: a job with no actor able to run this long gets a warning (then every time again)
    STALL_WARN_S = 60.0
    #: actors that die in __init__ on a live node this many times in a row: the model is broken
    MAX_INIT_FAILURES = 3

    def __init__(self, cfg: CaptionJobConfig, captioner: CaptionerConfig, units: list[WorkUnit],
                 on_unit: Callable[[dict], None], say: Callable[[str], None] = print):
        import ray

        self.ray = ray
        self.cfg = cfg
        self.captioner = captioner
        self.units = {u.name: u for u in units}
        self.todo = [u.name for u in units]  # not yet submitted for preparing
        self.on_unit = on_unit
        self.say = say
        self.ledger = CaptionLedger(chunk_rows=captioner.batch_size, max_attempts=cfg.max_unit_attempts)
        self.target_actors = max(cfg.min_actors, min(cfg.max_actors, len(units)))
        self.prefetch = 2 * self.target_actors + 1  # units prepared ahead (bounds memory)
        self.actors: list[_Actor] = []
        self.prepared: dict[str, _Prepared] = {}  # submitted or ready, not yet finished
        self.finishing: dict[object, str] = {}  # finish ref -> unit
        self.events = {"nodes_lost": set(), "actors_lost": 0, "actors_retired": 0, "chunks_requeued": 0,
                       "chunk_failures": 0, "rows_poisoned": 0, "prepare_crashes": 0}
        self.generate_stats: list[dict] = []
        self.suspects: dict = {}  # unreachable actors being probed (see _suspect)
        self._init_failures = 0
        self.first_caption_s: float | None = None  # start-up: until the first captions come back
        self.first_caption_rows = 0
        self._alive: set[str] = set()
        self._draining: set[str] = set()
        self._last_poll = 0.0
        call_log = os.environ.get(CALL_LOG_ENV) or None
        crash = tuple(k for k in os.environ.get(CRASH_ON_KEYS_ENV, "").split(",") if k)
        options = remote_options(cfg)
        self._actor_cls = ray.remote(CaptionActor).options(**options["actor"])
        self._actor_args = (captioner, cfg.threads, call_log, crash)
        self._prepare = ray.remote(prepare_task).options(**options["prepare"])
        self._read = ray.remote(read_task).options(**options["read"])
        self._probe = ray.remote(probe_task).options(**options["probe"])
        self._decode_crash = frozenset(k for k in os.environ.get(DECODE_CRASH_ON_KEYS_ENV, "").split(",") if k)
        self._finish = ray.remote(finish_task).options(**options["finish"])

    # -- cluster state ---------------------------------------------------------------------------
    def _poll_nodes(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_poll < self.NODE_POLL_S:
            return
        self._last_poll = now
        self._alive = {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")}
        try:
            from ray._private.state import state

            self._draining = set(state.get_draining_nodes())
        except Exception as exc:  # noqa: BLE001 - a private API: degrade to "no drains" loudly
            log.warning("cannot read draining nodes (%s); drains are not honoured", exc)
            self._draining = set()

    def _spawn(self) -> None:
        handle = self._actor_cls.remote(*self._actor_args)
        self.actors.append(_Actor(handle=handle, ready_ref=handle.where.remote()))

    def _drop(self, actor: _Actor) -> None:
        self.actors.remove(actor)
        if actor.node is not None:  # an actor that never started has no stats (and would block)
            try:
                self.generate_stats.append(self.ray.get(actor.handle.stats.remote(), timeout=5))
            except Exception:  # noqa: BLE001 - a dead actor has no stats
                pass
        self.ray.kill(actor.handle, no_restart=True)

    def _submit_prepare(self, name: str) -> None:
        entry = self.prepared.setdefault(name, _Prepared(refs=None))
        entry.refs = tuple(self._prepare.remote(self.units[name].to_item(), self.captioner, self.cfg.max_pixels,
                                                entry.skip or None, self._decode_crash))

    # -- results ---------------------------------------------------------------------------------
    def _on_prepared(self, name: str) -> None:
        from ray.exceptions import NodeDiedError, OutOfMemoryError, WorkerCrashedError

        entry = self.prepared[name]
        try:
            info = self.ray.get(entry.refs[2])  # raises the task's error: a bad shard fails the job loudly
        except (WorkerCrashedError, OutOfMemoryError, NodeDiedError) as exc:
            self._on_prepare_crashed(name, exc)
            return
        entry.good_keys = info["good_keys"]
        self.ledger.add_unit(name, len(info["good_keys"]))
        self._maybe_finish(name)

    def _maybe_finish(self, name: str) -> None:
        if not self.ledger.is_complete(name):
            return
        captions, failures = self.ledger.pop_unit(name)
        rows_ref = self.prepared[name].refs[0]
        ref = self._finish.remote(self.cfg.output, name, rows_ref, captions, failures, self.captioner.name)
        self.finishing[ref] = name

    def _on_chunk(self, actor: _Actor, ref, chunk: Chunk) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        actor.inflight = [(r, c) for r, c in actor.inflight if r != ref]
        try:
            captions = self.ray.get(ref)
        except ActorUnavailableError as exc:
            self._suspect(actor, exc, first=(ref, chunk))
            return
        except RayActorError as exc:
            self._on_actor_died(actor, exc, first=(ref, chunk))
            return
        except RayTaskError as exc:
            self._order.pop(ref, None)
            # The captioner raised on this batch (the actor lives): isolate the rows like a crash.
            self._chunk_failed(chunk, f"captioner error: {_first_line(exc.cause if exc.cause else exc)}")
            return
        except Exception as exc:  # noqa: BLE001 - e.g. its input object could not be rebuilt
            self._order.pop(ref, None)
            self._chunk_failed(chunk, f"{type(exc).__name__}: {_first_line(exc)}")
            return
        self._order.pop(ref, None)
        self.ledger.succeeded(chunk, captions)
        if self.first_caption_s is None:
            self.first_caption_s = time.perf_counter() - self._t0
            self.first_caption_rows = chunk.rows
        self._maybe_finish(chunk.unit)

    # A prepare task that takes its worker down (after Ray's own retries) is isolated like a
    # crashing caption batch: the unit's rows are probed one at a time, each probe's crash
    # counted against its row (CaptionLedger, stage "decode"), and a row that has crashed
    # --max-unit-attempts times becomes a reject. Then the unit is prepared again without those
    # rows. A node loss is nobody's fault: the unit is prepared again as it was.
    def _on_prepare_crashed(self, name: str, exc: Exception) -> None:
        from ray.exceptions import NodeDiedError

        entry = self.prepared[name]
        entry.refs = None
        if isinstance(exc, NodeDiedError):
            self.say(f"[caption] unit {name}: its prepare task's node is gone; preparing it again")
            self._submit_prepare(name)
            return
        entry.crashes += 1
        self.events["prepare_crashes"] += 1
        if entry.crashes > self.cfg.max_unit_attempts:
            # Every row alone survived, yet the unit (its batch processing) keeps crashing.
            raise RuntimeError(f"unit {name}: preparing it crashed the worker {entry.crashes} times although no "
                               f"single image does ({type(exc).__name__}: {_first_line(exc)})")
        if not self.units[name].rows:
            raise RuntimeError(f"unit {name}: its prepare task crashed and its row count is unknown") from exc
        rows = [i for i in range(self.units[name].rows) if i not in entry.skip]
        reason = f"decode crashed the worker: {type(exc).__name__}"
        self.say(f"[caption] unit {name}: preparing it crashed the worker ({type(exc).__name__}); "
                 f"decoding its {len(rows)} row(s) one by one to find the image at fault")
        entry.probes = CaptionLedger(chunk_rows=max(1, len(rows)), max_attempts=self.cfg.max_unit_attempts,
                                     stage="decode")
        entry.probe_rows = rows
        entry.probes.add_unit(name, len(rows))
        whole = entry.probes.next_chunk()
        if whole is not None:
            self._probe_failed(name, whole, reason)
        entry.table_ref = self._read.remote(self.units[name].to_item())
        self._submit_probes(name)

    def _submit_probes(self, name: str) -> None:
        entry = self.prepared[name]
        while (chunk := entry.probes.next_chunk()) is not None:
            ref = self._probe.remote(entry.table_ref, entry.probe_rows[chunk.start], name, self.captioner,
                                     self.cfg.max_pixels, self._decode_crash)
            entry.probing[ref] = chunk
        if entry.probes.is_complete(name):
            _captions, failures = entry.probes.pop_unit(name)
            entry.skip.update({entry.probe_rows[j]: why for j, why in failures.items()})
            entry.probes, entry.probe_rows, entry.table_ref = None, [], None
            self._submit_prepare(name)

    def _probe_failed(self, name: str, chunk: Chunk, reason: str) -> None:
        outcome = self.prepared[name].probes.failed(chunk, reason)
        if outcome == "rejected":
            self.events["rows_poisoned"] += 1
            row = self.prepared[name].probe_rows[chunk.start]
            self.say(f"[caption] unit {name}: giving up on row {row} after {self.cfg.max_unit_attempts} "
                     f"attempt(s): {reason}")

    def _on_probe(self, name: str, ref) -> None:
        from ray.exceptions import NodeDiedError, OutOfMemoryError, WorkerCrashedError

        entry = self.prepared[name]
        chunk = entry.probing.pop(ref)
        try:
            self.ray.get(ref)  # any other error (e.g. storage) fails the job, as in the unit's prepare
        except NodeDiedError:
            entry.probes.lost(chunk)
        except (WorkerCrashedError, OutOfMemoryError) as exc:
            self._probe_failed(name, chunk, f"decode crashed the worker: {type(exc).__name__}")
        else:
            entry.probes.succeeded(chunk, [""])
        self._submit_probes(name)

    def _on_probation(self, chunk: Chunk) -> bool:
        """A single row retried after a crash runs alone on its actor (nothing queued before or
        after it): then a crash is surely its own. With calls queued, Ray may fail a call that had
        finished (its reply not yet read) together with the one that crashed, and the wrong row
        would be blamed."""
        return chunk.rows == 1 and self.ledger.attempts(chunk.unit)[chunk.start] > 0

    def _chunk_failed(self, chunk: Chunk, reason: str) -> None:
        self.events["chunk_failures"] += 1
        outcome = self.ledger.failed(chunk, reason)
        if outcome == "rejected":
            self.events["rows_poisoned"] += 1
            self.say(f"[caption] unit {chunk.unit}: giving up on good row {chunk.start} after "
                     f"{self.cfg.max_unit_attempts} attempt(s): {reason}")
        elif outcome == "split" and self.cfg.progress:
            self.say(f"[caption] unit {chunk.unit}: rows {chunk.start}-{chunk.stop - 1} failed ({reason}); "
                     "retrying them one by one")
        self._maybe_finish(chunk.unit)

    # An actor that stops answering (ActorUnavailableError) may be dead (crashed, or its node is
    # gone -- Ray notices a lost node only after its health checks fail) or only slow to reach.
    # It gets no work and is probed until that is clear, so a node loss is not blamed on the rows.
    SUSPECT_TIMEOUT_S = 60.0

    def _suspect(self, actor: _Actor, exc: Exception, first=None) -> None:
        if actor not in self.actors:
            return
        self.actors.remove(actor)
        pending = ([first] if first else []) + actor.inflight
        actor.inflight = []
        self.suspects[actor] = {"since": time.monotonic(), "pending": pending, "exc": exc,
                                "probe": actor.handle.where.remote(), "probe_at": time.monotonic()}

    def _check_suspects(self, ready: set) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError

        for actor, info in list(self.suspects.items()):
            if actor.node not in self._alive or actor.node in self._draining:
                del self.suspects[actor]
                self._settle(actor, info["exc"], info["pending"], node_gone=True)
                continue
            if info["probe"] is None:
                if time.monotonic() - info["probe_at"] >= 1.0:
                    info["probe"], info["probe_at"] = actor.handle.where.remote(), time.monotonic()
                continue
            if info["probe"] not in ready:
                continue
            try:
                self.ray.get(info["probe"])
            except ActorUnavailableError as exc:
                info["probe"], info["exc"] = None, exc
                if time.monotonic() - info["since"] > self.SUSPECT_TIMEOUT_S:
                    del self.suspects[actor]
                    self.ray.kill(actor.handle, no_restart=True)
                    self._settle(actor, exc, info["pending"], node_gone=False)
                continue
            except RayActorError as exc:
                del self.suspects[actor]
                self._poll_nodes(force=True)
                self._settle(actor, exc, info["pending"], node_gone=self._node_gone(actor, exc))
                continue
            # It answers again: whatever it was running may or may not have run; run it again.
            del self.suspects[actor]
            self.actors.append(actor)
            for _ref, chunk in info["pending"]:
                self.events["chunks_requeued"] += 1
                self.ledger.lost(chunk)

    def _node_gone(self, actor: _Actor, exc: Exception) -> bool:
        if getattr(exc, "preempted", False):
            return True
        if actor.node is not None and (actor.node not in self._alive or actor.node in self._draining):
            return True
        return bool(_NODE_DIED.search(str(exc)))

    def _on_actor_died(self, actor: _Actor, exc: Exception, first=None) -> None:
        """An actor is gone: re-queue its chunks; count the one it was running unless its node died."""
        if actor not in self.actors:
            return
        self.actors.remove(actor)
        self._poll_nodes(force=True)
        pending = ([first] if first else []) + actor.inflight
        actor.inflight = []
        self._settle(actor, exc, pending, node_gone=self._node_gone(actor, exc))

    def _settle(self, actor: _Actor, exc: Exception, pending: list, node_gone: bool) -> None:
        # Submission order, not the order ray.wait reported the failures in: the oldest call is
        # the one the actor was running (calls run one at a time, in order).
        pending.sort(key=lambda rc: self._order.pop(rc[0], 0))
        # Calls that finished before the actor died (their results not yet read) are not lost.
        unfinished = []
        for ref, chunk in pending:
            try:
                if self.ray.wait([ref], timeout=0)[0]:
                    captions = self.ray.get(ref)
                    self.ledger.succeeded(chunk, captions)
                    self._maybe_finish(chunk.unit)
                    continue
            except Exception:  # noqa: BLE001 - failed with the actor: handled below
                pass
            unfinished.append((ref, chunk))
        pending = unfinished
        self.events["actors_lost"] += 1
        if node_gone:
            self.events["nodes_lost"].add(actor.node)
        self.say(f"[caption] caption actor pid {actor.pid} on node {str(actor.node)[:8]} died "
                 f"({'its node is gone' if node_gone else 'worker crashed'}: {type(exc).__name__}); "
                 f"{len(pending)} call(s) re-queued, {len(self.actors)} actor(s) left")
        for i, (_ref, chunk) in enumerate(pending):
            if i == 0 and not node_gone:
                # Calls run in order, one at a time: only the oldest one was running when it died.
                self._chunk_failed(chunk, f"caption worker crashed: {_first_line(exc)}")
            else:
                self.events["chunks_requeued"] += 1
                self.ledger.lost(chunk)

    def _on_actor_ready(self, actor: _Actor) -> None:
        from ray.exceptions import RayActorError

        try:
            where = self.ray.get(actor.ready_ref)
        except RayActorError as exc:
            self.actors.remove(actor)
            self._poll_nodes(force=True)
            if getattr(exc, "actor_init_failed", False):
                self._init_failures += 1
                if self._init_failures >= self.MAX_INIT_FAILURES:
                    raise RuntimeError(f"caption actors fail to start ({self._init_failures} in a row): "
                                       f"{exc}") from exc
            return
        self._init_failures = 0
        actor.ready_ref = None
        actor.node, actor.pid = where["node"], where["pid"]

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            # Whatever happened, leave no actor behind: they hold a cluster's CPUs/GPUs.
            for actor in self.actors + list(self.suspects):
                try:
                    self.ray.kill(actor.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.actors, self.suspects = [], {}

    def _run(self) -> dict:
        self._order: dict = {}
        self._seq = 0
        self._t0 = time.perf_counter()
        stalled_since = None
        self._poll_nodes(force=True)
        while self.todo or self.prepared:
            self._poll_nodes()
            # Retire actors on draining nodes once their calls are done; replace lost actors.
            for actor in list(self.actors):
                if actor.node in self._draining and not actor.retiring:
                    actor.retiring = True
                    self.say(f"[caption] node {actor.node[:8]} is draining: actor pid {actor.pid} gets no new "
                             "work and is replaced")
                if actor.retiring and not actor.inflight:
                    self.events["actors_retired"] += 1
                    self._drop(actor)
            while len(self.actors) < self.target_actors:
                self._spawn()
            # Prepare ahead, bounded.
            while self.todo and len(self.prepared) < self.prefetch:
                self._submit_prepare(self.todo.pop(0))
            # Feed every ready actor up to DEPTH calls.
            for actor in self.actors:
                while actor.node and not actor.retiring and len(actor.inflight) < self.DEPTH:
                    if any(self._on_probation(c) for _r, c in actor.inflight):
                        break
                    chunk = self.ledger.next_chunk()
                    if chunk is None:
                        break
                    if self._on_probation(chunk) and actor.inflight:
                        self.ledger.lost(chunk)  # back to the front of the queue: it waits for an idle actor
                        break
                    keys = self.prepared[chunk.unit].good_keys[chunk.start:chunk.stop]
                    ref = actor.handle.generate.remote(self.prepared[chunk.unit].refs[1], chunk.start, chunk.stop,
                                                       keys)
                    self._seq += 1
                    self._order[ref] = self._seq
                    actor.inflight.append((ref, chunk))
            # Wait for anything.
            waiting: dict = {}
            for name, entry in self.prepared.items():
                if entry.good_keys is None and entry.refs is not None:
                    waiting[entry.refs[2]] = ("prepared", name)
                for ref in entry.probing:
                    waiting[ref] = ("probe_row", name)
            for actor in self.actors:
                if actor.ready_ref is not None:
                    waiting[actor.ready_ref] = ("ready", actor)
                for ref, chunk in actor.inflight:
                    waiting[ref] = ("chunk", actor, chunk)
            for ref, name in self.finishing.items():
                waiting[ref] = ("finished", name)
            for info in self.suspects.values():
                if info["probe"] is not None:
                    waiting[info["probe"]] = ("probe", None)
            if not waiting:
                # Only suspects between probes may be left (all remaining work is theirs): they are
                # re-probed, or settled once their node is known dead, by _check_suspects alone.
                time.sleep(0.05)
                if self.suspects:
                    self._poll_nodes()
                    self._check_suspects(set())
                continue
            ready, rest = self.ray.wait(list(waiting), num_returns=1, timeout=self.NODE_POLL_S)
            if ready and rest:  # take everything else that is done too
                ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            if self.suspects:
                self._poll_nodes()
                self._check_suspects(set(ready))
            for ref in ready:
                kind, *args = waiting[ref]
                if kind == "prepared":
                    self._on_prepared(args[0])
                elif kind == "probe_row":
                    self._on_probe(args[0], ref)
                elif kind == "ready":
                    if args[0] in self.actors:
                        self._on_actor_ready(args[0])
                elif kind == "chunk":
                    if args[0] in self.actors and any(r == ref for r, _ in args[0].inflight):
                        self._on_chunk(args[0], ref, args[1])
                elif kind == "probe":
                    pass  # handled by _check_suspects above
                elif kind == "finished":
                    name = self.finishing.pop(ref)
                    row = self.ray.get(ref)  # a failed commit fails the job (after Ray's retries)
                    del self.prepared[name]
                    self.on_unit(row)
            # No actor able to work for a long time: say so (an autoscaler may still add nodes).
            if any(a.node for a in self.actors) or not (self.ledger.queued or self.todo):
                stalled_since = None
            elif stalled_since is None:
                stalled_since = time.monotonic()
            elif time.monotonic() - stalled_since > self.STALL_WARN_S:
                self.say(f"[caption] waiting for resources: none of {len(self.actors)} caption actor(s) "
                         f"({self.cfg.cpus_per_actor} CPU, {self.cfg.gpus_per_actor} GPU each) could start for "
                         f"{self.STALL_WARN_S:.0f} s; the job goes on when the cluster has room")
                stalled_since = time.monotonic()
        for actor in list(self.actors):
            self._drop(actor)
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in self.events.items()}


#: How Ray words an actor death caused by its node's death (ActorDiedError's message).
_NODE_DIED = re.compile(r"node (has )?died|node .*(is|was) (dead|removed|terminated)|preempt", re.IGNORECASE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray's errors start with a generic line; the last line names the actual cause.
    return (lines[-1] if lines else type(exc).__name__)[:300]


def run_pipeline(
    cfg: CaptionJobConfig,
    captioner: CaptionerConfig,
    units: list[WorkUnit],
    on_unit: Callable[[dict], None],
    say: Callable[[str], None] = print,
) -> dict:
    """Caption ``units``; ``on_unit`` gets each unit's summary row as it is committed.

    Returns the run's cluster events (nodes lost, actors lost/retired, chunks failed/re-queued,
    rows given up on), per-actor generate timings (``generate``) and the start-up time until
    the first captions came back (``first_caption_s``, for ``first_caption_rows`` rows).
    """
    scheduler = CaptionScheduler(cfg, captioner, units, on_unit, say)
    events = scheduler.run()
    events["generate"] = scheduler.generate_stats
    events["first_caption_s"] = scheduler.first_caption_s
    events["first_caption_rows"] = scheduler.first_caption_rows
    return events
