"""The Ray Train pretraining job: driver side (validate, build the trainer, export, evaluate) and the
per-worker loop. The math lives in alip.training / alip.loss; this file only wires Ray around it.

Data: the captioned Parquet dataset, read as a stream of row groups in a seeded permutation per
epoch (alip.pretrain.stream). Global step s trains on stream rows [s G, (s + 1) G) whatever the
worker count; rank r of W trains a fixed slice of them. Each rank reads its own rows from the step
of the checkpoint it restored: read + decode + augment + tokenise only its own rows, in Ray CPU
tasks READ_AHEAD_ITEMS ahead of its step, in order (alip.pretrain.rank_reader says why plain
tasks and not Ray Data's streaming_split). Gates and loss are computed over the global batch by
ALIPLoss (all_gather across the DDP workers), so W workers train what one worker trains.

Elastic and fault tolerant (Ray Train V2):
- `num_workers: 2-8` is `ScalingConfig(num_workers=(2, 8))`: the run starts once 2 workers are
  placed; a lost node restarts the group smaller from the latest checkpoint, and Ray Train grows
  it back (same restart) when nodes return. The global batch G never changes: with W workers rank
  r takes `split_global_batch(G, W)[r]` rows, and the schedule (total steps) depends on G only.
- Every `preemption_check_every` steps all ranks call `ray.train.get_preemption_info()`; on a
  notice (a node drained with reason PREEMPTION, e.g. by `alip spot-watch`) rank 0 writes a
  just-in-time checkpoint at once, uploaded asynchronously, and training goes on; one more
  checkpoint at the last step that still lands before the deadline (`last_checkpoint_due`) keeps
  most of the steps trained after the notice. Preemptions count against `max_preemption_failures`
  (unlimited), not `max_failures`.
- A checkpoint holds model, optimiser, scheduler, gate momentum state and `position.json` (step,
  global samples consumed, the metrics log's offset): no metric history, so every checkpoint has
  the same size. When a worker group starts, each rank plans its stream from the step of the
  checkpoint it restored (`ray.train.get_checkpoint()`, checked against its position.json): nothing
  already trained on is read or decoded again, and what was decoded but not trained at a kill is
  the read-ahead in flight (a few items per rank).
Re-running the same command (same run name and storage path) resumes the same way.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from alip.cluster_fit import DATA_TASKS_PER_TRAIN_WORKER
from alip.data.dataset import iter_footers, list_shard_sizes
from alip.data.schema import CAPTION, IMAGE
from alip.data.storage import join, resolve
from alip.model import create_model, export_open_clip, model_config
from alip.pretrain.config import PretrainConfig
from alip.pretrain.metrics import MetricsLog, plot_history, read_history
from alip.pretrain.decode import READ_COLUMNS, read_and_decode
from alip.pretrain.local_copy import drop_local_copies, keep_local_copy
from alip.pretrain.stream import ReadUnit, batch_shares, n_rank_items, total_steps, units_of_shard
from alip.training import ALIPTrainer, TrainConfig, load_training_checkpoint, save_training_checkpoint

TRAINER_FILE = "trainer.pt"
POSITION_FILE = "position.json"
# Read-ahead of one rank, in read items (alip.pretrain.stream.rank_items: whole steps of its
# slice, at least MIN_ITEM_ROWS rows): READ_AHEAD_ITEMS decode tasks run ahead of the item being
# trained (alip.pretrain.rank_reader), as many as alip.cluster_fit makes room for next to each
# train worker. So a kill loses at most (READ_AHEAD_ITEMS + 1) items of decoding per rank
# (measured in tests/test_pretrain_job.py).
READ_AHEAD_ITEMS = DATA_TASKS_PER_TRAIN_WORKER


class PretrainConfigError(ValueError):
    """The job cannot start: raised on the driver before any worker is launched."""


def split_global_batch(global_batch_size: int, world_size: int) -> list[int]:
    """Rank r's share of the global batch (alip.training's rule, kept here too so the job also
    runs against a trainer that predates it): G // W, plus one row for the first G % W ranks."""
    try:
        from alip.training import split_global_batch as split
    except ImportError:
        base, extra = divmod(global_batch_size, world_size)
        return [base + (1 if r < extra else 0) for r in range(world_size)]
    return split(global_batch_size, world_size)


