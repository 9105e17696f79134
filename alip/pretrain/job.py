"""The Ray Train pretraining job: driver side (validate, build the trainer, export, evaluate) and the
per-worker loop. The math lives in alip.training / alip.loss; this file only wires Ray around it.

Data: the captioned Parquet dataset -> Ray Data (decode + augment + tokenise in CPU tasks) ->
`get_dataset_shard("train").iter_torch_batches(per-worker batch)`. Gates and loss are computed over
the global batch by ALIPLoss (all_gather across the DDP workers).

Fault tolerance: rank 0 checkpoints every `checkpoint_every` steps via `ray.train.report`;
FailureConfig(max_failures) restarts a dead worker group from the latest checkpoint, and re-running
the same command with the same run name and storage path resumes (Ray Train V2 restores the run's
checkpoint state from storage). A checkpoint holds model, optimiser, scheduler, gate momentum state,
step, data position (epoch, batches consumed) and the metric history.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from alip.data.dataset import list_shards
from alip.data.schema import CAPTION, IMAGE, KEY, RAW_TEXT
from alip.data.storage import join, resolve
from alip.model import create_model, export_open_clip, model_config
from alip.pretrain.config import PretrainConfig
from alip.pretrain.metrics import MetricsLog, plot_history
from alip.training import ALIPTrainer, TrainConfig, load_training_checkpoint, save_training_checkpoint

TRAINER_FILE = "trainer.pt"
POSITION_FILE = "position.json"
HISTORY_FILE = "metrics.jsonl"


class PretrainConfigError(ValueError):
    """The job cannot start: raised on the driver before any worker is launched."""


# ----------------------------------------------------------------------------- driver checks

def inspect_dataset(uri: str) -> tuple[list[str], int]:
    """Shard URIs and total row count of a captioned dataset (Parquet metadata only, no data read).
    Fails clearly when the dataset is missing or has no `caption` column."""
    try:
        shards = list_shards(uri, format="parquet")
    except ValueError as e:
        raise PretrainConfigError(f"training data {uri!r}: {e}") from e
    if not shards:
        raise PretrainConfigError(f"training data {uri!r} has no Parquet shards")
    rows = 0
    for shard in shards:
        loc = resolve(shard)
        with loc.fs.open_input_file(loc.path) as f:
            meta = pq.ParquetFile(f).metadata
            names = set(meta.schema.to_arrow_schema().names)
            rows += meta.num_rows
        missing = {KEY, IMAGE, RAW_TEXT, CAPTION} - names
        if missing:
            hint = " (caption it first: `alip caption --input ... --output ...`)" if CAPTION in missing else ""
            raise PretrainConfigError(f"training data shard {shard} lacks column(s) {sorted(missing)}{hint}")
    return shards, rows


def plan_steps(cfg: PretrainConfig, rows: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps). Every worker gets rows // workers rows (Ray's equal split)
    and takes whole per-worker batches; the global batch is fixed whatever the worker count."""
    per_worker_rows = rows // cfg.num_workers
    steps_per_epoch = per_worker_rows // cfg.per_worker_batch_size
    if steps_per_epoch < 1:
        raise PretrainConfigError(
            f"dataset has {rows} rows: fewer than one global batch of {cfg.train.global_batch_size}; "
            "use a smaller --global-batch-size or more data"
        )
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    return steps_per_epoch, total


def validate(cfg: PretrainConfig) -> tuple[list[str], int, int, int]:
    cfg.validate()
    try:
        model_config(cfg.train.model)
    except ValueError as e:
        raise PretrainConfigError(str(e)) from e
    shards, rows = inspect_dataset(cfg.data)
    steps_per_epoch, total = plan_steps(cfg, rows)
    return shards, rows, steps_per_epoch, total


# ----------------------------------------------------------------------------- data path

@functools.lru_cache(maxsize=4)
def _preprocessor(image_size: int, context_length: int, seed: int):
    from alip.pretrain.data import TrainPreprocessor

    return TrainPreprocessor(image_size, context_length, train=True, seed=seed)


