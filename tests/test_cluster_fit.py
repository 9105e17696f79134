"""The placement check shared by both jobs: the pretraining presets and the caption job's cluster
command fit cluster.yaml's node types (alip/cluster_fit.py), and editing one file without the
other is caught."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from autoscaler_v2 import v2_launches

from alip.captioning.config import CaptionJobConfig
from alip.captioning.job import build_parser as caption_parser
from alip.cluster_fit import (DATA_TASKS_PER_TRAIN_WORKER, ClusterShape, Demand, DoesNotFit, NodeType,
                              caption_demand, caption_demand_of, pack, pretrain_demand, pretrain_demand_of)
from alip.pretrain.config import PretrainConfig, load_preset

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_PRESETS = ("vit-b-32", "vit-b-16")


def cluster_of(path: Path = CLUSTER_YAML) -> ClusterShape:
    return ClusterShape.from_cluster_config(yaml.safe_load(path.read_text()))


def preset(name_or_path) -> PretrainConfig:
    return PretrainConfig.from_dict(load_preset(str(name_or_path)))


def cluster_caption_command(path: Path = CLUSTER_YAML) -> CaptionJobConfig:
    """The caption command documented in cluster.yaml's header, parsed by the job's own parser."""
    header = "\n".join(line[1:] for line in path.read_text().splitlines() if line.startswith("#"))
    joined = re.sub(r"\\\n\s*", " ", header)
    commands = [c for c in joined.splitlines() if "python ray_jobs/caption.py" in c]
    assert len(commands) == 1, commands
    argv = shlex.split(commands[0].split("ray_jobs/caption.py", 1)[1])
    # The sizes the job uses on a cluster (flags the command leaves out take the cluster defaults).
    return CaptionJobConfig(**vars(caption_parser().parse_args(argv))).sized(None)


# ----------------------------------------------------------------------------- the packing itself

GPU8 = NodeType("gpu", {"CPU": 8, "GPU": 1}, max_workers=10)


def test_the_old_presets_on_the_old_cluster_do_not_fit():
    """Issue 13: 16 workers x {CPU 8, GPU 1} on at most 10 nodes of {CPU 8, GPU 1}."""
    old = ClusterShape((NodeType("gpu_spot", {"CPU": 8, "GPU": 1}, 8),
                        NodeType("gpu_ondemand", {"CPU": 8, "GPU": 1}, 2)), 10)
    with pytest.raises(DoesNotFit, match=r"GPU 16 > 10"):
        pack(pretrain_demand(16, 8, True, 1), old)
    # Even with GPUs to spare, 8-CPU workers leave their Ray Data tasks no CPU on 8-CPU nodes.
    with pytest.raises(DoesNotFit, match=r"pretrain data task .*CPU 24 > 16"):
        pack(pretrain_demand(2, 8, True, 1), ClusterShape((GPU8,), 2))


def test_packs_trainers_and_their_data_tasks_onto_gpu_nodes():
    placement = pack(pretrain_demand(2, 2, True, 1), ClusterShape((GPU8,), 10))
    assert len(placement.nodes) == 2  # one per GPU; the data tasks use the CPUs the trainers leave
    assert [sum(b.startswith("pretrain worker") for b in n.bundles) for n in placement.nodes] == [1, 1]
    assert sum(len(n.bundles) for n in placement.nodes) == 2 + 2 * DATA_TASKS_PER_TRAIN_WORKER
    assert sum(n.free["CPU"] for n in placement.nodes) == 16 - 2 * 2 - 2 * DATA_TASKS_PER_TRAIN_WORKER
    assert all(n.free["CPU"] >= 0 and n.free["GPU"] == 0 for n in placement.nodes)


def test_cpu_only_work_opens_cpu_nodes_and_spot_first():
    cpu_spot = NodeType("cpu_spot", {"CPU": 16}, 4, spot=True, priority=10)
    cpu_od = NodeType("cpu_od", {"CPU": 16}, 4)
    cluster = ClusterShape((GPU8, cpu_od, cpu_spot), 20)
    # 2 trainers of 8 CPUs fill their GPU nodes: the data tasks go to CPU nodes, spot preferred.
    placement = pack(pretrain_demand(2, 8, True, 1), cluster)
    assert placement.count("gpu") == 2 and placement.count("cpu_spot") == 1 and placement.count("cpu_od") == 0


def test_count_limits_per_type_and_cluster_wide():
    with pytest.raises(DoesNotFit, match="cluster-wide max_workers 3"):
        pack(pretrain_demand(4, 2, True, 1), ClusterShape((GPU8,), 3))
    with pytest.raises(DoesNotFit, match="more than any worker node type has"):
        pack(pretrain_demand(1, 12, True, 1), ClusterShape((GPU8,), 10))
    with pytest.raises(DoesNotFit, match="caption actor"):
        pack(caption_demand(3, 1, 1, 0.5), ClusterShape((NodeType("gpu", {"CPU": 8, "GPU": 1}, 2),), 10))


# ----------------------------------------------------------------------------- the shipped files

@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_presets_fit_cluster_yaml_at_their_largest_and_smallest_size(name):
    cfg = preset(name)
    cluster = cluster_of()
    assert cfg.use_gpu and cfg.train.global_batch_size == 4096
    biggest = pack(pretrain_demand_of(cfg, cfg.max_workers), cluster)
    gpu_nodes = sum(n.type.resources.get("GPU", 0) > 0 for n in biggest.nodes)
    assert gpu_nodes == cfg.max_workers  # one train worker per GPU node
    # The elastic minimum runs without any spot capacity: the run can always go on, smaller.
    pack(pretrain_demand_of(cfg, cfg.min_workers), cluster.on_demand_only())


def test_caption_command_of_cluster_yaml_fits():
    cfg = cluster_caption_command()
    assert cfg.gpus_per_actor == 1 and cfg.max_actors >= 1
    cluster = cluster_of()
    placement = pack(caption_demand_of(cfg), cluster)
    assert sum(n.type.resources.get("GPU", 0) > 0 for n in placement.nodes) == cfg.max_actors
    # Without spot capacity the pool shrinks to what on-demand GPUs hold, and that still runs.
    on_demand_gpus = sum(t.max_workers * t.resources.get("GPU", 0) for t in cluster.on_demand_only().node_types)
    pack(caption_demand(int(on_demand_gpus), cfg.cpus_per_actor, cfg.gpus_per_actor, cfg.decode_cpus),
         cluster.on_demand_only())


def by_shape(demand: Demand) -> list[tuple[dict, int]]:
    shapes: dict[tuple, int] = {}
    for b in demand.bundles:
        key = tuple(sorted(b.resources.items()))
        shapes[key] = shapes.get(key, 0) + 1
    return [(dict(k), n) for k, n in shapes.items()]


def test_ray_autoscaler_v2_agrees_the_jobs_fit_and_the_edited_copy_does_not():
    """Ray's own v2 scheduler, fed the same bundles, launches nodes for all of them."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    demands = [pretrain_demand_of(preset(n), preset(n).max_workers) for n in GPU_PRESETS]
    demands.append(caption_demand_of(cluster_caption_command()))
    for demand in demands:
        launched, infeasible = v2_launches(config, by_shape(demand))
        assert infeasible == 0, demand.job
        assert launched.get("gpu_spot") == 8  # one GPU node per worker/actor, spot first
    too_big = pretrain_demand(16, 2, True, 1)
    assert v2_launches(config, by_shape(too_big))[1] > 0


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(num_workers="2-16"), "GPU 16 > 10"),  # more workers, cluster untouched
    (lambda d: d.update(cpus_per_worker=12), "more than any worker node type has"),
])
def test_a_preset_edited_without_cluster_yaml_fails(tmp_path, edit, message):
    data = load_preset("vit-b-32")
    edit(data)
    edited = preset(_write_yaml(tmp_path / "vit-b-32.yaml", data))
    with pytest.raises(DoesNotFit, match=message):
        pack(pretrain_demand_of(edited, edited.max_workers), cluster_of())


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["available_node_types"]["gpu_spot"].update(max_workers=4), "at its max_workers"),
    (lambda c: c.update(max_workers=6), "cluster-wide max_workers 6"),
])
def test_cluster_yaml_edited_without_the_presets_fails(tmp_path, edit, message):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    edit(config)
    validate_config(prepare_config(copy.deepcopy(config)))  # still a valid cluster.yaml for Ray...
    edited = cluster_of(_write_yaml(tmp_path / "cluster.yaml", config))
    for name in GPU_PRESETS:  # ...that no longer holds the presets
        cfg = preset(name)
        with pytest.raises(DoesNotFit, match=message):
            pack(pretrain_demand_of(cfg, cfg.max_workers), edited)


def test_caption_command_edited_without_cluster_yaml_fails(tmp_path):
    text = CLUSTER_YAML.read_text().replace("--max-actors 8", "--max-actors 12")
    assert text != CLUSTER_YAML.read_text()
    edited = tmp_path / "cluster.yaml"
    edited.write_text(text)
    with pytest.raises(DoesNotFit, match="caption actor"):
        pack(caption_demand_of(cluster_caption_command(edited)), cluster_of(edited))
