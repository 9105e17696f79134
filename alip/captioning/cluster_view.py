"""Ray's own views of the cluster, read for the caption scheduler (the only Ray reads of pool.py's inputs).

* live nodes and their total resources: ``ray.nodes()`` (the GCS node table; a node lost without
  notice stays "Alive" until the GCS misses its health checks, ~15 s with Ray's defaults);
* nodes being drained (spot notice, autoscaler scale-down): the GCS drain table, which
  ``alip spot-watch`` and ``ray drain-node`` write;
* free resources per node: the GCS resource view (``available_resources_per_node``, refreshed by
  the raylets about every 100 ms);
* what an autoscaler may still launch: the ``ClusterConfig`` that Ray's autoscaler (v2) stores in
  the GCS; absent on a cluster nothing scales (a private local Ray, hand-started ``ray start`` nodes).

No guessing of node sizes: every figure is what Ray reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from alip.captioning.pool import NodeGroup, NodeResources

log = logging.getLogger(__name__)


@dataclass
class ClusterView:
    nodes: list[NodeResources]  # live nodes, draining ones flagged
    available: dict[str, dict[str, float]] = field(default_factory=dict)  # node -> free resources
    groups: list[NodeGroup] = field(default_factory=list)  # launchable node types ([] = no autoscaler)

    @property
    def alive(self) -> set[str]:
        return {n.node_id for n in self.nodes}

    @property
    def draining(self) -> set[str]:
        return {n.node_id for n in self.nodes if n.draining}

    def signature(self) -> tuple:
        """Changes exactly when a node joins, leaves, starts draining or changes size."""
        return tuple(sorted((n.node_id, n.cpus, n.gpus, n.draining) for n in self.nodes))

    def free_cpus(self, node_id: str) -> float:
        return float(self.available.get(node_id, {}).get("CPU", 0.0))


def read_view(with_available: bool = True) -> ClusterView:
    import ray

    try:
        from ray._private.state import state

        draining = set(state.get_draining_nodes())
    except Exception as exc:  # noqa: BLE001 - a private API: degrade to "no drains" loudly
        log.warning("cannot read draining nodes (%s); drains are not honoured", exc)
        draining = set()
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources") or {}
        nodes.append(NodeResources(n["NodeID"], float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0)),
                                   n["NodeID"] in draining))
    available: dict[str, dict[str, float]] = {}
    if with_available:
        try:
            from ray._private.state import available_resources_per_node

            available = {k: dict(v) for k, v in available_resources_per_node().items()}
        except Exception as exc:  # noqa: BLE001 - only the stall report and starvation check use it
            log.warning("cannot read free resources per node (%s)", exc)
    return ClusterView(nodes, available, read_node_groups())


def read_node_groups() -> list[NodeGroup]:
    """The node types Ray's autoscaler may launch ([] when no autoscaler configured this cluster)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no GCS entry, or an older Ray: no autoscaler known
        return []
    if config is None:
        return []
    return [NodeGroup(g.name, float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)),
                      int(g.max_count), int(g.min_count)) for g in config.node_group_configs]