def _preprocess(batch: dict, image_size: int, context_length: int, seed: int) -> dict:
    # A plain function (Ray tasks) with the transform/tokenizer cached per worker process.
    return _preprocessor(image_size, context_length, seed)(batch)


def build_dataset(cfg: PretrainConfig, shards: list[str]):
    import ray.data

    model_cfg = model_config(cfg.train.model)
    size = model_cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    ctx_len = model_cfg.get("text_cfg", {}).get("context_length", 77)
    loc = resolve(shards[0])
    paths = [resolve(s).path for s in shards]
    ds = ray.data.read_parquet(paths, filesystem=loc.fs, columns=[KEY, IMAGE, RAW_TEXT, CAPTION])
    return ds.map_batches(
        _preprocess, batch_size=64, num_cpus=cfg.data_cpus, batch_format="numpy",
        fn_kwargs={"image_size": size, "context_length": ctx_len, "seed": cfg.train.seed},
    )


# ----------------------------------------------------------------------------- worker loop

def _log_dir(cfg: PretrainConfig) -> str:
    if cfg.storage_path.startswith("s3://"):
        return os.path.join(tempfile.gettempdir(), "alip-logs", cfg.run_name)
    return os.path.join(cfg.storage_path, cfg.run_name, "logs")


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    import logging

    # Ray Train logs every report() at INFO with all metrics; our progress line says it shorter.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)  # Ray sets the workers' root logger to INFO (open_clip is chatty)
    cfg = PretrainConfig.from_dict({**config["job"], "train": TrainConfig.from_dict(config["job"]["train"])})
    steps_per_epoch, total_steps = config["steps_per_epoch"], config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != cfg.num_workers:
        raise RuntimeError(f"expected {cfg.num_workers} workers, got {world}")
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts)
    model = create_model(cfg.train.model, init_temperature=cfg.train.init_temperature)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    trainer = ALIPTrainer(cfg.train, model, total_steps, rank=rank, world_size=world, device=device)

    history: list[dict] = []
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            load_training_checkpoint(trainer, os.path.join(d, TRAINER_FILE))
            history_path = Path(d) / HISTORY_FILE
            if history_path.exists():
                history = [json.loads(line) for line in history_path.read_text().splitlines() if line]
        if rank == 0:
            print(f"[pretrain] resumed from checkpoint at step {trainer.step}/{total_steps} "
                  f"(gate state {trainer.gate_state.to_dict()})", flush=True)
    metrics_log = MetricsLog(_log_dir(cfg), total_steps, cfg.log_every, history) if rank == 0 else None

    def save_and_report(metrics: dict) -> None:
        epoch, consumed = divmod(trainer.step, steps_per_epoch)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_training_checkpoint(trainer, os.path.join(tmp, TRAINER_FILE))
            Path(tmp, POSITION_FILE).write_text(json.dumps(
                {"step": trainer.step, "epoch": epoch, "batches_consumed_in_epoch": consumed,
                 "per_worker_batch_size": cfg.per_worker_batch_size, "num_workers": world}))
            Path(tmp, HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in metrics_log.history))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    shard = ray.train.get_dataset_shard("train")
    per_worker = cfg.per_worker_batch_size
    while trainer.step < total_steps:
        epoch, skip = divmod(trainer.step, steps_per_epoch)
        # Data position: on resume, the batches this epoch already trained on are skipped (read and
        # decoded, never trained on). Every worker takes exactly steps_per_epoch steps per epoch and
        # drains the rest, so collective calls stay in lockstep.
        batches = shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed * 1000 + epoch + 1000 * rank if cfg.shuffle_buffer else None,
        )
        for index, batch in enumerate(batches):
            if index < skip or index >= steps_per_epoch or trainer.step >= total_steps:
                continue
            result = trainer.train_step(batch["image"], batch["raw_tokens"], batch["caption_tokens"])
            metrics = {"epoch": epoch, **result.metrics}
            if metrics_log is not None:
                metrics_log.log(trainer.step, metrics, samples=cfg.train.global_batch_size)
            if trainer.step % cfg.checkpoint_every == 0 or trainer.step == total_steps:
                save_and_report({"step": trainer.step, **metrics})
    if metrics_log is not None:
        metrics_log.close()


