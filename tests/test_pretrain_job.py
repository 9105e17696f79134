"""The Ray Train pretraining job: config errors before any worker, 2 workers == 1 worker through
the real train_loop_per_worker and its per-rank read tasks, and one run that meets a SIGKILLed worker
(replaced in the run) and then a kill of the whole run (it resumes when the same command is re-run,
decoding no row it already trained on)."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from alip.pretrain.config import config_from_args
from alip.pretrain.job import (
    READ_AHEAD_ITEMS, PretrainConfigError, last_checkpoint_due, main, registration_margin_s, validate,
)
from alip.pretrain.stream import read_trace, steps_per_item
from pretrain_helpers import (
    kill_session, metric_steps, registered_checkpoints, small_args, start_job, train_worker_pids,
    wait_for_registered_checkpoint, wait_for_step, wait_for_text,
)
from world_fixtures import write_reference_captioned_world


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    return write_reference_captioned_world(tmp_path_factory.mktemp("captioned"), n=512, shards=4)


# ---------------------------------------------------------------------------- config errors (no Ray)

def test_every_field_is_a_flag_and_presets_load(captioned, tmp_path):
    cfg = config_from_args(small_args(captioned, tmp_path, "r", "--lr", "5e-4", "--num-workers", "4",
                                      "--objective", "clip", "--max-steps", "7"))
    assert (cfg.train.lr, cfg.num_workers, cfg.train.objective, cfg.train.max_steps) == (5e-4, "4", "clip", 7)
    b32 = config_from_args(["--config", "vit-b-32", "--data", "s3://b/c", "--storage-path", "s3://b/runs"])
    assert (b32.train.model, b32.train.global_batch_size, b32.train.lr, b32.train.weight_decay) == \
        ("ViT-B-32", 4096, 1e-3, 0.2)
    assert config_from_args(["--config", "vit-b-16", "--data", "d", "--storage-path", "s"]).train.model == "ViT-B-16"


@pytest.mark.parametrize("args, message", [
    (["--config", "nope"], "unknown config preset 'nope'"),
    (["--num-workers", "5-2"], "need 1 <= min <= max"),
    (["--num-workers", "30"], "more workers than samples in the global batch 24"),
    (["--model", "ViT-Q-1"], "unknown model config"),
])
def test_bad_config_fails_before_any_worker(captioned, tmp_path, args, message, capsys):
    import ray

    with pytest.raises(SystemExit) as e:
        main(small_args(captioned, tmp_path, "r") + args)
    assert message in str(e.value)
    assert not ray.is_initialized()


def test_dataset_without_caption_is_refused(tmp_path):
    raw = write_reference_captioned_world(tmp_path / "raw", n=64, shards=1, with_caption=False)
    cfg = config_from_args(small_args(raw, tmp_path, "r"))
    with pytest.raises(PretrainConfigError, match=r"lacks column\(s\) \['caption'\].*alip caption"):
        validate(cfg)
    with pytest.raises(PretrainConfigError, match="no Parquet shards|does not exist"):
        validate(config_from_args(small_args(tmp_path / "missing", tmp_path, "r")))


# ---------------------------------------------------------------------------- Ray Train: 2 workers == 1

def test_last_checkpoint_before_a_deadline_leaves_room_for_ray_train_to_take_it_in(monkeypatch):
    # Ray Train collects a reported checkpoint at its next poll of the workers (2 s apart by
    # default) and tears the group down at the deadline: the margin covers two polls + 1 s.
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert registration_margin_s() == 5.0
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    assert registration_margin_s() == 2.0
    # 0.2 s steps, 0.3 s checkpoint writes: due once less than 0.4 + 0.9 + 5 = 6.3 s are left.
    assert not last_checkpoint_due(6.4, 0.2, 0.3, 5.0)
    assert last_checkpoint_due(6.2, 0.2, 0.3, 5.0)
    # 1 s before the deadline (what bench_chaos saw lost) is past due.
    assert last_checkpoint_due(1.0, 0.2, 0.3, 5.0)
    # No checkpoint timed yet: a write is assumed to take a step.
    assert last_checkpoint_due(5.9, 0.2, None, 5.0) and not last_checkpoint_due(6.1, 0.2, None, 5.0)


@pytest.mark.slow
def test_two_workers_equal_one_worker_through_the_real_job(tmp_path):
    """The real run_training -> train_loop_per_worker -> per-rank read tasks path, 1 worker vs 2, over 4 steps
    that cross an epoch boundary (96 rows, G = 32: step 4 is the first of epoch 1, in a new unit
    order) with the windowed shuffle on (a 24-row window, not aligned with G). Global step s trains
    on stream rows [s G, (s + 1) G) whatever the worker count, each rank a fixed slice of them; each
    row's augmentation is seeded by (seed, epoch, key), not by the process that decodes it; gates
    and loss are means over the global batch, invariant to the order of its rows. So loss, gates and
    momentum per step and the final weights (after AdamW applied the all-reduced gradients) agree.
    Tolerance: 1e-5 relative on the metrics (float32 sums in another order: 1 worker sums 32 rows,
    2 workers all-reduce two sums of 16), 1e-4/1e-5 on the weights after 4 AdamW updates."""
    import ray

    from alip.pretrain.job import run_training

    data = write_reference_captioned_world(tmp_path / "data", n=96, shards=2)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        runs = {}
        for workers in (1, 2):
            cfg = config_from_args(small_args(data, tmp_path, f"eq{workers}", "--num-workers", str(workers),
                                              "--global-batch-size", "32", "--max-steps", "4",
                                              "--shuffle-buffer-mb", str(24.5 * 4304 / 2**20),  # 24 rows of 32 px
                                              "--checkpoint-every", "4", "--no-export", "--eval-samples", "0"))
            result, _ = run_training(cfg)
            with result.checkpoint.as_directory() as d:
                state = torch.load(Path(d) / "trainer.pt", weights_only=False)
            runs[workers] = ([json.loads(x) for x in (tmp_path / f"eq{workers}" / "metrics.jsonl").read_text().splitlines()],
                             state)
    finally:
        ray.shutdown()
    (one, s1), (two, s2) = runs[1], runs[2]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for m1, m2 in zip(one, two):
        for key in ("loss", "loss_raw", "loss_caption", "mean_sample_weight", "mean_raw_pair_weight",
                    "mean_caption_pair_weight", "momentum_text_caption", "momentum_image_text",
                    "momentum_image_caption", "fraction_caption_over_raw"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), (m1["step"], key)
    assert s1["step"] == s2["step"] == 4
    assert s2["gate_state"] == pytest.approx(s1["gate_state"], rel=1e-5)
    for name, p1 in s1["model"].items():
        torch.testing.assert_close(s2["model"][name], p1, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------- real failures (subprocesses)

@pytest.mark.slow
def test_sigkilled_worker_is_replaced_then_a_killed_run_resumes_and_decodes_no_trained_row(captioned, tmp_path):
    """One run, two failures (one run, not two: each costs a Ray start and a job's start-up on a
    2-core machine). First a SIGKILLed training worker: Ray Train replaces the worker group in the
    same run, which resumes from its latest registered checkpoint and goes on. Then the whole run
    is killed (driver, its Ray, the workers) and the same command re-run: it resumes from the latest
    registered checkpoint, its stream starts at that checkpoint's first unconsumed row (nothing
    already trained on is decoded again) and the rows decoded but never trained are only the
    read-ahead in flight, a bound stated below. The read tasks trace every range of stream
    positions they decode (ALIP_READ_TRACE_DIR)."""
    # 90 steps: room to kill the run after the replacement group trained past everything the
    # replaced one decoded (it reads 10 steps ahead); a step is ~0.2 CPU-s, the room costs little.
    G, STEPS = 24, 90
    run_dir = tmp_path / "resume"
    args = small_args(captioned, tmp_path, "resume", "--max-steps", str(STEPS), "--checkpoint-every", "5")
    proc = start_job(args, tmp_path / "first.log", {"ALIP_READ_TRACE_DIR": str(tmp_path / "trace1")})
    try:
        registered = wait_for_registered_checkpoint(run_dir, proc)
        wait_for_step(run_dir / "metrics.jsonl", registered + 2, proc)
        pids = train_worker_pids(proc.pid)
        assert len(pids) >= 2, pids
        os.kill(pids[-1], signal.SIGKILL)
        text = wait_for_text(tmp_path / "first.log", "resumed from checkpoint at step ", proc)
        # The latest registered checkpoint: the one seen above, or a later one registered before the kill.
        replaced_from = int(text.split("resumed from checkpoint at step ")[1].split("/")[0])
        assert replaced_from >= registered and replaced_from % 5 == 0, text[-3000:]
        # Every row the replaced group decoded lies below this frontier (it may include the first
        # rows of its replacement: an upper bound); train past it and past a newer checkpoint, so
        # that what is decoded beyond the last trained step at the kill below is the replacement
        # group's read-ahead alone.
        frontier_step = -(-max(a + n for a, n, _ in read_trace(str(tmp_path / "trace1"))) // G)
        assert frontier_step + 1 < STEPS, f"the first group read up to step {frontier_step} before the kill"
        after_restart = wait_for_registered_checkpoint(run_dir, proc, after=replaced_from)
        wait_for_step(run_dir / "metrics.jsonl", max(after_restart + 2, frontier_step + 1), proc)
    finally:
        kill_session(proc.pid)  # the whole run: driver, its local Ray and the workers
        proc.wait()
    text = (tmp_path / "first.log").read_text()
    assert text.count(f"step 1/{STEPS} ") == 1, text[-3000:]  # the replaced group continued, it did not start over
    trained_before_kill = metric_steps(run_dir / "metrics.jsonl")[-1]
    assert metric_steps(run_dir / "metrics.jsonl") == list(range(1, trained_before_kill + 1))  # every step once
    latest = max(registered_checkpoints(run_dir), key=lambda m: m["step"])
    k = latest["step"]
    assert k >= after_restart > replaced_from and k % 5 == 0
    ckpt = next(p for p in run_dir.glob("checkpoint_*")  # not Ray's checkpoint_manager_snapshot.json
                if p.is_dir() and json.loads((p / "position.json").read_text())["step"] == k)
    saved = torch.load(ckpt / "trainer.pt", weights_only=False)
    assert json.loads((ckpt / "position.json").read_text())["samples"] == k * G

    proc = start_job(args, tmp_path / "second.log", {"ALIP_READ_TRACE_DIR": str(tmp_path / "trace2")})
    try:
        assert proc.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        kill_session(proc.pid)
    text = (tmp_path / "second.log").read_text()
    assert f"resumed from checkpoint at step {k}/{STEPS} (gate state {saved['gate_state']})" in text
    assert f"data stream starts at step {k}, global sample {k * G}" in text  # position.json was read
    assert f"step 1/{STEPS} " not in text  # it did not start over

    first, second = read_trace(str(tmp_path / "trace1")), read_trace(str(tmp_path / "trace2"))
    # The resumed stream begins exactly at the checkpoint's position (rank 0's slice of step k + 1
    # starts there): no consumed row is decoded again, and nothing past the last step is decoded.
    assert min(a for a, _, _ in second) == k * G
    assert max(a + n for a, n, _ in second) == STEPS * G and max(a + n for a, n, _ in first) <= STEPS * G
    assert sum(n for _, n, _ in second) == (STEPS - k) * G  # the resumed run decodes each remaining row once
    # Decoded past the last trained step (all by the replacement group: the replaced one's rows lie
    # below the frontier it trained past).
    assert trained_before_kill >= frontier_step
    in_flight_at_kill = sum(max(0, a + n - max(a, trained_before_kill * G)) for a, n, _ in first)
    # Rows decoded but never trained at the kill: per rank, the item being trained + READ_AHEAD_ITEMS
    # items decoded ahead (alip.pretrain.rank_reader), each of steps_per_item(share) steps (2 steps =
    # 24 rows here); for 2 ranks.
    share = G // 2
    bound = 2 * (READ_AHEAD_ITEMS + 1) * steps_per_item(share) * share
    print(f"rows decoded but not trained at the kill: {in_flight_at_kill} (G = {G}, 2 workers; bound {bound}); "
          f"(a resume that skipped by decoding would re-decode {k * G})")
    assert 0 <= in_flight_at_kill <= bound
    summary = json.loads((tmp_path / "resume" / "summary.json").read_text())
    assert summary["final_step"] == STEPS
    assert metric_steps(tmp_path / "resume" / "metrics.jsonl") == list(range(1, STEPS + 1))
    assert Path(summary["plot"]).is_file() and (tmp_path / "resume" / "export" / "open_clip_model.safetensors").is_file()
    assert set(summary["zeroshot"]) == {"shape", "colour", "colour_shape", "pattern"}
