"""bench/bench_learning.py: the statistics it prints are right, and it runs end to end (tiny settings)
over several seeds and worker processes, reporting every objective (the oracle included) on every task.

The figures themselves come from the full run (see the script's docstring); this pins that the
script keeps working as the library changes under it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("shape", "colour", "colour_shape", "pattern")


@functools.lru_cache(maxsize=1)
def _bench():
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "bench" / "bench_learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_learning"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _run(objective: str, seed: int, top1: dict[str, float]) -> dict:
    return {"objective": objective, "seed": seed, "zeroshot": top1, "final": {"loss": 1.0}, "seconds": 1.0}


def test_summary_is_mean_std_and_paired_difference_per_seed():
    bench = _bench()
    alip = {0: [0.30, 1.0, 0.20, 0.25], 1: [0.40, 1.0, 0.30, 0.35], 2: [0.35, 1.0, 0.10, 0.30]}
    clip = {0: [0.20, 1.0, 0.25, 0.50], 1: [0.20, 1.0, 0.20, 0.20], 2: [0.25, 1.0, 0.15, 0.40]}
    results = {o: {s: _run(o, s, dict(zip(TASKS, v))) for s, v in runs.items()}
               for o, runs in (("alip", alip), ("clip", clip))}
    summary = bench.summarise(results)
    assert summary["seeds"] == [0, 1, 2]
    mean, std = summary["table"]["alip"]["shape"]
    assert mean == pytest.approx(35.0) and std == pytest.approx(np.std([30, 40, 35], ddof=1))
    assert summary["table"]["clip"]["colour"] == (pytest.approx(100.0), pytest.approx(0.0))
    # Paired: the per-seed differences (10, 20, 10) on shape, not the difference of the means' spreads.
    m, s, wins, n = summary["paired"]["clip"]["shape"]
    assert (m, s, wins, n) == (pytest.approx(40 / 3), pytest.approx(np.std([10, 20, 10], ddof=1)), 3, 3)
    m, s, wins, n = summary["paired"]["clip"]["pattern"]  # -25, +15, -10: ALIP ahead on one seed of three
    assert (m, wins) == (pytest.approx(-20 / 3), 1)
    assert summary["paired"]["clip"]["colour"][:3] == (0.0, 0.0, 0)  # a tie is not a win
    assert "alip" not in summary["paired"]

    cfg = bench.BenchConfig()
    text = bench.format_summary(summary, cfg)
    assert "35.0 +- 5.0" in text and "ALIP - clip" in text and "+13.3 +- 5.8 (3/3)" in text
    md = bench.format_markdown(summary, cfg).splitlines()
    # the average over the four tasks is its own column, per seed then mean +- std (43.75, 51.25, 43.75)
    assert "| alip | 35.0 ± 5.0 | 100.0 ± 0.0 | 20.0 ± 10.0 | 30.0 ± 5.0 | 46.2 ± 4.3 |" in md
    assert any(line.startswith("| ALIP − clip | +13.3 ± 5.8 (3/3) | +0.0 ± 0.0 (0/3) | +0.0 ± 8.7 (1/3) | -6.7 ± 20.2 (1/3) | ")
               for line in md)


def test_bad_arguments_are_refused_before_any_work():
    bench = _bench()
    with pytest.raises(SystemExit, match="unknown objective"):
        bench.main(["--objectives", "alip,dino"])
    with pytest.raises(SystemExit, match="seed listed twice"):
        bench.main(["--seeds", "0", "0"])


@pytest.mark.slow
def test_bench_learning_tiny_run_over_seeds_in_worker_processes(tmp_path):
    out, md = tmp_path / "learning.json", tmp_path / "table.md"
    cmd = [sys.executable, "bench/bench_learning.py", "--n", "96", "--steps", "2", "--batch", "32",
           "--eval-samples", "24", "--seeds", "0", "1", "--workers", "2",
           "--objectives", "alip,clip,oracle", "--preset", "web-like", "--json", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One line per run as it finishes, with an ETA; then the table and the paired differences.
    assert proc.stdout.count("ETA") == 6, proc.stdout
    assert "ALIP - clip" in proc.stdout and "ALIP - oracle" in proc.stdout
    data = json.loads(out.read_text())
    assert data["config"]["preset"] == "web-like" and data["config"]["captioner"].startswith("noisy:")
    assert "captions wrong" in proc.stdout and "gate accuracy of alip" in proc.stdout
    results = data["results"]
    assert set(results) == {"alip", "clip", "oracle"}
    for objective, runs in results.items():
        assert set(runs) == {"0", "1"}, objective
        for r in runs.values():
            assert set(r["zeroshot"]) == set(TASKS) | {"average"}, objective
            assert all(0.0 <= v <= 1.0 for v in r["zeroshot"].values())
            assert r["zeroshot"]["average"] == pytest.approx(np.mean([r["zeroshot"][t] for t in TASKS]))
            # The gate-accuracy probe runs for two-path objectives only, early/middle/end of training.
            assert bool(r["gates"]) == (objective == "alip"), objective
            assert r["final"]["loss"] > 0
    # Only ALIP has two paths to compare, so only it reports the W_c > W_t fraction; the oracle is
    # a single-path (CLIP-style) run on the ground-truth text.
    assert 0.0 <= results["alip"]["0"]["final"]["fraction_caption_over_raw"] <= 1.0
    assert "fraction_caption_over_raw" not in results["oracle"]["0"]["final"]
    # Same seed, same initial weights and batches: CLIP and the oracle differ only by their text,
    # so their losses differ; the table in the markdown file has a row per objective.
    assert results["clip"]["0"]["final"]["loss"] != results["oracle"]["0"]["final"]["loss"]
    probe = results["alip"]["0"]["gates"]["end"]
    assert probe["step"] == 2 and probe["n"] == 96 and 0.0 <= probe["share_caption_over_raw"] <= 1.0
    assert probe["lcg_unrelated"]["positives"] == pytest.approx(96 * 0.5, abs=20)  # the preset's unrelated share
    table = md.read_text()
    assert all(f"| {o} |" in table for o in ("alip", "clip", "oracle")) and "| ALIP − oracle |" in table
    assert "| share of W_c > W_t |" in table
