"""bench/bench_chaos.py's arithmetic, on a synthetic console log (no Ray): restarts found with
their time marks, steps lost, the restart split, causes, clean step time, goodput and where the
wall time went. The Ray side (a simulated cluster losing nodes) is the benchmark run itself."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_chaos", ROOT / "bench" / "bench_chaos.py")
bc = importlib.util.module_from_spec(_spec)
sys.modules["bench_chaos"] = bc
_spec.loader.exec_module(bc)

WORKER = "\x1b[36m(RayTrainWorker pid=4242, ip=192.0.2.2)\x1b[0m "
CONTROLLER = "\x1b[36m(TrainController pid=4141)\x1b[0m "
N = 40


def step(t: float, s: int) -> tuple[float, str]:
    return t, f"{WORKER}[pretrain] step {s}/{N} ({100 * s // N}%) | loss 3.1 | 24.0 samples/s"


def synthetic_log() -> list[tuple[float, str]]:
    """Start at t=0; steps 1..12 at t=10..21; node lost at t=21.5; a start attempt at the old size
    (t=25) fails, one at size 2 (t=45) works; restore from step 10; steps 11..25 at 1.2 s/step;
    a node returns at t=70: a resize restarts from step 20 with 3 workers; steps 21..40."""
    attempt = CONTROLLER + "Attempting to start training worker group of size {} with the following resources"
    pg = WORKER + "Setting up process group for: env:// [rank=0, world_size={}]"
    lines = [(0.5, "[pretrain] run 'chaos': alip on alip-micro, 2400 rows, 2-3 (elastic) worker(s)"),
             (5.0, attempt.format(3)), (7.0, pg.format(3)),
             (9.0, f"{WORKER}[pretrain] starting with 3 worker(s): rank shares [8, 8, 8] of the global batch 24"),
             (9.5, f"{WORKER}[pretrain] data stream starts at step 0, global sample 0 (epoch 0)")]
    lines += [step(9.0 + s, s) for s in range(1, 13)]  # t = 10 .. 21
    lines += [(25.0, attempt.format(3)), (27.0, pg.format(3)),  # this group's workers die: it fails
              (45.0, attempt.format(2)), (50.0, pg.format(2)),
              (55.0, f"{WORKER}[pretrain] resumed from checkpoint at step 10/{N} (gate state {{}}) with 2 worker(s)"),
              (56.0, f"{WORKER}[pretrain] data stream starts at step 10, global sample 240 (epoch 0)")]
    lines += [step(58.0 + 1.2 * (s - 11), s) for s in range(11, 26)]  # t = 58 .. 74.8
    lines += [(76.0, f"{CONTROLLER}Detected changes in the cluster resources. Deciding to resize the worker group from 2 -> 3 workers."),
              (77.0, attempt.format(3)), (80.0, pg.format(3)),
              (84.0, f"{WORKER}[pretrain] resumed from checkpoint at step 20/{N} (gate state {{}}) with 3 worker(s)"),
              (84.5, f"{WORKER}[pretrain] data stream starts at step 20, global sample 480 (epoch 0)")]
    lines += [step(86.0 + (s - 21), s) for s in range(21, N + 1)]  # t = 86 .. 105
    lines += [(107.0, "[pretrain] done: 40 steps in 100.0s")]
    return lines


def test_restarts_are_found_with_their_steps_lost_and_time_split():
    first, second = bc.find_restarts(synthetic_log())
    assert (first.resumed_from, first.workers, first.last_step, first.steps_lost) == (10, 2, 12, 2)
    assert first.attempts == 2 and first.restart_s == pytest.approx(58.0 - 21.0)
    assert first.phases() == pytest.approx({
        "detect + stop": 4.0, "failed start attempts": 20.0, "placement + worker processes": 5.0,
        "model + checkpoint restore": 5.0, "data stream setup": 1.0, "first batch + step": 2.0})
    assert sum(first.phases().values()) == pytest.approx(first.restart_s)
    assert (second.resumed_from, second.workers, second.last_step, second.steps_lost) == (20, 3, 25, 5)
    assert second.attempts == 1 and second.restart_s == pytest.approx(86.0 - 74.8)
    assert second.phases() == pytest.approx({
        "detect + stop": 2.2, "failed start attempts": 0.0, "placement + worker processes": 3.0,
        "model + checkpoint restore": 4.0, "data stream setup": 0.5, "first batch + step": 1.5})


def test_the_first_start_is_split_the_same_way_when_asked():
    start, first, second = bc.find_restarts(synthetic_log(), t0=0.0)
    assert (start.resumed_from, start.workers, start.restart_s, start.attempts) == (0, 3, 10.0, 1)
    assert start.phases() == pytest.approx({
        "detect + stop": 5.0, "failed start attempts": 0.0, "placement + worker processes": 2.0,
        "model + checkpoint restore": 2.0, "data stream setup": 0.5, "first batch + step": 0.5})
    assert (first.resumed_from, second.resumed_from) == (10, 20)


def test_the_split_also_reads_a_stream_planned_before_the_workers_start():
    # An older job planned the data on the driver side, between placement and the workers.
    lines = [step(1.0, 1), step(2.0, 2),
             (4.0, f"{CONTROLLER}Attempting to start training worker group of size 2 with the following resources"),
             (6.0, f"{CONTROLLER}[pretrain] data stream starts at step 2, global sample 48 (epoch 0)"),
             (8.0, f"{WORKER}Setting up process group for: env:// [rank=0, world_size=2]"),
             (9.0, f"{WORKER}[pretrain] resumed from checkpoint at step 2/{N} (gate state {{}}) with 2 worker(s)"),
             step(12.0, 3)]
    (r,) = bc.find_restarts(lines)
    assert r.restart_s == 10.0 and sum(r.phases().values()) == pytest.approx(10.0)
    assert r.phases()["data stream setup"] == 2.0 and r.phases()["first batch + step"] == 3.0


def test_a_missing_mark_leaves_its_time_with_the_phase_before():
    lines = [step(1.0, 1), step(2.0, 2),
             (9.0, f"{WORKER}[pretrain] resumed from checkpoint at step 2/{N} (gate state {{}}) with 2 worker(s)"),
             step(10.0, 3)]
    (r,) = bc.find_restarts(lines)
    assert r.attempts == 0 and r.steps_lost == 0 and r.restart_s == 8.0
    assert r.phases()["model + checkpoint restore"] == 7.0 and r.phases()["first batch + step"] == 1.0


def test_a_restart_before_the_first_checkpoint_starts_over_from_step_zero():
    started = f"{WORKER}[pretrain] starting with 3 worker(s): rank shares [8, 8, 8] of the global batch 24"
    lines = [(1.0, started), step(2.0, 1), step(3.0, 2),
             (5.0, f"{CONTROLLER}Attempting to start training worker group of size 3 with the following resources"),
             (6.0, f"{CONTROLLER}Attempting to start training worker group of size 2 with the following resources"),
             (9.0, started.replace("3 worker(s): rank shares [8, 8, 8]", "2 worker(s): rank shares [12, 12]")),
             step(10.0, 1)]
    (r,) = bc.find_restarts(lines)
    assert (r.resumed_from, r.workers, r.last_step, r.steps_lost, r.attempts) == (0, 2, 2, 2, 2)
    assert r.restart_s == 7.0


def test_a_restart_the_run_did_not_survive_has_no_restart_time():
    lines = [x for x in synthetic_log() if x[0] < 85.0]  # ends after the second resume, before its first step
    restarts = bc.find_restarts(lines)
    assert restarts[-1].t_first_step is None and restarts[-1].restart_s is None
    assert all(isinstance(v, float) for v in restarts[-1].phases().values())


def test_events_are_matched_to_the_restart_they_caused():
    restarts = bc.find_restarts(synthetic_log())
    events = [bc.NodeEvent(21.5, "node lost", "aaaa", 12), bc.NodeEvent(70.0, "node returned", "bbbb", 21)]
    bc.attribute(events, restarts)
    assert [e.restart for e in events] == [0, 1]
    assert [r.cause for r in restarts] == ["node lost", "node returned"]
    # A restart with no node event before it is a crash; an event after the last restart caused none.
    restarts = bc.find_restarts(synthetic_log())
    late = [bc.NodeEvent(60.0, "preemption", "cccc", 12, t_notice=40.0), bc.NodeEvent(200.0, "node lost", "dddd", 40)]
    bc.attribute(late, restarts)
    assert restarts[0].cause == "crash (no node event)" and restarts[1].cause == "preemption"
    assert [e.restart for e in late] == [1, None]
    # A restart Ray Train decided itself (the grow after a node came back earlier) says so.
    restarts = bc.find_restarts(synthetic_log())
    assert [r.resize for r in restarts] == [None, "2 -> 3"]
    early = [bc.NodeEvent(21.5, "node lost", "aaaa", 12), bc.NodeEvent(40.0, "node returned", "bbbb", 12)]
    bc.attribute(early, restarts)
    assert [r.cause for r in restarts] == ["node lost + node returned", "resize 2 -> 3 (Ray Train)"]


def test_clean_step_time_is_robust_to_lines_arriving_in_bursts():
    # 1.5 s/step, but the console delivers 5 lines at a time every 7.5 s; the first 20% is start-up.
    steps = [(100.0 + 7.5 * ((s - 1) // 5), s) for s in range(1, 51)]
    assert bc.clean_step_time(steps) == pytest.approx(1.5, rel=0.05)
    with pytest.raises(ValueError):
        bc.clean_step_time(steps[:2])


def test_step_time_is_told_apart_by_worker_count():
    rates = bc.step_time_by_workers(synthetic_log())
    assert set(rates) == {2, 3}
    assert rates[2][0] == pytest.approx(1.2) and rates[2][1] == 13  # steps 12..25 (its first step left out)
    assert rates[3][0] == pytest.approx(1.0) and rates[3][1] == 10 + 18


def test_goodput_and_where_the_time_went_add_up():
    lines = synthetic_log()
    restarts = bc.find_restarts(lines)
    steps = bc.step_marks(lines)
    step_s = 1.0
    split = bc.split_time(0.0, 108.0, steps, restarts, N, step_s)
    assert split.wall == 108.0 and split.startup == 10.0 and split.tail == 3.0
    assert split.restarts == pytest.approx(37.0 + 11.2) and split.redone == 7.0 and split.kept == 40.0
    assert sum(s for _, s in split.rows()) == pytest.approx(split.wall)
    # The rest: 11 + 15 + 20 step intervals trained in 11 + 16.8 + 19 s, minus (40 + 7) steps at 1 s.
    assert split.rate == pytest.approx(108.0 - 10.0 - 48.2 - 7.0 - 40.0 - 3.0)
    assert bc.goodput(N, step_s, 108.0) == pytest.approx(40 / 108)
    assert bc.goodput(N, step_s, 50.0) / bc.goodput(N, step_s, 100.0) == pytest.approx(2.0)


def test_steps_kept_demands_every_step_exactly_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, 6)))
    assert bc.steps_kept(bc.metrics_steps(path), 5) == 5
    with pytest.raises(AssertionError, match=r"missing \[6\]"):
        bc.steps_kept(bc.metrics_steps(path), 6)
    with pytest.raises(AssertionError, match="1 duplicate"):
        bc.steps_kept([1, 2, 2, 3], 3)
    assert bc.metrics_steps(tmp_path / "absent.jsonl") == []


def test_schedules_fill_what_the_flags_leave_unset():
    assert bc.SCHEDULES["realistic"]["event_every_s"] == 600 and bc.SCHEDULES["stress"]["event_every_s"] == 120
    for sched in bc.SCHEDULES.values():  # every preset passes the CLI's own overlap check
        assert sched["return_after_s"] + sched["deadline_s"] < sched["event_every_s"]
    assert bc.restart_kind("node lost + node returned") == "node lost"
    assert bc.restart_kind("resize 2 -> 3 (Ray Train)") == "grow (node returned)"


def test_cli_rejects_an_event_schedule_that_overlaps_before_starting_ray():
    proc = subprocess.run([sys.executable, "bench/bench_chaos.py", "--event-every-s", "30", "--return-after-s", "20",
                           "--deadline-s", "15"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--return-after-s + --deadline-s must be less than --event-every-s" in proc.stderr
    assert "[chaos]" not in proc.stdout  # nothing started


def test_the_report_prints_goodput_events_and_the_split(tmp_path, capsys):
    from types import SimpleNamespace

    run = tmp_path / "runs" / "chaos"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, N + 1)))
    clean_lines = [(5.0, "Attempting to start training worker group of size 3 with the following resources"),
                   (9.0, f"{WORKER}[pretrain] starting with 3 worker(s): rank shares [8, 8, 8] of the global batch 24")]
    clean_lines += [step(9.0 + s, s) for s in range(1, N + 1)]  # 1 s/step, t = 10 .. 49
    clean = SimpleNamespace(lines=clean_lines, t0=0.0, t_end=54.0, log_path=tmp_path / "clean.log",
                            steps=lambda: bc.step_marks(clean_lines))
    chaos_lines = synthetic_log()
    chaos = SimpleNamespace(lines=chaos_lines, t0=0.0, t_end=108.0, log_path=tmp_path / "chaos.log",
                            steps=lambda: bc.step_marks(chaos_lines))
    driver = SimpleNamespace(events=[bc.NodeEvent(21.5, "node lost", "aaaa", 12),
                                     bc.NodeEvent(70.0, "node returned", "bbbb", 21)])
    args = SimpleNamespace(global_batch_size=24, schedule="stress")
    out = bc.report(args, N, 1.0, clean, chaos, driver, tmp_path)
    text = capsys.readouterr().out
    assert out["clean_goodput"] == pytest.approx(40 / 54) and out["chaos_goodput"] == pytest.approx(40 / 108)
    assert out["ratio"] == pytest.approx(0.5)
    assert "chaos / clean goodput: 0.500 (goal >= 0.60, schedule stress)" in text
    # Per kind of restart, with the goals: a loss <= 35 s, a grow has none.
    assert "| node lost | 1 | 37.0 | 37.0 | <= 35 | 2 |" in text
    assert "| grow (node returned) | 1 | 11.2 | 11.2 | - | 5 |" in text
    assert out["by_cause"]["node lost"]["median_s"] == pytest.approx(37.0)
    assert "| 1 | 22 | node lost | aaaa | 12 | #1 | 2 | 37.0 | 36.5 |" in text
    assert "| #2 | node returned | 20 | 3 | 5 | 11.2 |" in text
    assert "clean run start-up, 10.0s: driver start (imports, attach, dataset check) 5.0s" in text
    assert out["step_time_by_workers"][2][0] == pytest.approx(1.2)
