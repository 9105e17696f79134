"""bench/bench_ingest.py runs end to end (tiny settings) and reports both paths side by side.

The figures themselves come from a full run on a quiet machine (see the script's docstring); this
pins that the script keeps working and that what it measures is what the data path ships."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_ingest_tiny_run(tmp_path):
    out = tmp_path / "ingest.json"
    cmd = [sys.executable, "bench/bench_ingest.py", "--web", "6", "--large", "1", "--rounds", "1",
           "--batch", "4", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples/s per core, new / today" in proc.stdout and "bytes per sample, today / new = 4.00x" in proc.stdout
    results = json.loads(out.read_text())
    sets = results["sets"]
    assert set(sets) == {"web 500x375", "large 2000x1500", "all (as mixed)"}
    assert sets["web 500x375"]["rows"] == 6 and sets["all (as mixed)"]["rows"] == 7
    for figures in sets.values():
        assert figures["today_rows_per_s"] > 0 and figures["new_rows_per_s"] > 0
    # A 2000x1500 JPEG is decoded at 1/4 scale (16x fewer pixels): faster by a wide margin even on
    # a busy machine (about 3.5x measured).
    assert sets["large 2000x1500"]["speedup"] > 1.5
    b = results["bytes_per_sample"]
    assert b["dtypes_today"] == {"image": "float32", "raw_tokens": "int64", "caption_tokens": "int64"}
    assert b["dtypes_new"] == {"image": "uint8", "raw_tokens": "uint16", "caption_tokens": "uint16"}
    assert b["new"] == 3 * 224 * 224 + 2 * 77 * 2 and b["ratio"] == 4.0
