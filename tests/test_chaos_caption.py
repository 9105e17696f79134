"""The caption chaos harness (bench/chaos_caption.py): its generator, and a few fixed trials on real
simulated clusters -- the issue's hang as a named regression, then seeds that replay what the
50-trial run exercises (drain + join + actor SIGKILL + decode poison; a loss that leaves no node
able to hold the pool: a clear error, then a rerun that finishes)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

from chaos_caption import Event, Trial, bound_s, draw_trial, run_trial  # noqa: E402


def test_trials_are_drawn_from_the_seed_alone_and_cover_the_ranges():
    assert draw_trial(7) == draw_trial(7) and draw_trial(7) != draw_trial(8)
    trials = [draw_trial(s) for s in range(200)]
    assert {t.head_cpus for t in trials} == {0, 1}
    assert {len(t.workers) for t in trials} == {1, 2, 3, 4}
    assert {c for t in trials for c in t.workers} == {1, 2, 3, 4}
    assert {e.kind for t in trials for e in t.events} == {"lose", "drain", "join", "kill"}
    assert any(t.caption_poison for t in trials) and any(t.decode_poison for t in trials)
    for t in trials:
        assert 1 <= t.min_actors <= t.max_actors and all(e.after_units < max(t.units, 1) for e in t.events)
        # The bound is stated before the run and grows with what the trial has to survive.
        calm = Trial(**{**t.__dict__, "events": []})
        assert bound_s(t, 20) >= bound_s(calm, 20) > 0


# The issue's hang: a num_cpus=0 head, two 2-CPU workers, 1-CPU actors (1-2), one worker lost after
# the first commit. Before the pool was sized by the cluster, the replacement actor took the
# survivor's last CPU and the prepare tasks it waited for could never start.
ISSUE_SHAPE = Trial(seed=1000, head_cpus=0, workers=[2, 2], min_actors=1, max_actors=2, cpus_per_actor=1.0,
                    decode_cpus=0.5, rows_per_unit=50, batch_size=8, rows=300, shards=2, corrupt=2,
                    caption_poison=0, decode_poison=0, events=[Event("lose", after_units=1)])


@pytest.mark.slow
# Seed 29: drain + join + actor SIGKILL + decode poison. Seed 3151: its only worker is lost (and the
# pool never fitted it), plus a row that crashes the captioner. Seed 42 covered the same as 3151 with
# a 60-row decode-poison unit on 0.25-CPU decode tasks: 16 probe processes at once on the repair
# node: 173 CPU-s alone, against 59 for 3151 (issue 24: the suite's time).
@pytest.mark.parametrize("trial", [ISSUE_SHAPE, draw_trial(29), draw_trial(3151)],
                         ids=["issue-22-lost-node-hang", "seed-29", "seed-3151"])
def test_chaos_trial(trial, tmp_path):
    record = run_trial(trial, str(tmp_path), stall_timeout_s=20.0)
    assert record["ok"], f"{record['shape']}\n{record.get('why')}\nreplay: bench/chaos_caption.py --seeds {trial.seed}"
    assert record["elapsed_s"] <= record["bound_s"]
    if trial is ISSUE_SHAPE:
        assert record["events"] and record["events"][0].startswith("lose")
    if trial.seed == 3151:  # its only worker is lost: the job says it cannot run, then a rerun finishes
        assert "cannot run on this cluster" in record.get("stalled", ""), record
