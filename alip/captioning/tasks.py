"""The bodies of the caption job's Ray tasks and its caption actor, and their Ray options.

    prepare_task   (CPU)  read + decode + resize + processor -> (rows, model inputs, info)
    CaptionActor   (GPU/CPU)  generate on slices of the model inputs -> captions
    finish_task    (CPU)  build + commit the unit's data and rejects files
    read_task / probe_task  (CPU)  isolate an image that crashes the decode (scheduler.py)

Plain functions and a plain class: ``scheduler.py`` wraps them with ``ray.remote`` and the
options of :func:`remote_options`, so this module imports Ray only inside functions.
"""

from __future__ import annotations

import logging
import os
import time

from alip.captioners import CaptionerConfig, load_captioner
from alip.captioning.config import CaptionJobConfig
from alip.captioning.output import OutputLayout
from alip.captioning.plan import WorkUnit, read_unit
from alip.captioning.stages import finish_unit, prepare_table, prepare_unit

log = logging.getLogger(__name__)

#: Test/debug hook: a folder where every captioning process appends the keys it captions
#: to ``<pid>.keys`` (one line per key, flushed per call) and its Ray node id to ``<pid>.node``.
CALL_LOG_ENV = "ALIP_CAPTION_CALL_LOG"
#: Test hook: comma-separated keys on which a caption actor process kills itself (``os._exit``),
#: standing in for a captioner that segfaults or is OOM-killed on some image.
CRASH_ON_KEYS_ENV = "ALIP_CAPTION_CRASH_ON_KEYS"
#: Test hook: comma-separated keys on which a prepare (decode) task process kills itself,
#: standing in for a corrupt image that segfaults a native decoder (stages.prepare_table).
DECODE_CRASH_ON_KEYS_ENV = "ALIP_DECODE_CRASH_ON_KEYS"


