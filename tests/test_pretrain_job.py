"""The Ray Train pretraining job: config errors before any worker, 2 workers == 1 worker,
a SIGKILLed worker is replaced, and a killed run resumes when the same command is re-run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alip.pretrain.config import config_from_args
from alip.pretrain.job import PretrainConfigError, main, validate
from world_fixtures import write_reference_captioned_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    return write_reference_captioned_world(tmp_path_factory.mktemp("captioned"), n=512, shards=4)


def small_args(data, storage, run, *extra):
    return ["--config", "tiny", "--data", str(data), "--storage-path", str(storage), "--run-name", run,
            "--model", "alip-micro", "--global-batch-size", "32", "--log-every", "1", "--eval-samples", "30",
            "--cpus-per-worker", "0.5", "--data-cpus", "0.25", *extra]


# ---------------------------------------------------------------------------- config errors (no Ray)

def test_every_field_is_a_flag_and_presets_load(captioned, tmp_path):
    cfg = config_from_args(small_args(captioned, tmp_path, "r", "--lr", "5e-4", "--num-workers", "4",
                                      "--objective", "clip", "--max-steps", "7"))
    assert (cfg.train.lr, cfg.num_workers, cfg.train.objective, cfg.train.max_steps) == (5e-4, 4, "clip", 7)
    b32 = config_from_args(["--config", "vit-b-32"])
    assert (b32.train.model, b32.train.global_batch_size, b32.train.lr, b32.train.weight_decay) == \
        ("ViT-B-32", 4096, 1e-3, 0.2)
    assert config_from_args(["--config", "vit-b-16"]).train.model == "ViT-B-16"


@pytest.mark.parametrize("args, message", [
    (["--config", "nope"], "unknown config preset 'nope'"),
    (["--num-workers", "3"], "not divisible by num_workers 3"),
    (["--model", "ViT-Q-1"], "unknown model config"),
])
def test_bad_config_fails_before_any_worker(captioned, tmp_path, args, message, capsys):
    import ray

    with pytest.raises(SystemExit) as e:
        main(small_args(captioned, tmp_path, "r") + args)
    assert message in str(e.value)
    assert not ray.is_initialized()


def test_dataset_without_caption_is_refused(tmp_path):
    raw = write_reference_captioned_world(tmp_path / "raw", n=64, shards=1, with_caption=False)
    cfg = config_from_args(small_args(raw, tmp_path, "r"))
    with pytest.raises(PretrainConfigError, match=r"lacks column\(s\) \['caption'\].*alip caption"):
        validate(cfg)
    with pytest.raises(PretrainConfigError, match="no Parquet shards|does not exist"):
        validate(config_from_args(small_args(tmp_path / "missing", tmp_path, "r")))


# ---------------------------------------------------------------------------- Ray Train: 2 workers == 1

def fixed_batch_loop(config):
    """Train alip-micro on 3 fixed global batches; each rank takes its slice."""
    import ray.train
    import ray.train.torch

    from alip.model import create_model, get_tokenizer
    from alip.training import ALIPTrainer, TrainConfig

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(create_model("alip-micro"))
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=8, precision="fp32"),
                          model, total_steps=3, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(1)
    tok = get_tokenizer("alip-micro")
    history = []
    per = 8 // world
    for step in range(3):
        images = torch.randn(8, 3, 32, 32, generator=g)
        raw = tok([f"raw text {step} {k}" for k in range(8)])
        cap = tok([f"a caption {k} of step {step}" for k in range(8)])
        sl = slice(rank * per, (rank + 1) * per)
        history.append(trainer.train_step(images[sl], raw[sl], cap[sl]).metrics)
    checksum = float(sum(p.double().sum() for p in trainer.unwrapped.parameters()))
    # Ray Train V2 keeps the metrics of reports that carry a checkpoint: rank 0 attaches one.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "history.json").write_text(json.dumps(history))
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({"history": json.dumps(history), "checksum": checksum}, checkpoint=ckpt)


@pytest.mark.slow
def test_ray_train_two_workers_equal_one_worker(tmp_path):
    import ray
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        results = {}
        for workers in (1, 2):
            trainer = TorchTrainer(
                fixed_batch_loop,
                scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                run_config=ray.train.RunConfig(name=f"eq{workers}", storage_path=str(tmp_path)),
            )
            results[workers] = trainer.fit().metrics
    finally:
        ray.shutdown()
    one, two = json.loads(results[1]["history"]), json.loads(results[2]["history"])
    for m1, m2 in zip(one, two):
        for key in ("loss", "loss_raw", "loss_caption", "mean_sample_weight", "mean_raw_pair_weight",
                    "mean_caption_pair_weight", "momentum_text_caption", "momentum_image_text",
                    "momentum_image_caption", "fraction_caption_over_raw"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    assert results[2]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-6)


# ---------------------------------------------------------------------------- real failures (subprocesses)

def start_job(args, log_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(REPO / "ray_jobs" / "pretrain.py"), *args],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=REPO)


def wait_for_step(metrics_file: Path, step: int, proc, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics_file.exists():
            lines = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
            if lines and lines[-1]["step"] >= step:
                return lines[-1]["step"]
        assert proc.poll() is None, "job ended before reaching the step"
        time.sleep(0.5)
    raise TimeoutError(f"step {step} not reached")


def wait_for_registered_checkpoint(run_dir: Path, proc, timeout=900) -> int:
    """Step of the latest checkpoint Ray Train has *registered* (its manager snapshot). A checkpoint
    uploaded seconds before a crash but not yet registered by the controller does not count."""
    deadline = time.time() + timeout
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline:
        if snapshot.exists():
            try:
                results = json.loads(snapshot.read_text())["checkpoint_results"]
            except (ValueError, KeyError):
                results = []
            if results:
                return max(r["metrics"]["step"] for r in results)
        assert proc.poll() is None, "job ended before registering a checkpoint"
        time.sleep(0.5)
    raise TimeoutError("no checkpoint registered")


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command) of the live processes in session `sid`: the job was started with
    start_new_session, and its local Ray (raylet, workers) stays in that session. Scoping by
    session keeps these tests away from any other Ray running on the machine."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    procs = []
    for line in out.splitlines():
        pid, proc_sid, stat, args = (line.split(None, 3) + [""])[:4]
        if int(proc_sid) == sid and not stat.startswith("Z"):
            procs.append((int(pid), args))
    return procs


def train_worker_pids(sid: int) -> list[int]:
    return [pid for pid, args in session_processes(sid) if "RayTrainWorker" in args]


def kill_session(sid: int) -> None:
    for pid, _ in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sigkill_a_training_worker_and_the_run_finishes(captioned, tmp_path):
    log = tmp_path / "job.log"
    proc = start_job(small_args(captioned, tmp_path, "kill", "--max-steps", "24", "--checkpoint-every", "6"), log)
    try:
        registered = wait_for_registered_checkpoint(tmp_path / "kill", proc)
        wait_for_step(tmp_path / "kill" / "logs" / "metrics.jsonl", registered + 2, proc)
        pids = train_worker_pids(proc.pid)
        assert len(pids) >= 2, pids
        os.kill(pids[-1], signal.SIGKILL)
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    assert f"resumed from checkpoint at step {registered}/24" in text, text[-3000:]
    assert text.count("step 1/24 ") == 1  # it continued, it did not start over
    summary = json.loads((tmp_path / "kill" / "summary.json").read_text())
    assert summary["final_step"] == 24
    steps = [json.loads(x)["step"] for x in (tmp_path / "kill" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # every step once, none lost, none twice


@pytest.mark.slow
def test_killed_run_resumes_when_rerun(captioned, tmp_path):
    args = small_args(captioned, tmp_path, "resume", "--max-steps", "20", "--checkpoint-every", "5")
    proc = start_job(args, tmp_path / "first.log")
    try:
        registered = wait_for_registered_checkpoint(tmp_path / "resume", proc)
        wait_for_step(tmp_path / "resume" / "logs" / "metrics.jsonl", registered + 2, proc)
    finally:
        kill_session(proc.pid)  # the whole run: driver, its local Ray and the workers
        proc.wait()
    snapshot = json.loads((tmp_path / "resume" / "checkpoint_manager_snapshot.json").read_text())
    latest = max(snapshot["checkpoint_results"], key=lambda r: r["metrics"]["step"])
    saved = torch.load(tmp_path / "resume" / latest["checkpoint_dir_name"] / "trainer.pt", weights_only=False)
    assert saved["step"] >= registered and saved["step"] % 5 == 0

    proc = start_job(args, tmp_path / "second.log")
    try:
        assert proc.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        kill_session(proc.pid)
    text = (tmp_path / "second.log").read_text()
    assert f"resumed from checkpoint at step {saved['step']}/20 (gate state {saved['gate_state']})" in text
    assert "step 1/20 " not in text  # it did not start over
    summary = json.loads((tmp_path / "resume" / "summary.json").read_text())
    assert summary["final_step"] == 20
    assert Path(summary["plot"]).is_file() and (tmp_path / "resume" / "export" / "open_clip_model.safetensors").is_file()
    assert set(summary["zeroshot"]) == {"shape", "colour", "colour_shape", "pattern"}
