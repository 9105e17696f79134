"""bench/gpu_check.py cannot rot: it runs here on CPU at tiny sizes, with Ray made unimportable
(the device machines have torch + transformers and carried open_clip wheels, never Ray)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu_without_ray(tmp_path):
    out = tmp_path / "gpu_check.json"
    argv = ["gpu_check.py", "--tiny", "--compile", "--models", "alip-micro", "--max-batch", "8", "--steps", "1",
            "--json", str(out)]
    code = ("import sys, runpy; sys.modules['ray'] = None  # any `import ray` now raises ImportError\n"
            f"sys.argv = {argv!r}; runpy.run_path('bench/gpu_check.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    expected = ["alip-micro ALIP", "alip-micro ALIP compiled", "alip-micro CLIP", "alip-micro CLIP compiled",
                next(c for c in rows if c.startswith("train data path")),
                "BLIP-large-sized generate", "alip-micro image embeddings", "alip-micro text embeddings"]
    for config in expected:
        assert config in rows, (config, list(rows))
        assert rows[config]["samples_per_s"] > 0, config
        assert config in proc.stdout  # the one printed table has every row
    for config in expected[:4]:
        row = rows[config]
        # batch search: doubling from 4 up to the cap of 8 on CPU; MFU from counted FLOPs / measured peak
        assert "batch 8" in row["note"] and 0 < row["mfu"] < 1.5, row
    assert "TrainPreprocessor" in rows[expected[4]]["note"]
    assert "beam 3, 20 tokens" in rows["BLIP-large-sized generate"]["note"]
    assert report["measured_peak_flops"] > 0
