"""Do a job's Ray resource bundles fit a cluster.yaml's node types? (pure: no Ray, no cloud)

Ray only finds out at run time that a job cannot be placed: the autoscaler never launches a node
that could hold a bundle, and the job waits forever (Ray Data: "Cluster resources are not enough
to run any task"; Ray Train: workers pending). This module answers the question from the files:

- a cluster is its worker node types (resources, per-type `max_workers`) and the cluster-wide
  `max_workers`; the head is left out because cluster.yaml gives it `CPU: 0` (it hosts drivers
  and the control plane, whose actors ask for no resources);
- a job is a list of resource bundles that must all run at once: for pretraining, one
  `{CPU: cpus_per_worker, GPU: 1}` per Ray Train worker (what job.py puts in ScalingConfig)
  plus the read + decode tasks that feed them (alip.pretrain.rank_reader), `{CPU: data_cpus}` each; for
  captioning, one `{CPU: cpus_per_actor, GPU: gpus_per_actor}` per caption actor plus the
  prepare (decode) and finish (commit) tasks the driver keeps in flight for it;
- `pack` places the bundles with first-fit-decreasing onto nodes it opens within the count
  limits, and returns that placement (proof that it fits) or raises DoesNotFit saying which
  resource ran out. Greedy packing can miss a placement that exists, never claim one that
  does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

Resources = dict[str, float]

# A GPU trainer of ViT-B eats several hundred to a few thousand samples/s; one JPEG decode +
# random-resized-crop + tokenise task does a few hundred per core (bench/bench_ingest.py measures
# it). So a train worker needs several preprocessing tasks running at once, on its node's spare
# CPUs or on the CPU worker type: the presets must leave room for at least this many.
DATA_TASKS_PER_TRAIN_WORKER = 4
# The caption job's driver (alip/captioning/pipeline.py) keeps 2 units per actor + 1 prepared
# ahead (prepare tasks: read + decode + resize + processor, `decode_cpus` each) and commits each
# finished unit in a finish task (min(decode_cpus, 0.25) CPU): all of them may run at once.
PREPARE_TASKS_PER_CAPTION_ACTOR = 2
FINISH_TASKS_PER_CAPTION_ACTOR = 1


class DoesNotFit(ValueError):
    """The bundles cannot all be placed; the message names the job, the bundle and the limit."""


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: Resources
    max_workers: int
    spot: bool = False
    priority: int = 0  # autoscaler v2: higher is launched first among equally good types


@dataclass(frozen=True)
class ClusterShape:
    node_types: tuple[NodeType, ...]
    max_workers: int  # cluster-wide cap on worker nodes

    @classmethod
    def from_cluster_config(cls, config: dict) -> "ClusterShape":
        """From a parsed cluster.yaml (Ray cluster-launcher format)."""
        head = config["head_node_type"]
        types = []
        for name, t in config["available_node_types"].items():
            if name == head:
                continue
            market = t.get("node_config", {}).get("InstanceMarketOptions", {}).get("MarketType")
            types.append(NodeType(name, {k: float(v) for k, v in t.get("resources", {}).items()},
                                  int(t.get("max_workers", 0)), market == "spot", int(t.get("priority", 0))))
        return cls(tuple(types), int(config["max_workers"]))

    def on_demand_only(self) -> "ClusterShape":
        """What is left when no spot capacity can be had at all."""
        return ClusterShape(tuple(t for t in self.node_types if not t.spot), self.max_workers)


@dataclass(frozen=True)
class Bundle:
    label: str  # what it is, for messages: "pretrain worker 3", "caption prepare task 5"
    resources: Resources


@dataclass(frozen=True)
class Demand:
    job: str
    bundles: tuple[Bundle, ...]

    def total(self) -> Resources:
        out: Resources = {}
        for b in self.bundles:
            for k, v in b.resources.items():
                out[k] = out.get(k, 0.0) + v
        return out


def pretrain_demand(workers: int, cpus_per_worker: float, use_gpu: bool, data_cpus: float,
                    data_tasks_per_worker: int = DATA_TASKS_PER_TRAIN_WORKER) -> Demand:
    """Ray Train workers (job.py's ScalingConfig.resources_per_worker) + their read + decode tasks."""
    trainer = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    bundles = [Bundle(f"pretrain worker {i}", trainer) for i in range(workers)]
    bundles += [Bundle(f"pretrain data task {i}", {"CPU": float(data_cpus)})
                for i in range(workers * data_tasks_per_worker)]
    return Demand(f"pretraining with {workers} worker(s)", tuple(bundles))


def caption_demand(actors: int, cpus_per_actor: float, gpus_per_actor: float, decode_cpus: float) -> Demand:
    """Caption actors (the pool at its max size) + the prepare and finish tasks around them."""
    actor = {k: float(v) for k, v in (("CPU", cpus_per_actor), ("GPU", gpus_per_actor)) if v > 0}
    bundles = [Bundle(f"caption actor {i}", actor) for i in range(actors)]
    bundles += [Bundle(f"caption prepare task {i}", {"CPU": float(decode_cpus)})
                for i in range(PREPARE_TASKS_PER_CAPTION_ACTOR * actors + 1)]
    bundles += [Bundle(f"caption finish task {i}", {"CPU": min(float(decode_cpus), 0.25)})
                for i in range(FINISH_TASKS_PER_CAPTION_ACTOR * actors)]
    return Demand(f"captioning with {actors} actor(s)", tuple(bundles))


def pretrain_demand_of(cfg, workers: int) -> Demand:
    """From an alip.pretrain.config.PretrainConfig at `workers` workers (its range max or min)."""
    return pretrain_demand(workers, cfg.cpus_per_worker, cfg.use_gpu, cfg.data_cpus)


def caption_demand_of(cfg) -> Demand:
    """From an alip.captioning.config.CaptionJobConfig, the actor pool at its max size."""
    cfg = cfg.sized(None)  # a cluster's defaults for the sizes left unset
    return caption_demand(cfg.max_actors, cfg.cpus_per_actor, cfg.gpus_per_actor, cfg.decode_cpus)


@dataclass
class _Node:
    type: NodeType
    free: Resources
    bundles: list[str] = field(default_factory=list)

    def holds(self, need: Resources) -> bool:
        return all(self.free.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)

    def take(self, b: Bundle) -> None:
        for k, v in b.resources.items():
            self.free[k] = self.free.get(k, 0.0) - v
        self.bundles.append(b.label)


@dataclass
class Placement:
    job: str
    nodes: list[_Node]

    def count(self, type_name: str) -> int:
        return sum(n.type.name == type_name for n in self.nodes)

    def summary(self) -> str:
        by_type = {}
        for n in self.nodes:
            by_type[n.type.name] = by_type.get(n.type.name, 0) + 1
        nodes = ", ".join(f"{c} x {t}" for t, c in sorted(by_type.items()))
        return f"{self.job}: {len(self.nodes)} node(s) ({nodes})"


def _waste(t: NodeType, need: Resources) -> tuple:
    # Open the type that wastes least: no GPU node for a CPU-only bundle when a CPU type exists,
    # then the preferred (higher priority: spot) type, then the smallest.
    gpu_unused = t.resources.get("GPU", 0) > 0 and not need.get("GPU")
    return (gpu_unused, -t.priority, sum(t.resources.values()), t.name)


def pack(demand: Demand, cluster: ClusterShape) -> Placement:
    """Place every bundle of `demand` on nodes of `cluster`, or raise DoesNotFit (why)."""
    order = sorted(demand.bundles, key=lambda b: (-b.resources.get("GPU", 0.0), -b.resources.get("CPU", 0.0),
                                                   b.label))
    nodes: list[_Node] = []
    opened = {t.name: 0 for t in cluster.node_types}
    for b in order:
        # Best fit among open nodes: the one left with the fewest free CPUs keeps big holes for big bundles.
        fits = [n for n in nodes if n.holds(b.resources)]
        if fits:
            min(fits, key=lambda n: (n.free.get("CPU", 0.0), n.type.name)).take(b)
            continue
        candidates = [t for t in cluster.node_types
                      if opened[t.name] < t.max_workers and _Node(t, dict(t.resources)).holds(b.resources)]
        if not candidates or len(nodes) >= cluster.max_workers:
            raise DoesNotFit(_why(demand, cluster, b, nodes, candidates))
        t = min(candidates, key=lambda t: _waste(t, b.resources))
        opened[t.name] += 1
        node = _Node(t, dict(t.resources))
        node.take(b)
        nodes.append(node)
    return Placement(demand.job, nodes)


def _why(demand: Demand, cluster: ClusterShape, bundle: Bundle, nodes: list[_Node],
         candidates: list[NodeType]) -> str:
    if not any(_Node(t, dict(t.resources)).holds(bundle.resources) for t in cluster.node_types):
        return (f"{demand.job}: {bundle.label} needs {bundle.resources}, more than any worker node type "
                f"has ({', '.join(f'{t.name} {t.resources}' for t in cluster.node_types) or 'none'})")
    total = demand.total()
    cap: Resources = {}  # an upper bound: every type at its own max, or the cluster-wide max of the biggest
    for k in {k for t in cluster.node_types for k in t.resources}:
        per_type = sum(t.resources.get(k, 0.0) * t.max_workers for t in cluster.node_types)
        biggest = max(t.resources.get(k, 0.0) for t in cluster.node_types)
        cap[k] = min(per_type, biggest * cluster.max_workers)
    short = [f"{k} {total[k]:g} > {cap.get(k, 0.0):g}" for k in sorted(total) if total[k] > cap.get(k, 0.0) + 1e-9]
    limit = (f"the cluster-wide max_workers {cluster.max_workers} is reached"
             if len(nodes) >= cluster.max_workers and candidates else
             "every node type that could hold it is at its max_workers")
    detail = f"; the job needs more than all node types at their max_workers give: {', '.join(short)}" if short else ""
    return (f"{demand.job} does not fit the cluster: no room for {bundle.label} {bundle.resources} after "
            f"{len(nodes)} node(s) ({limit}){detail}")

