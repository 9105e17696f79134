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
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from alip.captioners import CaptionerConfig
from alip.captioning.cluster_view import ClusterView
from alip.captioning.faults import FaultHandling, _first_line
from alip.captioning.config import CaptionJobConfig
from alip.captioning.ledger import CaptionLedger, Chunk
from alip.captioning.plan import WorkUnit
from alip.captioning.pool import PoolShape
from alip.captioning.pool_control import CaptionJobStalled, PoolControl  # noqa: F401 - re-exported
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


class CaptionScheduler(PoolControl, FaultHandling):
    """Drives the units of one job through prepare tasks, caption actors and finish tasks."""

    #: calls queued per actor: one running + the next, so the actor never waits on the driver
    DEPTH = 2
    #: how often the driver re-reads which nodes are alive or draining (seconds)
    NODE_POLL_S = 1.0
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
                       "pool_shrinks": 0, "actors_evicted": 0, "stalls": 0}
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
            while len(self.actors) + len(self.suspects) < self.target_actors:
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
