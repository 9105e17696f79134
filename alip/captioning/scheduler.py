"""The caption job's scheduler: a loop in the driver over ``ray.wait`` (imports Ray when constructed).

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

* **Pool size**: never more actors than the cluster can hold beside the tasks that feed them
  (:mod:`alip.captioning.pool`: capacity from Ray's node view with one node keeping
  ``decode_cpus + finish_cpus`` free; target = min(max_actors, units left, capacity)). The
  view is re-read every second: a node that joins grows the pool, a lost or drained one shrinks
  it (surplus actors retire when idle), and prepare work that starves beside idle actors makes
  the pool retire one and stay capped until the cluster changes.
* **No silent stall**: when nothing completes for ``--stall-timeout-s`` the driver prints what
  waits for what (tasks, actors, the resources they ask for, each node's free CPUs), then acts:
  it retires an idle actor when the stages starve, re-reads the cluster otherwise, and fails
  with :class:`CaptionJobStalled` when no node can ever hold the work (no autoscaler).
* **Node loss**: actors run with ``max_restarts=0``: a dead actor is dropped from the pool
  and a replacement is requested if the pool's target still allows it; work goes on with the
  actors that are alive (a pending replacement never blocks anything). Chunks it had in flight are re-queued without counting
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

from alip.captioners import CaptionerConfig
from alip.captioning.cluster_view import ClusterView, read_view
from alip.captioning.config import CaptionJobConfig
from alip.captioning.ledger import CaptionLedger, Chunk
from alip.captioning.plan import WorkUnit
from alip.captioning.pool import (
    PoolShape,
    groups_can_grow,
    groups_could_hold,
    pool_capacity,
    pool_target,
    why_no_capacity,
)
from alip.captioning.tasks import (
    CALL_LOG_ENV,
    CRASH_ON_KEYS_ENV,
    DECODE_CRASH_ON_KEYS_ENV,
    CaptionActor,
    finish_task,
    prepare_task,
    probe_task,
    read_task,
    remote_options,
)

log = logging.getLogger(__name__)


class CaptionJobStalled(RuntimeError):
    """The job cannot progress and nothing will change that (the message says what waits for what)."""


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
    #: prepare work waiting this long (at least; or 3x the median prepare time seen) with no stage task
    #: finishing, beside idle actors and no free CPU for it, makes the pool retire an actor
    STARVE_MIN_S = 15.0
    #: actors that die in __init__ on a live node this many times in a row: the model is broken
    MAX_INIT_FAILURES = 3

    def __init__(self, cfg: CaptionJobConfig, captioner: CaptionerConfig, units: list[WorkUnit],
                 on_unit: Callable[[dict], None], say: Callable[[str], None] = print,
                 private_ray: bool = False):
        import ray

        self.ray = ray
        self.cfg = cfg
        self.captioner = captioner
        self.units = {u.name: u for u in units}
        self.todo = [u.name for u in units]  # not yet submitted for preparing
        self.on_unit = on_unit
        self.say = say
        self.ledger = CaptionLedger(chunk_rows=captioner.batch_size, max_attempts=cfg.max_unit_attempts)
        # Pool sizing (alip/captioning/pool.py): recomputed from Ray's view at every node poll.
        options = remote_options(cfg)
        self.shape = PoolShape(cfg.cpus_per_actor, cfg.gpus_per_actor, cfg.decode_cpus,
                               options["finish"]["num_cpus"])
        self.private_ray = private_ray  # nobody can add a node to a private local Ray
        self.view = ClusterView([])
        self.capacity = 0
        self.starvation_cap: int | None = None  # set when prepare work starved; lifted when the cluster changes
        self.target_actors = 0
        self._said_capacity: tuple | None = None
        self._no_capacity_since: float | None = None
        self.actors: list[_Actor] = []
        self.prepared: dict[str, _Prepared] = {}  # submitted or ready, not yet finished
        self.finishing: dict[object, str] = {}  # finish ref -> unit
        self.events = {"nodes_lost": set(), "actors_lost": 0, "actors_retired": 0, "chunks_requeued": 0,
                       "chunk_failures": 0, "rows_poisoned": 0, "prepare_crashes": 0,
                       "pool_shrinks": 0, "stalls": 0}
        self.generate_stats: list[dict] = []
        self.suspects: dict = {}  # unreachable actors being probed (see _suspect)
        self._init_failures = 0
        self.first_caption_s: float | None = None  # start-up: until the first captions come back
        self.first_caption_rows = 0
        self._alive: set[str] = set()
        self._draining: set[str] = set()
        self._last_poll = 0.0
        # Progress clocks: the stall watchdog (anything completed) and the starvation check
        # (a prepare / probe / read / finish task completed).
        self._last_progress = time.monotonic()
        self._last_stage_done = time.monotonic()
        self._stage_seconds: list[float] = []  # how long finished prepare tasks took (submit -> done)
        self._submitted_at: dict = {}  # unit -> when its prepare was submitted
        call_log = os.environ.get(CALL_LOG_ENV) or None
        crash = tuple(k for k in os.environ.get(CRASH_ON_KEYS_ENV, "").split(",") if k)
        self._actor_cls = ray.remote(CaptionActor).options(**options["actor"])
        self._actor_args = (captioner, cfg.threads, call_log, crash)
        self._prepare = ray.remote(prepare_task).options(**options["prepare"])
        self._read = ray.remote(read_task).options(**options["read"])
        self._probe = ray.remote(probe_task).options(**options["probe"])
        self._decode_crash = frozenset(k for k in os.environ.get(DECODE_CRASH_ON_KEYS_ENV, "").split(",") if k)
        self._finish = ray.remote(finish_task).options(**options["finish"])

    # -- cluster state and pool size --------------------------------------------------------------
    def _poll_nodes(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_poll < self.NODE_POLL_S:
            return
        self._last_poll = now
        before = self.view.signature()
        self.view = read_view()
        self._alive, self._draining = self.view.alive, self.view.draining
        if self.view.signature() != before:
            if self.starvation_cap is not None:
                self.say(f"[caption] pool: the cluster changed; lifting the cap of {self.starvation_cap} actor(s)")
            self.starvation_cap = None
        self.capacity = pool_capacity(self.view.nodes, self.shape)

    @property
    def prefetch(self) -> int:
        """Units prepared ahead of the actors (bounds the object store's use)."""
        return 2 * max(1, self.target_actors) + 1

    def _units_left(self) -> int:
        return len(self.todo) + len(self.prepared)

    def _can_grow(self) -> bool:
        """An autoscaler can still add nodes that would hold the pool (Ray's ClusterConfig)."""
        return (not self.private_ray and groups_can_grow(self.view.groups)
                and groups_could_hold(self.view.groups, self.shape))

    def _size_pool(self) -> None:
        """Spawn or retire actors so the pool matches :func:`pool_target` (module docstring)."""
        target = pool_target(self.capacity, self.cfg.max_actors, self._units_left(), self.starvation_cap)
        if self.capacity == 0 and self._units_left():
            self._on_no_capacity()
            if self._can_grow():
                target = 1  # a pending actor is the demand that makes the autoscaler launch a node
        else:
            self._no_capacity_since = None
        self.target_actors = target
        said = (self.capacity, target, len(self.view.nodes))
        if said != self._said_capacity and self._units_left():
            self._said_capacity = said
            below = (f" (below --min-actors {self.cfg.min_actors}: the cluster holds no more beside the decode "
                     "tasks)" if 0 < target < self.cfg.min_actors and target == self.capacity else "")
            self.say(f"[caption] pool: {target} actor(s) of {self.shape.describe_actor()} (capacity {self.capacity} "
                     f"on {len(self.view.nodes) - len(self._draining)} usable node(s), keeping "
                     f"{self.shape.reserve_cpus:g} CPU for decode + commit; max {self.cfg.max_actors})" + below)
        while len(self.actors) < target:
            self._spawn()
        surplus = len(self.actors) - target
        if surplus <= 0:
            return
        # Cheapest first: actors not placed yet, then idle ones; busy ones finish their calls first.
        for actor in sorted(self.actors, key=lambda a: (a.node is not None, len(a.inflight))):
            if surplus <= 0:
                break
            if actor.retiring:
                surplus -= 1
                continue
            actor.retiring = True
            surplus -= 1
            if actor.node is not None:
                self.say(f"[caption] pool: retiring actor pid {actor.pid} on node {actor.node[:8]} "
                         f"(pool target {target})")

    def _on_no_capacity(self) -> None:
        """Capacity 0: wait for a node (autoscaler, or one that joins by hand), or fail when none can come."""
        now = time.monotonic()
        why = why_no_capacity(self.view.nodes, self.shape)
        if self._no_capacity_since is None:
            self._no_capacity_since = now
            if self._can_grow():
                self.say(f"[caption] pool: no usable node can hold the job now ({why}); waiting for the "
                         "autoscaler to add one")
            elif not self.private_ray:
                self.say(f"[caption] pool: no usable node can hold the job now ({why}); no autoscaler is "
                         f"configured: the job fails in {self.cfg.stall_timeout_s:.0f} s unless such a node joins")
        if self._can_grow():
            return
        if self.private_ray or now - self._no_capacity_since > self.cfg.stall_timeout_s:
            where = ("this machine (a private local Ray, which no node can join)" if self.private_ray
                     else "this cluster (no autoscaler, and no node that can hold it joined)")
            raise CaptionJobStalled(f"caption job cannot run on {where}: {why}")

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
        self._submitted_at[name] = time.monotonic()
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
            # Whatever happened, leave no actor or task behind: they hold a cluster's CPUs/GPUs.
            for actor in self.actors + list(self.suspects):
                try:
                    self.ray.kill(actor.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.actors, self.suspects = [], {}
            for ref in self._outstanding_task_refs():
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - finished or gone
                    pass

    def _outstanding_task_refs(self) -> list:
        refs = []
        for entry in self.prepared.values():
            if entry.refs is not None and entry.good_keys is None:
                refs.append(entry.refs[2])
            refs += list(entry.probing)
            if entry.table_ref is not None:
                refs.append(entry.table_ref)
        return refs  # finish tasks are left to end: a commit is atomic and takes a moment

    def _run(self) -> dict:
        self._order: dict = {}
        self._seq = 0
        self._t0 = time.perf_counter()
        self.committed = 0
        self._poll_nodes(force=True)
        while self.todo or self.prepared:
            self._poll_nodes()
            # Retire actors on draining nodes once their calls are done; size the pool to what the
            # cluster holds (replacing lost actors, retiring surplus ones when idle).
            for actor in self.actors:
                if actor.node in self._draining and not actor.retiring:
                    actor.retiring = True
                    self.say(f"[caption] node {actor.node[:8]} is draining: actor pid {actor.pid} gets no new "
                             "work and is replaced")
            self._size_pool()
            for actor in list(self.actors):
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
                # Only suspects between probes (or no actor at all) may be left: suspects are
                # re-probed, or settled once their node is known dead, by _check_suspects alone.
                time.sleep(0.05)
                if self.suspects:
                    self._poll_nodes()
                    self._check_suspects(set())
                self._watch(time.monotonic())
                continue
            ready, rest = self.ray.wait(list(waiting), num_returns=1, timeout=self.NODE_POLL_S)
            if ready and rest:  # take everything else that is done too
                ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            if self.suspects:
                self._poll_nodes()
                self._check_suspects(set(ready))
            now = time.monotonic()
            if ready:
                self._last_progress = now
            for ref in ready:
                kind, *args = waiting[ref]
                if kind in ("prepared", "probe_row", "finished"):
                    self._last_stage_done = now
                if kind == "prepared":
                    if args[0] in self._submitted_at:
                        self._stage_seconds.append(now - self._submitted_at.pop(args[0]))
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
                    self.committed += 1
                    self.on_unit(row)
            self._watch(now)
        for actor in list(self.actors):
            self._drop(actor)
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in self.events.items()}

    # -- starvation and stalls -------------------------------------------------------------------
    def _stage_pending(self) -> dict[str, int]:
        """Stage tasks submitted and not finished, by kind."""
        out = {"prepare": 0, "probe": 0, "finish": len(self.finishing)}
        for entry in self.prepared.values():
            if entry.refs is not None and entry.good_keys is None:
                out["prepare"] += 1
            out["probe"] += len(entry.probing) + (entry.table_ref is not None)
        return out

    def _idle_actors(self) -> list[_Actor]:
        return [a for a in self.actors if a.node and not a.retiring and not a.inflight]

    def _usable_free_cpus(self) -> float:
        return max((self.view.free_cpus(n.node_id) for n in self.view.nodes if not n.draining), default=0.0)

    def _watch(self, now: float) -> None:
        self._check_starvation(now)
        if now - self._last_progress >= self.cfg.stall_timeout_s:
            self._on_stall(now)

    def _check_starvation(self, now: float) -> None:
        """Prepare work that waits for CPUs while the actors it feeds sit idle holding them: retire one."""
        pending = self._stage_pending()
        if not (pending["prepare"] or pending["probe"]) or self.ledger.queued:
            return
        idle = self._idle_actors()
        recent = sorted(self._stage_seconds[-20:])
        wait_s = max(self.STARVE_MIN_S, 3 * recent[len(recent) // 2]) if recent else self.STARVE_MIN_S
        if not idle or now - self._last_stage_done < wait_s:
            return
        free = self._usable_free_cpus()
        if free + 1e-6 >= self.shape.decode_cpus:
            return  # the tasks have room: they are slow, not starved
        self._shrink_for_stages(idle[0], f"{pending['prepare'] + pending['probe']} decode task(s) "
                                         f"({self.shape.decode_cpus:g} CPU each) have waited {now - self._last_stage_done:.0f} s "
                                         f"and no usable node has that much free (most free: {free:g} CPU)")
        self._last_stage_done = now  # give the freed CPUs a window before judging again

    def _shrink_for_stages(self, actor: _Actor, why: str) -> None:
        live = len([a for a in self.actors if not a.retiring])
        self.starvation_cap = max(0, live - 1)
        self.events["pool_shrinks"] += 1
        actor.retiring = True
        self.say(f"[caption] pool: {why}; retiring idle actor pid {actor.pid} on node {str(actor.node)[:8]} and "
                 f"capping the pool at {self.starvation_cap} until the cluster changes")

    def _on_stall(self, now: float) -> None:
        """Nothing completed for --stall-timeout-s: say what waits for what, then act."""
        self._poll_nodes(force=True)
        self.say(self.stall_report(now))
        self.events["stalls"] += 1
        if self.capacity == 0:
            self._on_no_capacity()  # raises when no node can ever come
            self.say("[caption] stall: waiting for a node that can hold the job")
        else:
            pending, idle = self._stage_pending(), self._idle_actors()
            if (pending["prepare"] or pending["probe"]) and idle and not self.ledger.queued:
                self._shrink_for_stages(idle[0], "stall: decode tasks wait while caption actors are idle")
            else:
                if self.starvation_cap is not None:
                    self.say(f"[caption] stall: lifting the pool cap of {self.starvation_cap}")
                self.starvation_cap = None
                for info in self.suspects.values():  # re-probe unreachable actors now
                    if info["probe"] is None:
                        info["probe_at"] = 0.0
                self.say("[caption] stall: re-read the cluster; the job goes on waiting (it fails only when no "
                         "node can ever hold its work)")
        self._last_progress = now

    def stall_report(self, now: float) -> str:
        """What waits for what, on which nodes (the stall message; also useful when debugging)."""
        pending = self._stage_pending()
        oldest = max((now - t for t in self._submitted_at.values()), default=0.0)
        placed = [a for a in self.actors if a.node]
        busy = [a for a in placed if a.inflight]
        lines = [f"[caption] no progress for {now - self._last_progress:.0f} s "
                 f"({self.committed}/{len(self.units)} unit(s) committed this run, "
                 f"{self.ledger.queued} batch(es) queued for the actors); waiting for:"]
        free = self._usable_free_cpus()
        lines.append(f"  - {pending['prepare']} prepare + {pending['probe']} probe task(s) "
                     f"({self.shape.decode_cpus:g} CPU each; oldest submitted {oldest:.0f} s ago)"
                     + ("" if not (pending["prepare"] or pending["probe"]) else
                        (": no usable node has that much CPU free" if free + 1e-6 < self.shape.decode_cpus
                         else f": a node has {free:g} CPU free (the tasks run or wait for their inputs)")))
        lines.append(f"  - {pending['finish']} finish task(s) ({self.shape.finish_cpus:g} CPU each)")
        lines.append(f"  - {len(self.actors)} caption actor(s) of {self.shape.describe_actor()} (target "
                     f"{self.target_actors}, capacity {self.capacity}): {len(self.actors) - len(placed)} not placed "
                     f"yet, {len(busy)} busy, {len(placed) - len(busy)} idle"
                     + "".join(f"; pid {a.pid} on {a.node[:8]}" + (" (retiring)" if a.retiring else "")
                               for a in placed[:6])
                     + (f"; {len(self.suspects)} unreachable, being probed" if self.suspects else ""))
        for n in self.view.nodes[:12]:
            avail = self.view.available.get(n.node_id, {})
            lines.append(f"  node {n.node_id[:8]}: {avail.get('CPU', 0.0):g}/{n.cpus:g} CPU free"
                         + (f", {avail.get('GPU', 0.0):g}/{n.gpus:g} GPU free" if n.gpus else "")
                         + (" (draining)" if n.draining else ""))
        if not self.view.nodes:
            lines.append("  no live node")
        if self.capacity == 0:
            lines.append(f"  the pool cannot hold any actor: {why_no_capacity(self.view.nodes, self.shape)}")
        return "\n".join(lines)


#: How Ray words an actor death caused by its node's death (ActorDiedError's message).
_NODE_DIED = re.compile(r"node (has )?died|node .*(is|was) (dead|removed|terminated)|preempt", re.IGNORECASE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray's errors start with a generic line; the last line names the actual cause.
    return (lines[-1] if lines else type(exc).__name__)[:300]