# ----------------------------------------------------------------------------- driver checks

def inspect_dataset(uri: str) -> tuple[list[ReadUnit], int]:
    """Read units (row groups) and total row count of a captioned dataset (Parquet metadata only,
    no data read). Fails clearly when the dataset is missing or has no `caption` column.

    The footers are read concurrently (alip.data.dataset.iter_footers: FOOTER_THREADS at a time,
    one request each on S3 with the sizes from the listing), checked in shard order like a plain
    loop: 40,000 shards at 50 ms a request take about half a minute instead of over an hour."""
    try:
        sizes = list_shard_sizes(uri, format="parquet")
    except ValueError as e:
        raise PretrainConfigError(f"training data {uri!r}: {e}") from e
    if not sizes:
        raise PretrainConfigError(f"training data {uri!r} has no Parquet shards")
    units: list[ReadUnit] = []
    for shard, meta in iter_footers(list(sizes), sizes):
        names = set(meta.schema.to_arrow_schema().names)
        missing = set(READ_COLUMNS) - names
        if missing:
            hint = " (caption it first: `alip caption --input ... --output ...`)" if CAPTION in missing else ""
            raise PretrainConfigError(f"training data shard {shard} lacks column(s) {sorted(missing)}{hint}")
        units += units_of_shard(shard, meta)
    return units, sum(u.rows for u in units)


def plan_steps(cfg: PretrainConfig, rows: int) -> int:
    """Total steps of the run: epochs x rows // G (or --max-steps), whatever the worker count."""
    if rows < cfg.train.global_batch_size:
        raise PretrainConfigError(
            f"dataset has {rows} rows: fewer than one global batch of {cfg.train.global_batch_size}; "
            "use a smaller --global-batch-size or more data"
        )
    return total_steps(rows, cfg.train.epochs, cfg.train.global_batch_size, cfg.train.max_steps)


def validate(cfg: PretrainConfig) -> tuple[list[ReadUnit], int, int]:
    try:
        cfg.validate()
    except ValueError as e:
        raise PretrainConfigError(str(e)) from e
    try:
        model_config(cfg.train.model)
    except ValueError as e:
        raise PretrainConfigError(str(e)) from e
    units, rows = inspect_dataset(cfg.data)
    return units, rows, plan_steps(cfg, rows)


# ----------------------------------------------------------------------------- data path

