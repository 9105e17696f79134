"""The caption pool at run time: its size from Ray's view, starvation of the decode stage, stalls.

A mixin of :class:`alip.captioning.scheduler.CaptionScheduler`. The sizing rule itself is pure
(:mod:`alip.captioning.pool`); this part reads Ray's view every ``NODE_POLL_S`` and acts on it:

* **size**: target = min(max_actors, units left, capacity, starvation cap); surplus actors are
  retired (unplaced ones at once, idle ones next, busy ones after their calls); a capacity of 0
  waits for a node (an autoscaler's, or one that joins) and fails with
  :class:`CaptionJobStalled` when none can come (a private local Ray; no autoscaler after
  ``--stall-timeout-s``);
* **starvation**: decode tasks waiting for CPUs with no stage task finishing for
  ``max(STARVE_MIN_S, 3 x median prepare time)``, no batch queued, an idle actor and no usable
  node with ``decode_cpus`` free: retire that actor and cap the pool until the cluster changes;
* **stall**: nothing completed for ``--stall-timeout-s``: print :meth:`stall_report` (what waits
  for what, each node's free CPUs), then act (retire an idle actor if the stages starve, else
  lift the cap and re-probe) -- or fail when no node can ever hold the job.
"""

from __future__ import annotations

import time

from alip.captioning.cluster_view import read_view
from alip.captioning.pool import groups_can_grow, groups_could_hold, pool_capacity, pool_target, why_no_capacity


class CaptionJobStalled(RuntimeError):
    """The job cannot progress and nothing will change that (the message says what waits for what)."""


class PoolControl:
    """Pool sizing, starvation and stall handling of the caption scheduler (module docstring)."""

    #: prepare work waiting this long (at least; or 3x the median prepare time seen) with no stage task
    #: finishing, beside idle actors and no free CPU for it, makes the pool retire an actor
    STARVE_MIN_S = 15.0

    # -- cluster state and pool size --------------------------------------------------------------
    def _poll_nodes(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_poll < self.NODE_POLL_S:
            return
        self._last_poll = now
        before = self.view.signature()
        self.view = read_view()
        # A node whose actors died with it is gone, whatever the GCS says: it keeps a dead node
        # "Alive" until its health checks fail (~15 s), and counting it would place replacement
        # actors on the survivors' last CPUs (the tasks rebuilding lost inputs then cannot run).
        self.view.nodes = [n for n in self.view.nodes if n.node_id not in self.events["nodes_lost"]]
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
        # Unreachable actors (being probed) still count: their resources are held until settled.
        while len(self.actors) + len(self.suspects) < target:
            self._spawn()
        surplus = len(self.actors) + len(self.suspects) - target
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

    # -- starvation and stalls -------------------------------------------------------------------
    def _stage_pending(self) -> dict[str, int]:
        """Stage tasks submitted and not finished, by kind."""
        out = {"prepare": 0, "probe": 0, "finish": len(self.finishing)}
        for entry in self.prepared.values():
            if entry.refs is not None and entry.good_keys is None:
                out["prepare"] += 1
            out["probe"] += len(entry.probing) + (entry.table_ref is not None)
        return out

    def _idle_actors(self) -> list:
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
        if self._stage_cpus_in_use() + 1e-6 >= self.shape.decode_cpus:
            return  # decode tasks hold the CPUs (e.g. probes isolating a poison image): busy, not starved
        self._shrink_for_stages(idle[0], f"{pending['prepare'] + pending['probe']} decode task(s) "
                                         f"({self.shape.decode_cpus:g} CPU each) have waited {now - self._last_stage_done:.0f} s "
                                         f"and no usable node has that much free (most free: {free:g} CPU)")
        self._last_stage_done = now  # give the freed CPUs a window before judging again

    def _stage_cpus_in_use(self) -> float:
        """CPUs in use on usable nodes beyond what this job's placed actors hold: the stage tasks'
        (and any other workload's) share. Starvation means it is below one decode task."""
        used = sum(n.cpus - self.view.free_cpus(n.node_id) for n in self.view.nodes if not n.draining)
        usable = {n.node_id for n in self.view.nodes if not n.draining}
        held = sum(self.shape.cpus_per_actor for a in self.actors if a.node in usable)
        return max(0.0, used - held)

    def _shrink_for_stages(self, actor, why: str) -> None:
        live = len([a for a in self.actors if not a.retiring])
        self.starvation_cap = max(0, live - 1)
        self.events["pool_shrinks"] += 1
        actor.retiring = True
        self.say(f"[caption] pool: {why}; retiring idle actor pid {actor.pid} on node {str(actor.node)[:8]} and "
                 f"capping the pool at {self.starvation_cap} until the cluster changes")

    def _evict(self, actor, why: str) -> None:
        """Kill an actor now and re-queue its calls (not counted against the rows: not their fault)."""
        if not actor.retiring:
            self.starvation_cap = max(0, len([a for a in self.actors if not a.retiring]) - 1)
        self.actors.remove(actor)
        for ref, chunk in actor.inflight:
            self._order.pop(ref, None)
            self.events["chunks_requeued"] += 1
            self.ledger.lost(chunk)
        actor.inflight = []
        self.events["actors_evicted"] += 1
        self.say(f"[caption] pool: {why}; killing actor pid {actor.pid} on node {str(actor.node)[:8]}, its calls "
                 f"re-queued" + (f", pool capped at {self.starvation_cap}" if self.starvation_cap is not None else ""))
        try:
            self.ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

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
            busy = [a for a in self.actors if a.node and a.inflight]
            no_room = self._usable_free_cpus() + 1e-6 < self.shape.decode_cpus
            if ((pending["prepare"] or pending["probe"]) and idle and not self.ledger.queued
                    and self._stage_cpus_in_use() + 1e-6 < self.shape.decode_cpus):
                self._shrink_for_stages(idle[0], "stall: decode tasks wait while caption actors are idle")
            elif busy and no_room:
                # Calls that never finish while no CPU is free: their inputs were lost (with a node)
                # and the tasks Ray resubmits to rebuild them cannot be placed. Free an actor's CPUs.
                victim = next((a for a in busy if a.retiring), busy[-1])
                self._evict(victim, "stall: its calls wait for inputs that Ray can only rebuild on CPUs the "
                                    "actors hold")
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
