"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and config preparation)
with the layout the jobs rely on: a CPU-0 on-demand head, spot GPU workers preferred over an
on-demand fallback (checked with Ray's autoscaler v2 scheduler itself), CPU workers for decoding,
an S3 instance profile on every worker, the project installed with its pins, the dashboard on
localhost, and `alip spot-watch` started on every worker."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from autoscaler_v2 import v2_launches

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def workers(config: dict) -> dict:
    return {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}


def is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def test_valid_against_ray_autoscaler_schema(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before contacting AWS
    validate_config(prepared)  # jsonschema against ray/autoscaler/ray-schema.json + Ray's checks
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_schema_rejects_a_broken_variant(config):
    """The validation above can fail: an unknown key is refused by Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_spot"]["min_worker"] = 1  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_head_is_on_demand_and_runs_no_tasks(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert not is_spot(head)
    assert "IamInstanceProfile" not in head["node_config"]  # Ray's default ray-head-v1 applies
    assert "docker" not in config


def test_node_types_gpu_spot_first_on_demand_fallback_and_cpu_workers(config):
    types = workers(config)
    gpu = {n for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    cpu = {n for n, t in types.items() if not t["resources"].get("GPU")}
    assert {n for n in gpu if is_spot(types[n])} == {"gpu_spot"}
    assert {n for n in gpu if not is_spot(types[n])} == {"gpu_ondemand"}
    assert cpu == {"cpu_spot"} and types["cpu_spot"]["resources"]["CPU"] >= 8
    for t in types.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    assert sum(t["max_workers"] for t in types.values()) <= config["max_workers"]
    for name in gpu:
        assert types[name]["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    # Spot preferred explicitly: the same shape on demand has a lower priority.
    assert types["gpu_spot"]["resources"] == types["gpu_ondemand"]["resources"]
    assert types["gpu_spot"]["priority"] > types["gpu_ondemand"].get("priority", 0)
    assert types["gpu_spot"]["max_workers"] > types["gpu_ondemand"]["max_workers"]


def _v2_launches(config: dict, bundle: dict, count: int = 1, unavailable: tuple[str, ...] = ()):
    return v2_launches(config, [(bundle, count)], unavailable)


def test_ray_autoscaler_v2_launches_spot_first_then_on_demand(config):
    trainer = {"CPU": 2, "GPU": 1}
    assert _v2_launches(config, trainer) == ({"gpu_spot": 1}, 0)
    assert _v2_launches(config, trainer, unavailable=("gpu_spot",)) == ({"gpu_ondemand": 1}, 0)
    assert _v2_launches(config, {"CPU": 1}, count=10) == ({"cpu_spot": 1}, 0)  # decode: no GPU node
    # Control: it is the priority that decides (flipped, on-demand wins).
    flipped = copy.deepcopy(config)
    flipped["available_node_types"]["gpu_spot"]["priority"] = 0
    flipped["available_node_types"]["gpu_ondemand"]["priority"] = 10
    assert _v2_launches(flipped, trainer) == ({"gpu_ondemand": 1}, 0)


def test_every_worker_gets_the_s3_instance_profile_documented_in_the_header(config):
    text = CLUSTER_YAML.read_text()
    for name, t in workers(config).items():
        profile = t["node_config"].get("IamInstanceProfile")
        assert profile == {"Name": "alip-ray-worker"}, name
    # The header says how to create that profile, with S3 read/write on the bucket and PassRole for the head.
    for needed in ("create-instance-profile --instance-profile-name alip-ray-worker", "s3:GetObject",
                   "s3:PutObject", "s3:ListBucket", "iam:PassRole", "role/alip-ray-worker"):
        assert needed in text, needed


def test_setup_installs_this_project_with_its_pins_and_the_ofa_env_on_request(config):
    remote_dir = next(iter(config["file_mounts"]))
    assert config["file_mounts"][remote_dir] == "."
    setup = "\n".join(config["setup_commands"])
    assert f"-e {remote_dir}" in setup and "--python 3.11" in setup
    assert ".venv" in config["rsync_exclude"] and ".ofa-venv" in config["rsync_exclude"]
    ofa = "\n".join(config["worker_setup_commands"])
    assert "scripts/setup_ofa_env.sh" in ofa and 'if [ "$ALIP_OFA_ENV" = 1 ]' in ofa
    assert (CLUSTER_YAML.parent / "scripts/setup_ofa_env.sh").exists()
    # The OFA venv is where the workers look for it (alip/captioners/ofa.py reads ALIP_OFA_VENV).
    venv = ofa.split("setup_ofa_env.sh ", 1)[1].split(";")[0].strip()
    assert f"ALIP_OFA_VENV=$HOME/{venv.removeprefix('~/')}" in "\n".join(config["worker_start_ray_commands"])


def test_dashboard_on_localhost_and_token_auth_everywhere(config):
    head = "\n".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in CLUSTER_YAML.read_text()
    assert "ray dashboard cluster.yaml" in CLUSTER_YAML.read_text()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd or "spot-watch" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd


def test_every_ray_start_sets_the_raylet_environment_local_runs_use(config):
    """alip.ray_setup.RAYLET_ENV (the idle time of task processes: the pretraining read tasks) is
    set by init_local_ray for private local Rays; the cluster's `ray start` lines must set it too."""
    from alip.ray_setup import RAYLET_ENV

    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        exported = cmd.split("ray start")[0]
        for name, value in RAYLET_ENV.items():
            assert f"{name}={value}" in exported, (name, cmd)


def test_the_head_notices_a_dead_node_within_seconds(config):
    """alip.ray_setup.GCS_HEALTH_CHECK_ENV (its comment states the false-positive trade-off) is set
    where the GCS reads it: the head's `ray start` line."""
    from alip.ray_setup import GCS_HEALTH_CHECK_ENV

    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    for name, value in GCS_HEALTH_CHECK_ENV.items():
        assert f"{name}={value}" in head.split("ray start")[0], (name, head)
    period, timeout, misses = (int(GCS_HEALTH_CHECK_ENV[f"RAY_health_check_{k}"])
                               for k in ("period_ms", "timeout_ms", "failure_threshold"))
    assert (period + timeout) * misses <= 10_000  # a silent node is dead within ~10 s


def test_spot_watch_runs_in_the_background_on_every_worker(config):
    from alip.spot_watch import build_parser

    (cmd,) = [c for c in config["worker_start_ray_commands"] if "spot-watch" in c]
    start = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert config["worker_start_ray_commands"].index(cmd) > config["worker_start_ray_commands"].index(start[0])
    assert cmd.rstrip().endswith("&") and "nohup" in cmd and "< /dev/null" in cmd  # ssh returns at once
    assert ">> /tmp/ray/alip-spot-watch.log 2>&1" in cmd
    argv = shlex.split(cmd.split("alip spot-watch", 1)[1].split(">>")[0])
    args = build_parser().parse_args(argv)  # the flags are the CLI's real ones
    assert args.address == "$RAY_HEAD_IP:6379" and args.lock_file and not args.exit_after_drain
    # No node type overrides the global worker setup (a per-type list would replace it).
    assert not any("worker_setup_commands" in t for t in workers(config).values())


def test_jobs_named_in_the_header_exist(config):
    text = CLUSTER_YAML.read_text()
    root = CLUSTER_YAML.parent
    assert "ray up cluster.yaml" in text and "ray job submit" in text
    for job in ("ray_jobs/caption.py", "ray_jobs/pretrain.py"):
        assert job in text and (root / job).exists()