def rank_batches(cfg: PretrainConfig, units: list[ReadUnit], rows: int, rank: int, world_size: int,
                 first_step: int, end_step: int, device="cpu", read_ahead: int = READ_AHEAD_ITEMS):
    """Rank `rank`'s batches, one per step from `first_step` (its checkpoint's step) to `end_step`
    (the end of the schedule): its slice of each global batch, decoded in Ray tasks `read_ahead`
    items ahead (alip.pretrain.rank_reader), as the torch tensors the step takes (uint8 images,
    int64 tokens; pinned host memory on CUDA so the copy to the GPU can overlap)."""
    from alip.pretrain.rank_reader import read_ahead_items

    G = cfg.train.global_batch_size
    share = batch_shares(G, world_size)[rank]
    size, ctx_len = _geometry(cfg)
    pin = torch.device(device).type == "cuda"
    items = read_ahead_items(
        read_and_decode, n_rank_items(first_step, end_step, share), read_ahead, num_cpus=cfg.data_cpus,
        kwargs={"first_step": first_step, "end_step": end_step, "units": units, "seed": cfg.train.seed,
                "global_batch_size": G, "world_size": world_size, "rank": rank,
                "shuffle_window": shuffle_window(cfg, rows), "image_size": size, "context_length": ctx_len})
    for arrays in items:
        tensors = {IMAGE: _host_tensor(arrays[IMAGE], torch.uint8, pin),  # stays uint8: normalised on the device
                   "raw_tokens": _host_tensor(arrays["raw_tokens"], torch.int64, pin),
                   "caption_tokens": _host_tensor(arrays["caption_tokens"], torch.int64, pin)}
        for s in range(len(tensors[IMAGE]) // share):
            yield {k: v[s * share:(s + 1) * share] for k, v in tensors.items()}


def _host_tensor(array: np.ndarray, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """`array` copied, once, into a tensor the trainer owns (pinned on CUDA, so its slices copy to
    the GPU asynchronously). The arrays come out of Ray's object store READ-ONLY (zero-copy): a
    tensor over them would be undefined behaviour on any write (torch warns). The copy is the one
    the uint16 -> int64 widening and pinning made anyway; for the uint8 images it is a memcpy of
    one read item (tens of MB at 224 px), next to a training step."""
    out = torch.empty(array.shape, dtype=dtype, pin_memory=pin)
    out.numpy()[...] = array
    return out


def _geometry(cfg: PretrainConfig) -> tuple[int, int]:
    model_cfg = model_config(cfg.train.model)
    size = model_cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    return size, model_cfg.get("text_cfg", {}).get("context_length", 77)


def shuffle_window(cfg: PretrainConfig, rows: int) -> int:
    """The stream's shuffle window in rows, from the byte bound `shuffle_buffer_mb` (what that many
    decoded samples, uint8 pixels + two token rows, take), at most one epoch."""
    if not cfg.shuffle_buffer_mb:
        return 0
    size, ctx_len = _geometry(cfg)
    per_sample = 3 * size * size + 2 * ctx_len * 8
    return max(0, min(rows, int(cfg.shuffle_buffer_mb * 2**20 // per_sample)))


# ----------------------------------------------------------------------------- worker loop

def _read_position(checkpoint) -> dict:
    """position.json of a checkpoint, read alone (a few hundred bytes, even from S3)."""
    path = f"{checkpoint.path.rstrip('/')}/{POSITION_FILE}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return {}


def _restore(trainer: ALIPTrainer, checkpoint, run_name: str) -> tuple[dict, str]:
    """Load the checkpoint into `trainer`: from this node's local copy when rank 0 wrote it here
    (alip.pretrain.local_copy), else from storage. Returns (position, where it came from)."""
    from alip.pretrain.local_copy import find_local_copy

    position = _read_position(checkpoint)
    local = find_local_copy(run_name, position.get("checkpoint_id"))
    if local is not None:
        load_training_checkpoint(trainer, local)
        return position, "this node's local copy"
    with checkpoint.as_directory() as d:  # a local path as it is; from S3, a download
        load_training_checkpoint(trainer, os.path.join(d, TRAINER_FILE))
    return position, "storage"


def train_loop_per_worker(config: dict) -> None:
    import logging

    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    # Ray Train logs every report() at INFO with all metrics; our progress line says it shorter.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)  # Ray sets the workers' root logger to INFO (open_clip is chatty)
    cfg = PretrainConfig.from_dict({**config["job"], "train": TrainConfig.from_dict(config["job"]["train"])})
    steps = config["total_steps"]
    G = cfg.train.global_batch_size
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts)
    model = create_model(cfg.train.model, init_temperature=cfg.train.init_temperature)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    trainer = ALIPTrainer(cfg.train, model, steps, rank=rank, world_size=world, device=device)

    position: dict = {}
    restored = ray.train.get_checkpoint()
    if restored:
        t_restore = time.perf_counter()
        position, source = _restore(trainer, restored, cfg.run_name)
        restore_s = time.perf_counter() - t_restore
        if position and int(position.get("step", trainer.step)) != trainer.step:
            raise RuntimeError(f"checkpoint position.json says step {position.get('step')}, "
                               f"its trainer state says {trainer.step}")
        if position and int(position.get("samples", trainer.step * G)) != trainer.step * G:
            # The stream position is step * G: a different global batch would resume elsewhere.
            raise RuntimeError(f"checkpoint position.json says {position['samples']} samples consumed at step "
                               f"{trainer.step}: it was written with another global batch size than {G}")
        if rank == 0:
            print(f"[pretrain] resumed from checkpoint at step {trainer.step}/{steps} "
                  f"(gate state {trainer.gate_state.to_dict()}) with {world} worker(s); "
                  f"read from {source} in {restore_s:.1f}s", flush=True)
    elif rank == 0:
        print(f"[pretrain] starting with {world} worker(s): rank shares {split_global_batch(G, world)} "
              f"of the global batch {G}", flush=True)
    run_uri = join(cfg.storage_path, cfg.run_name)
    metrics_log = MetricsLog(run_uri, steps, cfg.log_every, trainer.step, position.get("metrics_offset")) \
        if rank == 0 else None

    def checkpoint_and_report(metrics: dict, reason: str, upload=CheckpointUploadMode.ASYNC) -> None:
        """Rank 0 writes the checkpoint; every rank reports (Ray Train's report is collective).
        ASYNC upload: training continues while the files go to storage (SYNC: report returns once
        they are there)."""
        if rank != 0:
            ray.train.report({"step": trainer.step, "reason": reason}, checkpoint=None,
                             checkpoint_upload_mode=upload)
            return
        offset = metrics_log.commit(trainer.step)
        tmp = tempfile.mkdtemp(prefix="alip-ckpt-")  # deleted by Ray once uploaded
        save_training_checkpoint(trainer, os.path.join(tmp, TRAINER_FILE))
        # A hard link on this node outlives Ray's deletion of `tmp`: a restart that places a rank
        # here reads it from local disk instead of storage (alip.pretrain.local_copy).
        checkpoint_id = keep_local_copy(cfg.run_name, os.path.join(tmp, TRAINER_FILE), cfg.keep_checkpoints)
        Path(tmp, POSITION_FILE).write_text(json.dumps(
            {"step": trainer.step, "samples": trainer.step * G, "global_batch_size": G,
             "epoch": trainer.step * G // config["rows"], "num_workers": world, "metrics_offset": offset,
             "checkpoint_id": checkpoint_id}))
        ray.train.report({"step": trainer.step, "reason": reason, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_upload_mode=upload)

    # This rank's own stream from the restored step: its slice of every remaining global batch.
    if rank == 0 and trainer.step < steps:
        print(f"[pretrain] data stream starts at step {trainer.step}, global sample {trainer.step * G} "
              f"(epoch {trainer.step * G // config['rows']})", flush=True)
    batches = rank_batches(cfg, config["units"], config["rows"], rank, world, trainer.step, steps, device)
    # An elastic group grows at a checkpoint boundary: the policy asks, rank 0 answers with a checkpoint.
    grow = _GrowBoundary(cfg.run_name, rank, world, device) if cfg.elastic else None
    notice_seen = None  # the preemption notice a just-in-time checkpoint was already written for
    last_call = None  # the notice's last-moment checkpoint, once written
    timer = _StepTimer()
    last_metrics: dict = {}
    for batch in batches:
        if trainer.step >= steps:
            break  # --max-steps / end of schedule: stop reading at once
        timer.start()
        result = trainer.train_step(batch["image"], batch["raw_tokens"], batch["caption_tokens"])
        last_metrics = dict(result.metrics)
        if metrics_log is not None:
            metrics_log.log(trainer.step, {"epoch": trainer.step * G // config["rows"], **last_metrics}, samples=G)
        timer.stop_step()
        if trainer.step % cfg.preemption_check_every == 0 or trainer.step == steps:
            info = ray.train.get_preemption_info()  # a barrier: every rank calls it at the same steps
            if info is not None and info != notice_seen and trainer.step < steps:
                notice_seen, last_call = info, None
                if rank == 0:
                    left = (info.deadline_ms / 1000 - time.time()) if info.deadline_ms else float("nan")
                    print(f"[pretrain] preemption notice for node(s) {info.preempted_node_ids} "
                          f"(ranks {info.preempted_ranks}, {left:.0f}s left): just-in-time checkpoint "
                          f"at step {trainer.step}", flush=True)
                with timer.checkpoint():
                    checkpoint_and_report(_host(last_metrics), "preemption")
                continue
            if grow is not None and notice_seen is None and trainer.step < steps and grow.asked():
                # Room for more workers: checkpoint now (uploaded before report returns), say so, and
                # train on until Ray Train restarts the group larger from this step.
                if rank == 0:
                    print(f"[pretrain] checkpoint at step {trainer.step} for the group to grow", flush=True)
                with timer.checkpoint():
                    checkpoint_and_report(_host(last_metrics), "grow", upload=CheckpointUploadMode.SYNC)
                grow.answer(trainer.step)
                continue
        if notice_seen is not None and last_call is None and trainer.step < steps \
                and _last_moment(notice_seen, timer, rank, world, device):
            # Training went on after the notice; just before the deadline, keep those steps too.
            last_call = trainer.step
            if rank == 0:
                print(f"[pretrain] last checkpoint before the preemption deadline at step {trainer.step}", flush=True)
            with timer.checkpoint():
                checkpoint_and_report(_host(last_metrics), "preemption")
            continue
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == steps:
            with timer.checkpoint():
                checkpoint_and_report(_host(last_metrics), "final" if trainer.step == steps else "periodic")
    if trainer.step < steps:
        raise RuntimeError(f"the data stream ended at step {trainer.step} of {steps}")
    drop_local_copies(cfg.run_name)  # the final checkpoint is reported: restarts are over
    if metrics_log is not None:
        metrics_log.close()


class _GrowBoundary:
    """Rank 0's side of alip.pretrain.elastic.GrowHandshake: at each preemption check, has the
    policy asked for a checkpoint to grow on (a request not answered yet)? Rank 0 reads the KV and
    broadcasts the answer so that every rank reports together."""

    def __init__(self, run_name: str, rank: int, world: int, device):
        from alip.pretrain.elastic import GrowHandshake

        self.handshake = GrowHandshake(run_name) if rank == 0 else None
        self.rank, self.world, self.device = rank, world, device
        self._answered = None  # the request ("at") already answered

    def asked(self) -> bool:
        wanted = False
        if self.handshake is not None:
            try:
                request = self.handshake.wanted()
            except Exception:  # the KV unreachable: the policy grows without the boundary
                request = None
            wanted = request is not None and request.get("at") != self._answered
            if wanted:
                self._answered = request.get("at")
        if self.world == 1 or not torch.distributed.is_initialized():
            return wanted
        flag = torch.tensor([1 if wanted else 0], dtype=torch.int32, device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    def answer(self, step: int) -> None:
        if self.handshake is not None:
            with contextlib.suppress(Exception):
                self.handshake.ready(step)


class _StepTimer:
    """Seconds per step and per checkpoint (moving averages): how close to a preemption deadline
    the last checkpoint can be left."""

    def __init__(self):
        self.step_s, self.ckpt_s, self._t = None, None, None

    @staticmethod
    def _ema(old, new):
        return new if old is None else 0.7 * old + 0.3 * new

    def start(self):
        self._t = time.perf_counter()

    def stop_step(self):
        self.step_s = self._ema(self.step_s, time.perf_counter() - self._t)

    @contextlib.contextmanager
    def checkpoint(self):
        t = time.perf_counter()
        yield
        self.ckpt_s = self._ema(self.ckpt_s, time.perf_counter() - t)


def registration_margin_s(polls: int = 2) -> float:
    """Seconds a reported checkpoint needs, after its upload, before Ray Train has taken it in.
    The controller collects reports when it polls the workers, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
    (2 s) apart, and at a preemption deadline it tears the group down at once: a checkpoint
    uploaded but not yet collected is lost. (bench_chaos lost one reported 1 s before the deadline:
    the files were in storage, the run resumed 33 steps earlier.) Two polls and a second of slack."""
    from ray.train.v2._internal.constants import DEFAULT_HEALTH_CHECK_INTERVAL_S, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    return polls * float(os.environ.get(HEALTH_CHECK_INTERVAL_S_ENV_VAR, DEFAULT_HEALTH_CHECK_INTERVAL_S)) + 1.0


def last_checkpoint_due(left_s: float, step_s: float, checkpoint_s: float | None, margin_s: float) -> bool:
    """With `left_s` seconds to the preemption deadline, is this step the last one after which a
    checkpoint still lands? Another step + its checkpoint write + the async upload (about as long as
    the write) must fit, with a step to spare, plus Ray Train's `margin_s` to take it in."""
    checkpoint_s = step_s if checkpoint_s is None else checkpoint_s
    return left_s < 2 * step_s + 3 * checkpoint_s + margin_s


def _last_moment(info, timer: _StepTimer, rank: int, world: int, device) -> bool:
    """Is this the last step at which a checkpoint still lands (written, uploaded and taken in by
    Ray Train) before the preemption deadline? Rank 0 decides from its timings and broadcasts the
    decision, so every rank reports together (a report is collective). A tiny broadcast per step,
    only while a notice is pending."""
    now_or_never = False
    if rank == 0 and info.deadline_ms and timer.step_s is not None:
        left = info.deadline_ms / 1000 - time.time()
        now_or_never = last_checkpoint_due(left, timer.step_s, timer.ckpt_s, registration_margin_s())
    if world == 1 or not torch.distributed.is_initialized():
        return now_or_never
    flag = torch.tensor([1 if now_or_never else 0], dtype=torch.int32, device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _host(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        out[k] = float(v) if isinstance(v, torch.Tensor) else v
    return out


# ----------------------------------------------------------------------------- driver

def _ensure_ray() -> None:
    from alip.ray_setup import connect_ray

    # $RAY_ADDRESS (`ray job submit`, a test's cluster) attaches; otherwise a private local Ray.
    connect_ray()


def run_training(cfg: PretrainConfig, plan: tuple[list[ReadUnit], int, int] | None = None):
    """Validate (unless ``plan``, what :func:`validate` returned, is given), then fit with Ray Train.
    Returns (result, summary dict). Passing the plan saves a second read of every shard's footer
    (about half the start-up at LAION scale: bench/bench_scale.py)."""
    units, rows, steps = plan if plan is not None else validate(cfg)
    _ensure_ray()
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress line instead
    G = cfg.train.global_batch_size
    workers = f"{cfg.min_workers}-{cfg.max_workers} (elastic)" if cfg.elastic else str(cfg.max_workers)
    print(f"[pretrain] run {cfg.run_name!r}: {cfg.train.objective} on {cfg.train.model}, {rows} rows in "
          f"{len(units)} row group(s), {workers} worker(s), global batch {G}, {steps} steps; "
          f"storage {cfg.storage_path}/{cfg.run_name}", flush=True)
    storage = resolve(cfg.storage_path)
    if not storage.is_s3:
        os.makedirs(storage.path, exist_ok=True)
    run_config = ray.train.RunConfig(
        name=cfg.run_name,
        storage_path=storage.path,
        storage_filesystem=storage.fs if storage.is_s3 else None,
        # Crashes use up max_failures; node preemptions (drained with reason PREEMPTION) do not.
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures, max_preemption_failures=-1),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
    )
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {}), **_extra_worker_resources()}
    scaling = ray.train.ScalingConfig(
        num_workers=(cfg.min_workers, cfg.max_workers) if cfg.elastic else cfg.max_workers,
        use_gpu=cfg.use_gpu, resources_per_worker=resources,
        elastic_resize_monitor_interval_s=cfg.elastic_resize_interval_s,
    )
    t0 = time.perf_counter()
    for attempt in range(CONTROLLER_RETRIES + 1):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"job": cfg.to_dict(), "total_steps": steps, "rows": rows, "units": units},
            scaling_config=scaling,
            run_config=run_config,
        )
        try:
            with _elastic_policy(cfg):
                result = trainer.fit()
            break
        except ray.train.ControllerError as e:
            # Ray Train retries worker failures itself, but an error inside its controller (seen: a worker
            # group restarting after a SIGKILL whose new workers died with their placement group on a
            # loaded node) ends fit(). The run's checkpoints are all in storage, so fitting again is a
            # resume (the same path as rerunning the command), not a restart from step 0.
            if attempt == CONTROLLER_RETRIES:
                raise
            why = str(e).strip().splitlines()
            print(f"[pretrain] Ray Train's controller failed ({why[-1] if why else type(e).__name__}); fitting "
                  f"again from the run's last checkpoint (retry {attempt + 1}/{CONTROLLER_RETRIES})", flush=True)
    summary = {"run_name": cfg.run_name, "objective": cfg.train.objective, "model": cfg.train.model,
               "total_steps": steps, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    return result, summary


#: fit() again after this many Ray Train controller errors (each one resumes from the last checkpoint)
CONTROLLER_RETRIES = 2

# Ray Train waits this long for a new group's placement group (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
# read by its controller: ray/train/v2/_internal/execution/worker_group/worker_group.py, only around
# `pg_handle.wait`). Ray's default, 60 s, is sized for an autoscaler launching nodes; an elastic
# group asks only for what its fresh view (alip.pretrain.elastic) says is there, so placement takes
# well under a second and a longer wait only means a node died during the start: failing after
# 15 s and deciding again with a fresh view is the faster way out. Set the variable to override.
ELASTIC_GROUP_START_TIMEOUT_S = "15"
ELASTIC_HEALTH_CHECK_INTERVAL_S = "1"


@contextlib.contextmanager
def _elastic_policy(cfg: PretrainConfig):
    """An elastic run fits with alip.pretrain.elastic's policy (true view, join rule) and a short
    group start timeout; a fixed-size run with Ray Train's own."""
    if not cfg.elastic:
        yield
        return
    from alip.pretrain.elastic import fresh_view_elastic_policy

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", ELASTIC_GROUP_START_TIMEOUT_S)
    # Ray Train's controller polls its workers every 2 s by default: a failure is acted on, and a
    # grow checkpoint taken in, up to one poll later. 1 s halves that for one tiny RPC per worker a
    # second (Ray Train forwards the variable to its controller and workers).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", ELASTIC_HEALTH_CHECK_INTERVAL_S)
    # The grow checkpoint is uploaded (SYNC) before rank 0 answers: one controller poll takes it in.
    with fresh_view_elastic_policy(cfg.run_name, cfg.min_node_uptime_s, registration_margin_s(polls=1)):
        yield


def _extra_worker_resources() -> dict:
    """Custom resources each train worker asks for, from ALIP_TRAIN_WORKER_RESOURCES (JSON), e.g.
    '{"trainer": 1}' so that each node of a simulated cluster hosts exactly one worker."""
    raw = os.environ.get("ALIP_TRAIN_WORKER_RESOURCES")
    return json.loads(raw) if raw else {}


def finish_run(cfg: PretrainConfig, checkpoint, summary: dict) -> dict:
    """From the final checkpoint: export the open_clip model, plot, zero-shot on the world splits."""
    from alip.eval.zeroshot import evaluate_world_zeroshot

    run_uri = join(cfg.storage_path, cfg.run_name)
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, TRAINER_FILE), map_location="cpu", weights_only=False)
    history = read_history(run_uri, upto_step=int(state["step"]))
    model = create_model(state["model_name"])
    model.load_state_dict(state["model"])
    model.eval()
    summary["final_step"] = int(state["step"])
    summary["gate_state"] = state["gate_state"]
    out_local = Path(tempfile.mkdtemp(prefix="alip-run-")) if run_uri.startswith("s3://") else Path(run_uri)
    if history:
        summary["plot"] = str(plot_history(history, out_local / "training.png", title=f"{cfg.run_name} ({cfg.train.objective})"))
        if run_uri.startswith("s3://"):  # the whole log in one file beside the segments
            (out_local / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        last = history[-1]
        summary["final_metrics"] = {k: last[k] for k in ("loss", "loss_raw", "loss_caption", "infonce_raw",
                                                         "infonce_caption", "fraction_caption_over_raw") if k in last}
    if cfg.export:
        export_open_clip(model, out_local / "export", gates={"state": state["gate_state"], "sharpness": cfg.train.gate_sharpness, "momentum": cfg.train.gate_momentum, "objective": cfg.train.objective, "step": int(state["step"])})
        summary["export"] = join(run_uri, "export")
    if cfg.eval_samples:
        summary["zeroshot"] = evaluate_world_zeroshot(model, n=cfg.eval_samples)
    (out_local / "summary.json").write_text(json.dumps(summary, indent=2))
    if run_uri.startswith("s3://"):
        import pyarrow.fs as pafs

        dest = resolve(run_uri)
        pafs.copy_files(str(out_local), dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
        shutil.rmtree(out_local, ignore_errors=True)
    return summary


def format_zeroshot_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per run, one column per world task (top-1 %), plus the average."""
    tasks = sorted({t for r in rows.values() for t in r})
    lines = ["| run | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for name, accs in rows.items():
        vals = [accs.get(t, float("nan")) for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + f" | {100 * float(np.nanmean(vals)):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from alip.pretrain.config import config_from_args

    try:
        cfg = config_from_args(argv)
        plan = validate(cfg)
    except ValueError as e:
        raise SystemExit(f"alip pretrain: error: {e}")
    result, summary = run_training(cfg, plan)
    if result.checkpoint is None:
        raise SystemExit("alip pretrain: training produced no checkpoint")
    summary = finish_run(cfg, result.checkpoint, summary)
    if "zeroshot" in summary:
        print("\nZero-shot top-1 on the built-in world's held-out splits:")
        print(format_zeroshot_table({cfg.run_name: {t: v["top1"] for t, v in summary["zeroshot"].items()}}))
    print(f"\n[pretrain] done: {summary['final_step']} steps in {summary['seconds']}s; "
          f"export {summary.get('export')}; plot {summary.get('plot')}")
    return summary
