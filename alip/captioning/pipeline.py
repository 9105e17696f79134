"""The Ray side of the caption job: :func:`run_pipeline` (the driver's entry) and :func:`ensure_ray`.

By concern:
    pool.py          how many caption actors the cluster can hold (pure; the sizing rule)
    cluster_view.py  Ray's own views of nodes, drains, free resources and the autoscaler's node types
    tasks.py         the task bodies (prepare, finish, read, probe), the caption actor, their Ray options
    scheduler.py     CaptionScheduler: the loop over ``ray.wait`` that drives units through the stages
    pool_control.py  the pool at run time: size from Ray's view, decode starvation, stall report/act/fail
    faults.py        poison images, crashed or unreachable actors, lost nodes
"""

from __future__ import annotations

from collections.abc import Callable

from alip.captioners import CaptionerConfig
from alip.captioning.config import CaptionJobConfig
from alip.captioning.plan import WorkUnit
from alip.captioning.scheduler import CaptionJobStalled, CaptionScheduler
from alip.captioning.tasks import (  # noqa: F401 - re-exported: tests and benches import them from here
    CALL_LOG_ENV,
    CRASH_ON_KEYS_ENV,
    DECODE_CRASH_ON_KEYS_ENV,
    CaptionActor,
    remote_options,
    with_transient_retries,
)

__all__ = ["CaptionJobStalled", "CaptionScheduler", "ensure_ray", "remote_options", "run_pipeline",
           "with_transient_retries"]


def ensure_ray(address: str | None) -> bool:
    """Attach to ``address`` / $RAY_ADDRESS, else start a private local Ray (alip.ray_setup says
    which); True if this call connected."""
    from alip.ray_setup import connect_ray

    return connect_ray(address)


def run_pipeline(
    cfg: CaptionJobConfig,
    captioner: CaptionerConfig,
    units: list[WorkUnit],
    on_unit: Callable[[dict], None],
    say: Callable[[str], None] = print,
    private_ray: bool = False,
) -> dict:
    """Caption ``units``; ``on_unit`` gets each unit's summary row as it is committed.

    ``private_ray``: the job runs on a private local Ray that it started (no node can ever join,
    so a job the machine cannot hold fails at once instead of waiting).

    Returns the run's cluster events (nodes lost, actors lost/retired, chunks failed/re-queued,
    rows given up on, pool shrinks, stalls), per-actor generate timings (``generate``) and the
    start-up time until the first captions came back (``first_caption_s``, for
    ``first_caption_rows`` rows).
    """
    scheduler = CaptionScheduler(cfg, captioner, units, on_unit, say, private_ray=private_ray)
    events = scheduler.run()
    events["generate"] = scheduler.generate_stats
    events["first_caption_s"] = scheduler.first_caption_s
    events["first_caption_rows"] = scheduler.first_caption_rows
    return events