#: Transient storage errors worth trying again (substrings of the message); anything else
#: (a missing or corrupt shard, a bad model) fails the same way again and fails the job loudly.
TRANSIENT_ERRORS = ["NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                    "REQUEST_TIMEOUT", "Connection reset", "Connection refused", "timed out"]


def with_transient_retries(fn, *args, attempts: int = 4, backoff_s: float = 1.0):
    """``fn(*args)``, retried with backoff while it fails with a :data:`TRANSIENT_ERRORS` error."""
    for attempt in range(attempts):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised unless transient
            if attempt == attempts - 1 or not any(t in str(exc) for t in TRANSIENT_ERRORS):
                raise
            log.warning("transient storage error (%s), retrying in %.0f s", exc, backoff_s * 2 ** attempt)
            time.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


def prepare_task(item: dict, captioner: CaptionerConfig, max_pixels: int, skip: dict[int, str] | None = None,
                 crash_on_keys: frozenset[str] = frozenset()):
    """Ray task body: ``(rows, inputs, info)``; ``info`` is the small part the driver reads.
    ``skip``: rows that crashed the decode before (row -> reject reason), not decoded again."""
    unit = WorkUnit.from_item(item)
    rows, inputs = with_transient_retries(prepare_unit, unit, captioner, max_pixels,
                                          max(captioner.batch_size, 64), skip, crash_on_keys)
    reasons = rows.column("_reject").to_pylist()
    keys = rows.column("key").to_pylist()
    good_keys = [k for k, r in zip(keys, reasons) if r is None]
    return rows, inputs, {"unit": unit.name, "good_keys": good_keys, "node": _node_id()}


def read_task(item: dict):
    """Ray task body: a unit's raw rows (reading never crashes on an image; the probes share them)."""
    return with_transient_retries(read_unit, WorkUnit.from_item(item))


def probe_task(table, row: int, name: str, captioner: CaptionerConfig, max_pixels: int,
               crash_on_keys: frozenset[str] = frozenset()) -> bool:
    """Ray task body: prepare one row of a unit alone, exactly as the unit's prepare would; the
    answer only says that the process survived (the row's own reject reason, if any, comes from
    the unit's prepare later)."""
    prepare_table(table.slice(row, 1), name, captioner, max_pixels, 1, None, crash_on_keys)
    return True


def finish_task(output: str, name: str, rows, captions: list, failures: dict, captioner_name: str) -> dict:
    """Ray task body: commit one unit (off the caption actors' critical path)."""
    return with_transient_retries(finish_unit, OutputLayout(output), name, rows, captions, failures, captioner_name)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class CaptionActor:
    """One captioner (weights loaded once, in ``__init__``) that only generates."""

    def __init__(self, captioner: CaptionerConfig, threads: int, call_log: str | None = None,
                 crash_on_keys: tuple[str, ...] = ()):
        import torch

        torch.set_num_threads(threads)
        self.captioner = load_captioner(captioner)
        self.crash_on_keys = frozenset(crash_on_keys)
        self.call_log = os.path.join(call_log, f"{os.getpid()}.keys") if call_log else None
        self.generate_s = 0.0  # wall time inside generate_prepared (the bench's numerator)
        self.calls = 0
        self.started = time.perf_counter()  # weights loaded: the actor's working life starts
        if self.call_log:
            os.makedirs(call_log, exist_ok=True)
            with open(os.path.join(call_log, f"{os.getpid()}.node"), "w") as f:
                f.write(_node_id())
            open(self.call_log, "a").close()  # the file's existence announces this process

    def where(self) -> dict:
        return {"node": _node_id(), "pid": os.getpid()}

    def generate(self, inputs: dict, start: int, stop: int, keys: list[str]) -> list[str]:
        if self.crash_on_keys.intersection(keys):
            os._exit(3)  # test hook: a captioner that takes its process down on this image
        t0 = time.perf_counter()
        captions = self.captioner.generate_prepared({k: v[start:stop] for k, v in inputs.items()})
        self.generate_s += time.perf_counter() - t0
        self.calls += 1
        if self.call_log:
            with open(self.call_log, "a") as f:
                f.write("".join(k + "\n" for k in keys))
        return captions

    def stats(self) -> dict:
        """Where this actor's time went since its weights loaded (bench/bench_caption.py)."""
        return {"pid": os.getpid(), "generate_s": self.generate_s, "calls": self.calls,
                "alive_s": time.perf_counter() - self.started}


def remote_options(cfg: CaptionJobConfig) -> dict[str, dict]:
    """The Ray options of the job's actors and tasks (the scheduler uses exactly these)."""
    return {
        # A dead actor is never restarted by Ray and its calls are never retried by Ray: the
        # scheduler replaces it and decides per call (node lost: re-queue; crash: count an attempt).
        "actor": dict(num_cpus=cfg.sized(None).cpus_per_actor if cfg.cpus_per_actor is None else cfg.cpus_per_actor,
                      num_gpus=cfg.gpus_per_actor, max_restarts=0,
                      max_task_retries=0),
        # System failures (a worker or node lost) re-run a task, and lineage rebuilds outputs lost
        # with a node; application errors are not retried (a bad shard fails the same way again).
        # Ray cannot tell a worker that crashed on an image from one lost with its node, so it
        # gets few retries (each one crashes again on a poison image): when they are spent the
        # driver sees NodeDiedError (node loss: prepared again, not counted) or a worker crash
        # (counted against the unit's rows, which are then probed one by one).
        "prepare": dict(num_cpus=cfg.decode_cpus, num_returns=3, max_retries=2, retry_exceptions=False),
        "read": dict(num_cpus=cfg.decode_cpus, max_retries=2, retry_exceptions=False),
        # One row alone: the driver decides every retry (crash: counted; node lost: free).
        "probe": dict(num_cpus=cfg.decode_cpus, max_retries=0, retry_exceptions=False),
        "finish": dict(num_cpus=min(cfg.decode_cpus, 0.25), max_retries=4, retry_exceptions=False),
    }
