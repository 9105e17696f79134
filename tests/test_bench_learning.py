"""bench/bench_learning.py runs end to end (tiny settings) and reports every objective on every task.

The figures themselves come from the full run (see the script's docstring); this pins that the
script keeps working as the library changes under it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_learning_tiny_run(tmp_path):
    out = tmp_path / "learning.json"
    cmd = [sys.executable, "bench/bench_learning.py", "--n", "160", "--steps", "3", "--batch", "32",
           "--eval-samples", "48", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ALIP - CLIP (points)" in proc.stdout and "ALIP - caption-only on pattern" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"alip", "clip", "caption"}
    for objective, r in results.items():
        assert set(r["zeroshot"]) == {"shape", "colour", "colour_shape", "pattern"}, objective
        assert all(0.0 <= v <= 1.0 for v in r["zeroshot"].values())
        assert r["final"]["loss"] > 0
    # Only ALIP has two paths to compare, so only it reports the W_c > W_t fraction.
    assert 0.0 <= results["alip"]["final"]["fraction_caption_over_raw"] <= 1.0
