"""The caption job: dataset -> Ray (decode tasks + a caption actor pool sized to the cluster) -> captioned dataset.

    from alip.captioning import CaptionJobConfig, run_captioning
    summary = run_captioning(CaptionJobConfig(input="world", output="world-captioned", captioner="builtin"))

Modules: config (typed config), plan (work units, output layout, resume state), manifest (input
pinning, incremental runs), lease (one writer per output), unit (decode and finish one unit),
pool (pool sizing rule, pure), cluster_view (Ray's views), tasks (task and actor bodies),
scheduler (the driver's loop), pipeline (entry to the Ray side), job (driver, summary, CLI).
Ray is imported only when a run has work to do.
"""

from alip.captioning.config import CaptionJobConfig, CaptionJobError
from alip.captioning.job import build_parser, format_summary, main, run_captioning

__all__ = ["CaptionJobConfig", "CaptionJobError", "build_parser", "format_summary", "main", "run_captioning"]
