"""How many caption actors a cluster can hold, and why a job cannot progress (pure: no Ray).

The scheduler (``alip/captioning/scheduler.py``) feeds these functions Ray's own resource
views (``cluster_view.py``); everything here is arithmetic on those views, unit-tested
without a cluster (``tests/test_caption_pool.py``).

The rule
--------
A caption actor only generates; the CPU stages that feed it -- a *prepare* task (read, decode,
resize, processor: ``decode_cpus``), a *finish* task (commit: ``finish_cpus``) and the probe /
read tasks that isolate a poison image (``decode_cpus``) -- run beside it. An actor that holds
the last CPUs those stages need waits forever for inputs that can never be made (issue 22: two
1-CPU actors on the one 2-CPU node left after a loss, two prepare tasks pending). So:

    capacity = the most actors that can be packed onto the usable nodes (alive, not draining;
               their *total* resources, as Ray reports them) while ONE node keeps
               ``decode_cpus + finish_cpus`` CPUs free for a prepare and a finish task,
    target   = min(max_actors, units not yet committed, capacity, starvation cap)

where an actor needs ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs on one node. The
reserve sits on whichever node costs the fewest actors, so GPU actors on GPU nodes leave a CPU
node (or the spare CPUs of a GPU node) to the stages. The pool grows when the capacity grows (a
node joins) and shrinks when it falls (a node is lost or drained): surplus actors are retired
when idle. A capacity of 0 means the job cannot run on these nodes at all: it waits for a node
that can hold it when an autoscaler (Ray's ``ClusterConfig``) can add one, and fails with
:func:`why_no_capacity`'s reason when nothing can.

The starvation cap is the rule's runtime check: Ray places actors itself, and other work can
hold CPUs, so when prepare work has waited for CPUs with no stage task finishing for a while and
the actors sit idle, the scheduler retires an idle actor and caps the pool at what is left
until the cluster view changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Ray rounds resources to 1e-4; compare with a tolerance so 3 x 0.25 fits 0.75.
_EPS = 1e-6


@dataclass(frozen=True)
class NodeResources:
    """One node's total resources as Ray reports them (``ray.nodes()[i]["Resources"]``)."""

    node_id: str
    cpus: float
    gpus: float = 0.0
    draining: bool = False


@dataclass(frozen=True)
class PoolShape:
    """What one caption actor and one task of each feeding stage ask Ray for."""

    cpus_per_actor: float
    gpus_per_actor: float
    decode_cpus: float  # a prepare, probe or read task
    finish_cpus: float  # a finish (commit) task

    @property
    def reserve_cpus(self) -> float:
        """CPUs one node keeps free so a prepare and a finish task can always run."""
        return self.decode_cpus + self.finish_cpus

    def describe_actor(self) -> str:
        return f"{self.cpus_per_actor:g} CPU" + (f" + {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else "")


def actors_fitting(cpus: float, gpus: float, shape: PoolShape) -> int:
    """How many actors fit in ``cpus`` CPUs and ``gpus`` GPUs of one node."""
    limits = []
    if shape.cpus_per_actor > 0:
        limits.append(math.floor(max(cpus, 0.0) / shape.cpus_per_actor + _EPS))
    if shape.gpus_per_actor > 0:
        limits.append(math.floor(max(gpus, 0.0) / shape.gpus_per_actor + _EPS))
    return max(0, min(limits)) if limits else 0


def usable(nodes: list[NodeResources]) -> list[NodeResources]:
    """Nodes new work may go to: alive (the caller passes only live ones) and not being drained."""
    return [n for n in nodes if not n.draining]


def pool_capacity(nodes: list[NodeResources], shape: PoolShape) -> int:
    """The most actors the usable nodes hold while one node keeps the stages' reserve free."""
    nodes = usable(nodes)
    full = [actors_fitting(n.cpus, n.gpus, shape) for n in nodes]
    best = 0
    for i, n in enumerate(nodes):
        if n.cpus + _EPS < shape.reserve_cpus:
            continue  # the reserve cannot sit on this node
        beside_reserve = actors_fitting(n.cpus - shape.reserve_cpus, n.gpus, shape)
        best = max(best, sum(full) - full[i] + beside_reserve)
    return best


def pool_target(capacity: int, max_actors: int, units_left: int, starvation_cap: int | None = None) -> int:
    """The number of actors to keep (module docstring): never more than the cluster holds."""
    target = min(max_actors, max(units_left, 0), capacity)
    if starvation_cap is not None:
        target = min(target, starvation_cap)
    return max(target, 0)


def why_no_capacity(nodes: list[NodeResources], shape: PoolShape) -> str:
    """Why :func:`pool_capacity` is 0, in words that say what to change."""
    live = usable(nodes)
    if not nodes:
        return "the cluster has no live node"
    if not live:
        return f"all {len(nodes)} live node(s) are being drained"
    sizes = ", ".join(f"{n.node_id[:8]}: {n.cpus:g} CPU" + (f" {n.gpus:g} GPU" if n.gpus else "") for n in live[:8])
    if shape.gpus_per_actor > 0 and not any(n.gpus + _EPS >= shape.gpus_per_actor for n in live):
        return (f"a caption actor needs {shape.gpus_per_actor:g} GPU and no usable node has one ({sizes}); "
                "use --gpus-per-actor 0 to caption on CPUs")
    if not any(actors_fitting(n.cpus, n.gpus, shape) for n in live):
        return (f"a caption actor needs {shape.describe_actor()} on one node and no usable node has that "
                f"({sizes}); lower --cpus-per-actor")
    if not any(n.cpus + _EPS >= shape.reserve_cpus for n in live):
        return (f"the decode and commit tasks need {shape.reserve_cpus:g} CPU on one node and no usable node has "
                f"that many ({sizes}); lower --decode-cpus")
    largest = max(n.cpus for n in live)
    fits = largest - shape.reserve_cpus
    hint = (f"--cpus-per-actor {fits:g} or less fits beside them on the largest node" if fits > 0
            else "lower --decode-cpus")
    return (f"a caption actor ({shape.describe_actor()}) and the decode + commit tasks that feed it "
            f"({shape.reserve_cpus:g} CPU) do not fit together on any usable node, and no other node can take "
            f"the decode tasks ({sizes}); {hint}, or add a node")


@dataclass(frozen=True)
class NodeGroup:
    """A node type an autoscaler may launch (Ray's ``ClusterConfig.node_group_configs``)."""

    name: str
    cpus: float
    gpus: float
    max_count: int  # -1: unlimited
    min_count: int = 0


def groups_can_grow(groups: list[NodeGroup]) -> bool:
    """Whether an autoscaler can add nodes (Ray Data's ``is_autoscaling_enabled`` rule)."""
    return any(g.max_count == -1 or g.max_count > g.min_count for g in groups if g.max_count != 0)


def groups_could_hold(groups: list[NodeGroup], shape: PoolShape) -> bool:
    """Whether nodes of these types, once launched, could hold an actor and the stages' reserve."""
    launchable = [NodeResources(g.name, g.cpus, g.gpus) for g in groups if g.max_count != 0]
    # Two nodes of each type bound what any number can do for "at least one actor + reserve".
    return pool_capacity(launchable + launchable, shape) > 0
