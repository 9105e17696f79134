"""bench/bench_caption.py runs end to end at a tiny size and reports every figure it promises.

The figures themselves come from the full run alone on a quiet machine (`--n 2000 --rounds 2`);
this pins that the script keeps working as the caption job changes under it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_caption_tiny_run(tmp_path):
    out = tmp_path / "caption.json"
    cmd = [sys.executable, "bench/bench_caption.py", "--n", "96", "--shard-size", "48", "--rows-per-unit", "48",
           "--batch-size", "16", "--rounds", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generate share of caption-actor wall time: before" in proc.stdout
    assert "steady-state job / bare images/s" in proc.stdout and "job start-up" in proc.stdout
    # Each variant's row is printed as soon as it is measured, before the summary figures.
    lines = proc.stdout.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("0 ")]  # round 0: one row per variant
    summary = next(i for i, line in enumerate(lines) if line.startswith("generate share"))
    assert len(rows) == 3 and max(rows) < summary, proc.stdout
    assert all(label in proc.stdout for label in ("bare loop", "serial actor (before)", "caption job (after)"))
    report = json.loads(out.read_text())
    assert report["n"] == 96 and report["identical_captions"] is True
    (r,) = report["rounds"]
    assert 0 < r["generate_fraction_before"] <= 1 and 0 < r["generate_fraction_after"] <= 1
    assert r["job_startup_s"] > 0 and r["steady_job_over_bare"] > 0 and r["job_over_bare"] > 0
