"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and config preparation)
with the layout the jobs rely on: CPU-0 on-demand head, spot GPU workers, on-demand fallback."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_valid_against_ray_autoscaler_schema(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before contacting AWS
    validate_config(prepared)  # jsonschema against ray/autoscaler/ray-schema.json + Ray's checks
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_schema_rejects_a_broken_variant(config):
    """The validation above can fail: an unknown top-level key is refused by Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_spot"]["min_worker"] = 1  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_head_is_on_demand_and_runs_no_tasks(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "InstanceMarketOptions" not in head["node_config"]
    assert "docker" not in config


def test_spot_gpu_workers_with_on_demand_fallback(config):
    types = config["available_node_types"]
    spot = [n for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    on_demand = [n for n, t in types.items() if n != config["head_node_type"] and n not in spot]
    assert spot == ["gpu_spot"] and on_demand == ["gpu_ondemand"]
    for name in spot + on_demand:
        t = types[name]
        assert t["resources"].get("GPU", 0) >= 1
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
        assert t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    assert types["gpu_spot"]["max_workers"] > types["gpu_ondemand"]["max_workers"]


def test_setup_installs_this_project_from_the_synced_working_dir(config):
    remote_dir = next(iter(config["file_mounts"]))
    assert config["file_mounts"][remote_dir] == "."
    setup = "\n".join(config["setup_commands"])
    assert f"-e {remote_dir}" in setup and "--python 3.11" in setup
    assert ".venv" in config["rsync_exclude"]


def test_jobs_named_in_the_header_exist(config):
    text = CLUSTER_YAML.read_text()
    root = CLUSTER_YAML.parent
    assert "ray up cluster.yaml" in text and "ray job submit" in text
    for job in ("ray_jobs/caption.py", "ray_jobs/pretrain.py"):
        assert job in text and (root / job).exists()
