"""The caption job: dataset -> Ray Data (decode tasks + captioner actor pool) -> captioned dataset.

    from alip.captioning import CaptionJobConfig, run_captioning
    summary = run_captioning(CaptionJobConfig(input="world", output="world-captioned", captioner="builtin"))

Modules: config (typed config), plan (work units, output layout, resume state), manifest (input
pinning, incremental runs), lease (one writer per output), unit (decode and finish one unit),
pipeline (the Ray side), job (driver, summary, CLI). Only pipeline
imports Ray, and only when a run has work to do.
"""

from alip.captioning.config import CaptionJobConfig, CaptionJobError
from alip.captioning.job import build_parser, format_summary, main, run_captioning

__all__ = ["CaptionJobConfig", "CaptionJobError", "build_parser", "format_summary", "main", "run_captioning"]