# ----------------------------------------------------------------------------- driver

def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Attaches to a running cluster (RAY_ADDRESS / `ray job submit`) or starts a local one.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                 include_dashboard=False if not os.environ.get("RAY_ADDRESS") else None)


def run_training(cfg: PretrainConfig):
    """Validate, then fit with Ray Train. Returns (result, summary dict)."""
    shards, rows, steps_per_epoch, total_steps = validate(cfg)
    _ensure_ray()
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress line instead
    print(f"[pretrain] run {cfg.run_name!r}: {cfg.train.objective} on {cfg.train.model}, {rows} rows in "
          f"{len(shards)} shard(s), {cfg.num_workers} worker(s) x batch {cfg.per_worker_batch_size} "
          f"= global {cfg.train.global_batch_size}, {steps_per_epoch} steps/epoch, {total_steps} steps; "
          f"storage {cfg.storage_path}/{cfg.run_name}", flush=True)
    storage = resolve(cfg.storage_path)
    if not storage.is_s3:
        os.makedirs(storage.path, exist_ok=True)
    run_config = ray.train.RunConfig(
        name=cfg.run_name,
        storage_path=storage.path,
        storage_filesystem=storage.fs if storage.is_s3 else None,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
    )
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
        resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.to_dict(), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps},
        scaling_config=scaling,
        run_config=run_config,
        datasets={"train": build_dataset(cfg, shards)},
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = {"run_name": cfg.run_name, "objective": cfg.train.objective, "model": cfg.train.model,
               "total_steps": total_steps, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    return result, summary


def finish_run(cfg: PretrainConfig, checkpoint, summary: dict) -> dict:
    """From the final checkpoint: export the open_clip model, plot, zero-shot on the world splits."""
    from alip.eval.zeroshot import evaluate_world_zeroshot

    run_uri = join(cfg.storage_path, cfg.run_name)
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, TRAINER_FILE), map_location="cpu", weights_only=False)
        history_path = Path(d) / HISTORY_FILE
        history = [json.loads(x) for x in history_path.read_text().splitlines() if x] if history_path.exists() else []
    model = create_model(state["model_name"])
    model.load_state_dict(state["model"])
    model.eval()
    summary["final_step"] = int(state["step"])
    summary["gate_state"] = state["gate_state"]
    out_local = Path(tempfile.mkdtemp(prefix="alip-run-")) if run_uri.startswith("s3://") else Path(run_uri)
    if history:
        summary["plot"] = str(plot_history(history, out_local / "training.png", title=f"{cfg.run_name} ({cfg.train.objective})"))
        (out_local / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        last = history[-1]
        summary["final_metrics"] = {k: last[k] for k in ("loss", "loss_raw", "loss_caption", "fraction_caption_over_raw")
                                    if k in last}
    if cfg.export:
        export_open_clip(model, out_local / "export")
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
        validate(cfg)
    except ValueError as e:
        raise SystemExit(f"alip pretrain: error: {e}")
    result, summary = run_training(cfg)
    if result.checkpoint is None:
        raise SystemExit("alip pretrain: training produced no checkpoint")
    summary = finish_run(cfg, result.checkpoint, summary)
    if "zeroshot" in summary:
        print("\nZero-shot top-1 on the built-in world's held-out splits:")
        print(format_zeroshot_table({cfg.run_name: {t: v["top1"] for t, v in summary["zeroshot"].items()}}))
    print(f"\n[pretrain] done: {summary['final_step']} steps in {summary['seconds']}s; "
          f"export {summary.get('export')}; plot {summary.get('plot')}")
    return summary
