"""Capture what named loggers emit, whatever Ray did to logging earlier in this process.

caplog listens at the root logger. Once a process has used Ray (an earlier test on the same xdist
worker), Ray's own logging config has set ``propagate = False`` on ``ray`` and Ray Data's on
``ray.data``: their records never reach the root, and a caplog assertion sees nothing. This puts
caplog's handler on the loggers themselves (propagation off meanwhile, so each record is captured
once); logger-level filters, the thing under test in alip.ray_setup, still apply.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager


@contextmanager
def capture_loggers(caplog, *names: str, level: int = logging.INFO):
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, logger.level))
        logger.addHandler(caplog.handler)
        logger.propagate = False
        logger.setLevel(level)
    try:
        yield caplog
    finally:
        for logger, propagate, old_level in saved:
            logger.removeHandler(caplog.handler)
            logger.propagate = propagate
            logger.setLevel(old_level)
