"""Ray Train's elastic scaling policy with a true view of the cluster, and the rule for joins.

Ray Train 2.60 (`ray/train/v2/_internal/execution/scaling_policy/elastic.py`) sizes a new worker
group from the reservation the cluster-wide AutoscalingCoordinator actor holds for it
(`ray/data/_internal/cluster_autoscaler/default_autoscaling_coordinator.py`). That actor refreshes
its node list from `ray.nodes()` on a 20 s tick (TICK_INTERVAL_S) and counts a node that is being
drained. After a node died, the restart therefore asked for the old size, the placement group
waited RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) for a node that was gone, failed, and only the
next attempt used the survivors: 41% + 15% of every restart (bench/bench_chaos.py, 2026-11-30).

`FreshViewElasticPolicy` changes what the policy counts, nothing else:
- **a fresh view** at every decision: `get_reserved_resources(..., recompute=True)`, the
  coordinator's own on-demand tick (it exists for callers that "turn the answer into node pins");
- **no dead node the GCS has not noticed yet**: to restart, every listed node's raylet is probed
  with one TCP connect (`raylet_reachable`); the GCS's own health check takes ~15 s by default;
- **no draining node**: a node Ray is draining (a spot notice, `ray._private.state.get_draining_nodes`)
  takes no new worker, so a restart never asks for a slot that goes away at the deadline;
- **no young node for growth** (the join rule): a running group grows only onto nodes that have
  been alive for `min_node_uptime_s`, and only at a checkpoint boundary: the policy asks rank 0
  (through Ray's internal KV, `GrowHandshake`) to write a checkpoint, and resizes once that
  checkpoint has had time to be registered. A node that flaps (joins and goes within the uptime)
  never costs a restart, and a grow loses only the steps of the handshake, not up to a checkpoint
  interval. A restart that happens anyway (a failure) takes every live node, young or not: one
  restart, not a shrink now and a grow a minute later;
- **never a shrink from the view**: a running group gets smaller only through a failure or a
  preemption notice, which Ray Train handles with their checkpoints (a view-driven shrink would
  kill the group before the notice's just-in-time checkpoint).

Node death itself is learnt from the GCS (`ray.nodes()` "Alive"), whose health check decides how
fast: see docs/cluster.md ("How fast a dead node is noticed") for the settings and their trade-off.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time

import ray
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision
from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import (
    AUTOSCALING_REQUESTS_GET_TIMEOUT_S,
)

logger = logging.getLogger(__name__)

DEFAULT_MIN_NODE_UPTIME_S = 30.0
RAYLET_PROBE_TIMEOUT_S = 1.0
# A `ready` older than this (plus the registration margin) answered a grow that did not happen (the
# room went again): the next grow asks for a new checkpoint.
STALE_READY_S = 30.0
GROW_KV_NAMESPACE = "alip_grow"


def raylet_reachable(address: str, port: int, timeout_s: float = RAYLET_PROBE_TIMEOUT_S) -> bool:
    """Does the node's raylet accept a TCP connection? The GCS's own health check asks the same
    question every `health_check_period_ms` and calls a node dead after `health_check_failure_threshold`
    misses (~15 s with Ray's defaults). A restart cannot wait that long to learn what one connect
    tells it: a killed raylet refuses at once, a vanished instance does not answer within the timeout."""
    import socket

    try:
        with socket.create_connection((address, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def reachable_nodes(nodes: list[dict]) -> set[str]:
    """Ids of the alive `ray.nodes()` entries whose raylet answers (probed concurrently)."""
    from concurrent.futures import ThreadPoolExecutor

    alive = [n for n in nodes if n.get("Alive")]
    if not alive:
        return set()
    with ThreadPoolExecutor(max_workers=min(32, len(alive))) as pool:
        ok = list(pool.map(lambda n: raylet_reachable(n["NodeManagerAddress"], n["NodeManagerPort"]), alive))
    return {n["NodeID"] for n, up in zip(alive, ok) if up}


def usable_nodes(reserved: dict[str, dict], alive: set[str], draining: set[str], first_seen: dict[str, float],
                 now: float, min_uptime_s: float | None) -> dict[str, dict]:
    """The part of a reservation (node id -> resources) on nodes that can take a worker now: alive,
    not draining, and (for growth, `min_uptime_s` given) seen alive for at least that long."""
    out = {}
    for node_id, resources in reserved.items():
        if node_id not in alive or node_id in draining:
            continue
        if min_uptime_s is not None and now - first_seen.get(node_id, now) < min_uptime_s:
            continue
        out[node_id] = resources
    return out


class GrowHandshake:
    """The policy (in Ray Train's controller) and rank 0 agree on a checkpoint before a grow.

    Keys in Ray's internal KV under the run name: the policy writes `want` (the size it would grow
    to); rank 0 sees it at its next preemption check, writes a checkpoint, and answers `ready`
    with the step and the time; the policy resizes once `ready` is `margin_s` old (the checkpoint is
    registered by then: Ray Train collects reports at its health-check polls). Both are deleted
    when the group restarts."""

    def __init__(self, run_name: str):
        self.run_name = run_name

    def _key(self, what: str) -> bytes:
        return f"{self.run_name}/{what}".encode()

    def _put(self, what: str, value: dict) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self._key(what), json.dumps(value).encode(), overwrite=True, namespace=GROW_KV_NAMESPACE)

    def _get(self, what: str) -> dict | None:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self._key(what), namespace=GROW_KV_NAMESPACE)
        return json.loads(raw) if raw else None

    def want(self, workers: int) -> None:
        self._put("want", {"workers": workers, "at": time.time()})

    def wanted(self) -> dict | None:
        return self._get("want")

    def ready(self, step: int) -> None:
        self._put("ready", {"step": step, "at": time.time()})

    def ready_since(self) -> float | None:
        got = self._get("ready")
        return None if got is None else time.time() - float(got["at"])

    def clear(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        for what in ("want", "ready"):
            _internal_kv_del(self._key(what), namespace=GROW_KV_NAMESPACE)


class FreshViewElasticPolicy(ElasticScalingPolicy):
    """Ray Train's ElasticScalingPolicy counting only nodes that can take a worker (module doc)."""

    def __init__(self, scaling_config, run_name: str, min_node_uptime_s: float = DEFAULT_MIN_NODE_UPTIME_S,
                 registration_margin_s: float = 5.0):
        super().__init__(scaling_config)
        self.min_node_uptime_s = min_node_uptime_s
        self.registration_margin_s = registration_margin_s
        self.handshake = GrowHandshake(run_name)
        self._first_seen: dict[str, float] = {}
        self._growth_view = False

    # The parent's decisions, with the view below; growth is gated by the handshake.
    def make_decision_for_non_running_worker_group(self):
        self._growth_view = False
        self._latest_reserved_resources_query_time = float("-inf")  # always a fresh view to restart
        with contextlib.suppress(Exception):
            self.handshake.clear()
        return super().make_decision_for_non_running_worker_group()

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        self._growth_view = True
        try:
            decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
        finally:
            self._growth_view = False
        if not isinstance(decision, ResizeDecision):
            return decision
        current = worker_group_state.num_workers
        if decision.num_workers <= current:
            return NoopDecision()  # never shrink from the view: failures and notices do that
        try:
            since = self.handshake.ready_since()
            if since is None:
                if self.handshake.wanted() is None:
                    logger.info("[alip] %d more worker(s) fit: asking rank 0 for a checkpoint before growing "
                                "%d -> %d", decision.num_workers - current, current, decision.num_workers)
                    self.handshake.want(decision.num_workers)
                self._latest_monitor_time = float("-inf")  # look again at the next poll, not a resize interval later
                return NoopDecision()
            if since > self.registration_margin_s + STALE_READY_S:  # answered for a grow that did not happen
                self.handshake.clear()
                self.handshake.want(decision.num_workers)
                self._latest_monitor_time = float("-inf")
                return NoopDecision()
            if since < self.registration_margin_s:
                self._latest_monitor_time = float("-inf")
                return NoopDecision()
            self.handshake.clear()
        except Exception:  # the KV unreachable: grow without the boundary rather than never
            logger.warning("[alip] grow handshake failed; growing without a fresh checkpoint", exc_info=True)
        return decision

    def _get_reserved_resources(self):
        now_wall = time.monotonic()
        if now_wall - self._latest_reserved_resources_query_time < self.GET_RESERVED_RESOURCES_INTERVAL_S:
            return self._latest_reserved_resources
        reserved = None
        try:
            reserved = ray.get(self._autoscaling_coordinator.get_reserved_resources.remote(
                self._requester_id, recompute=True), timeout=AUTOSCALING_REQUESTS_GET_TIMEOUT_S)
            nodes = ray.nodes()
            # To restart, a node the GCS still lists but whose raylet does not answer is dead
            # already (the GCS notices later); for growth the GCS view is enough.
            alive = ({n["NodeID"] for n in nodes if n.get("Alive")} if self._growth_view
                     else reachable_nodes(nodes))
            draining = set(ray._private.state.state.get_draining_nodes() or {})
            first_look = not self._first_seen  # nodes there before the run count as old
            for node_id in alive:
                self._first_seen.setdefault(node_id, float("-inf") if first_look else now_wall)
            reserved = usable_nodes(reserved, alive, draining, self._first_seen, now_wall,
                                    self.min_node_uptime_s if self._growth_view else None)
        except Exception:
            logger.warning("[alip] could not get a fresh view of the cluster; not resizing now", exc_info=True)
            reserved = None
        finally:
            self._latest_reserved_resources_query_time = time.monotonic()
            self._latest_reserved_resources = reserved
        return reserved


@contextlib.contextmanager
def fresh_view_elastic_policy(run_name: str, min_node_uptime_s: float, registration_margin_s: float):
    """While fitting, make Ray Train build FreshViewElasticPolicy for an elastic ScalingConfig.

    Ray Train 2.60 has no public way to pass a scaling policy: `DataParallelTrainer.fit` calls the
    module-level `create_scaling_policy` (ray/train/v2/api/data_parallel_trainer.py) and pickles
    the policy into its controller actor. This swaps that function in the driver for the fit."""
    from ray.train.v2.api import data_parallel_trainer as dpt

    original = dpt.create_scaling_policy

    def create(scaling_config):
        if scaling_config.elasticity_enabled:
            return FreshViewElasticPolicy(scaling_config, run_name, min_node_uptime_s, registration_margin_s)
        return original(scaling_config)

    dpt.create_scaling_policy = create
    try:
        yield
    finally:
        dpt.create_scaling_policy = original
