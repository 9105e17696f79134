"""The Ray Data pipeline of the caption job (the only module of the job that imports Ray).

    from_items(pending units, one block each)
      -> map_batches(decode, CPU tasks, batch = 1 unit)          read + decode + resize
      -> map_batches(CaptionActor, ActorPoolStrategy(min, max))  caption + write the unit
      -> one small summary row per unit, streamed back to the driver for progress

Why units travel as whole blocks: a unit's output file is written by the actor that captions
it, once all of its rows are captioned, so the write is the unit's atomic commit. The decode
task's output is kept as one block (``target_max_block_size = None`` while the job runs) and
the actor takes whole blocks (``batch_size=None``); :func:`split_units` checks every batch
and stops the job rather than write a partial unit.

Elasticity (Ray Data's fault-tolerance defaults, which are what a spot fleet needs; passing
them through ``map_batches(**ray_remote_args)`` is deprecated in Ray 2.60, and
tests/test_caption_job.py pins them): the captioning actors run with ``max_restarts=-1`` and
``max_task_retries=-1`` -- an actor killed, or lost with its spot node, is restarted (reloading
the weights in ``__init__``) and the unit it was working on is re-run -- and map tasks with
``max_retries=-1``; blocks lost with a node are rebuilt from lineage. Ray Data's own retry
settings are set explicitly in :func:`_data_context`. Re-running a unit rewrites the same files
with the same content, so retries never duplicate rows.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from alip.captioners import CaptionerConfig, load_captioner
from alip.captioning.config import CaptionJobConfig
from alip.captioning.plan import OutputLayout, WorkUnit
from alip.captioning.unit import REJECT, decode_unit, images_of, output_tables, split_units, write_unit

#: Test/debug hook: a folder where every captioning process appends the keys it captions
#: to ``<pid>.keys`` (one line per key, flushed per captioner batch).
CALL_LOG_ENV = "ALIP_CAPTION_CALL_LOG"

UNIT_SUMMARY_SCHEMA = pa.schema([
    ("unit", pa.string()), ("rows", pa.int64()), ("captioned", pa.int64()), ("rejected", pa.int64()),
    ("caption_s", pa.float64()), ("pid", pa.int64()),
])


def decode_batch(batch: pa.Table, image_size: int | None, max_pixels: int) -> pa.Table:
    """Ray task body: each row of ``batch`` is a :class:`WorkUnit`; returns its decoded rows."""
    tables = [decode_unit(WorkUnit.from_item(item), image_size, max_pixels) for item in batch.to_pylist()]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


class CaptionActor:
    """One captioner (weights loaded once, in ``__init__``) that captions and writes whole units."""

    def __init__(self, captioner: CaptionerConfig, output: str, threads: int, call_log: str | None = None):
        import torch

        torch.set_num_threads(threads)
        self.config = captioner
        self.captioner = load_captioner(captioner)
        self.layout = OutputLayout(output)
        self.call_log = os.path.join(call_log, f"{os.getpid()}.keys") if call_log else None
        if self.call_log:
            os.makedirs(call_log, exist_ok=True)
            open(self.call_log, "a").close()  # the file's existence announces this process

    def _caption(self, part: pa.Table) -> list[str]:
        good = part.filter(pc.is_null(part.column(REJECT)))
        keys, captions = good.column("key").to_pylist(), []
        bs = self.config.batch_size
        for start in range(0, good.num_rows, bs):
            chunk = good.slice(start, bs)
            captions += self.captioner.caption(images_of(chunk))
            if self.call_log:
                with open(self.call_log, "a") as f:
                    f.write("".join(k + "\n" for k in keys[start:start + bs]))
        return captions

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for name, part in split_units(batch):
            t0 = time.perf_counter()
            captions = self._caption(part)
            seconds = time.perf_counter() - t0
            data, rejects = output_tables(part, captions, self.captioner.name)
            write_unit(self.layout, name, data, rejects)
            rows.append(dict(unit=name, rows=part.num_rows, captioned=data.num_rows,
                             rejected=rejects.num_rows, caption_s=seconds, pid=os.getpid()))
        return pa.Table.from_pylist(rows, schema=UNIT_SUMMARY_SCHEMA)


def ensure_ray(address: str | None) -> bool:
    """Attach to ``address`` / $RAY_ADDRESS, or start a local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address in (None, "local"):
        # None also attaches to a cluster started with `ray start` on this machine; "local" forces
        # a private Ray instance for this process.
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)
    return True


#: Transient storage errors worth re-running a map task for (substrings of the message).
TRANSIENT_ERRORS = ["NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                    "REQUEST_TIMEOUT", "Connection reset", "Connection refused", "timed out"]


@contextlib.contextmanager
def _data_context(progress: bool) -> Iterator[None]:
    """Ray Data settings for this job, restored afterwards (the driver may run other datasets)."""
    from ray.data import DataContext

    settings = {
        "target_max_block_size": None,  # never split a unit's block (see module doc)
        "enable_progress_bars": progress,
        "max_errored_blocks": 0,  # an application error (bad shard, bad model) fails the job loudly
        "retried_map_errors": TRANSIENT_ERRORS,  # ...but a flaky object store does not
        "max_map_retries": 3,
        "actor_task_retry_on_errors": False,  # covered by retried_map_errors
        "actor_init_retry_on_errors": False,  # a model that fails to load fails the same way again
        # Spot: an actor's node may vanish while it loads weights; replace it instead of failing
        # (the counter resets whenever an actor starts successfully).
        "max_consecutive_actor_init_deaths": 8,
    }
    ctx = DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in settings}
    for k, v in settings.items():
        setattr(ctx, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


def run_pipeline(
    cfg: CaptionJobConfig,
    captioner: CaptionerConfig,
    units: list[WorkUnit],
    on_unit: Callable[[dict], None],
) -> None:
    """Caption ``units`` (streaming); ``on_unit`` gets each unit's summary row as it finishes."""
    import ray.data

    with _data_context(cfg.progress):
        ds = ray.data.from_items([u.to_item() for u in units], override_num_blocks=len(units))
        ds = ds.map_batches(
            decode_batch,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"image_size": captioner.image_size, "max_pixels": cfg.max_pixels},
            num_cpus=cfg.decode_cpus,
        )
        ds = ds.map_batches(
            CaptionActor,
            batch_size=None,  # whole blocks = whole units
            batch_format="pyarrow",
            fn_constructor_kwargs={
                "captioner": captioner,  # small and picklable; weights load in the actor
                "output": cfg.output,
                "threads": cfg.threads,
                "call_log": os.environ.get(CALL_LOG_ENV) or None,
            },
            compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor,
        )
        for row in ds.iter_rows():
            on_unit(row)
