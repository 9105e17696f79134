"""How the caption scheduler handles failures: poison images, crashed or unreachable actors, lost nodes.

A mixin of :class:`alip.captioning.scheduler.CaptionScheduler` (it shares the scheduler's state:
``ledger``, ``prepared``, ``actors``, ``suspects``, ``events``); split out so each concern reads
alone. The rules:

* a caption batch that raises or crashes its actor is retried row by row, each row alone on an
  idle actor; a row that fails ``--max-unit-attempts`` times alone becomes a reject (the batch's
  failure is charged to no row: alip/captioning/ledger.py);
* a prepare task that crashes its worker has its rows probed one at a time (same attempt rule);
* an actor that stops answering is probed until it answers again (its calls re-run) or is known
  dead; a death with its node is nobody's fault (calls re-queued, no attempt counted).
"""

from __future__ import annotations

import re
import time

from alip.captioning.ledger import CaptionLedger, Chunk


class FaultHandling:
    """Failure handling of the caption scheduler (see the module docstring)."""

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
        return self.ledger.on_probation(chunk)

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

    def _suspect(self, actor, exc: Exception, first=None) -> None:
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

    def _node_gone(self, actor, exc: Exception) -> bool:
        if getattr(exc, "preempted", False):
            return True
        if actor.node is not None and (actor.node not in self._alive or actor.node in self._draining):
            return True
        return bool(_NODE_DIED.search(str(exc)))

    def _on_actor_died(self, actor, exc: Exception, first=None) -> None:
        """An actor is gone: re-queue its chunks; count the one it was running unless its node died."""
        if actor not in self.actors:
            return
        self.actors.remove(actor)
        self._poll_nodes(force=True)
        pending = ([first] if first else []) + actor.inflight
        actor.inflight = []
        self._settle(actor, exc, pending, node_gone=self._node_gone(actor, exc))

    def _settle(self, actor, exc: Exception, pending: list, node_gone: bool) -> None:
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


#: How Ray words an actor death caused by its node's death (ActorDiedError's message).
_NODE_DIED = re.compile(r"node (has )?died|node .*(is|was) (dead|removed|terminated)|preempt", re.IGNORECASE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray's errors start with a generic line; the last line names the actual cause.
    return (lines[-1] if lines else type(exc).__name__)[:300]
