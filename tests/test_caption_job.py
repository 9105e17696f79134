"""The caption job: planning and validation (no Ray), then real Ray runs on a tiny random BLIP:
corrupt images -> rejects + rerun, S3 in/out, and a SIGKILLed captioning actor."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from alip.captioning import CaptionJobConfig, CaptionJobError, build_parser, run_captioning
from alip.captioning.plan import MANIFEST, SUCCESS, OutputLayout, WorkUnit, plan_units, read_unit
from alip.captioning.unit import UnitSplitError, decode_unit, output_tables, split_units
from alip.data.dataset import read_json, read_shard, write_shard
from alip.data.world import world_table
from test_caption_job_support import (
    FAST,
    assert_exactly_once,
    make_tiny_blip,
    read_call_log,
    write_webdataset,
    write_world,
)


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


def job(inp, out, captioner, **kw) -> CaptionJobConfig:
    return CaptionJobConfig(input=str(inp), output=str(out), captioner=captioner, batch_size=8,
                            rows_per_unit=kw.pop("rows_per_unit", 25), progress=False, **FAST, **kw)


# ----------------------------------------------------------------------------- no Ray

def test_plan_splits_shards_into_deterministic_row_ranges(tmp_path, captioner):
    keys, _ = write_world(str(tmp_path / "in"), 110, shards=2, row_group_size=7)  # 55 rows per shard
    fmt, units = plan_units(job(tmp_path / "in", tmp_path / "out", captioner, rows_per_unit=20))
    assert fmt == "parquet"
    assert [(u.name, u.start, u.stop) for u in units] == [
        ("world-00000-00000", 0, 20), ("world-00000-00001", 20, 40), ("world-00000-00002", 40, 55),
        ("world-00001-00000", 0, 20), ("world-00001-00001", 20, 40), ("world-00001-00002", 40, 55),
    ]
    # Row ranges cut across row groups of 7 rows; together they are exactly the input, in order.
    got = [k for u in units for k in read_unit(u).column("key").to_pylist()]
    assert got == keys
    _, whole = plan_units(job(tmp_path / "in", tmp_path / "out", captioner, rows_per_unit=1000))
    assert [(u.name, u.rows) for u in whole] == [("world-00000", 55), ("world-00001", 55)]


def test_decode_unit_marks_rejects_and_resizes(tmp_path, captioner):
    keys, bad = write_world(str(tmp_path / "in"), 12, shards=1, n_corrupt=4)
    _, (unit,) = plan_units(job(tmp_path / "in", tmp_path / "out", captioner))
    t = decode_unit(unit, image_size=32, max_pixels=10**8)
    assert t.num_rows == 12 and set(t.column("_unit").to_pylist()) == {unit.name}
    reasons = dict(zip(t.column("key").to_pylist(), t.column("_reject").to_pylist()))
    assert {k for k, r in reasons.items() if r} == set(bad)
    assert "corrupt" in reasons[bad[0]] and "unrecognised" in reasons[bad[1]]
    assert "empty" in reasons[bad[2]] and "missing" in reasons[bad[3]]
    good = [i for i, k in enumerate(keys) if k not in bad]
    assert {t.column("_height")[i].as_py() for i in good} == {32}
    assert len(t.column("_pixels")[good[0]].as_py()) == 32 * 32 * 3
    # The actor refuses a batch that holds only part of a unit.
    assert [n for n, _ in split_units(t)] == [unit.name]
    with pytest.raises(UnitSplitError, match="Lower --rows-per-unit"):
        split_units(t.slice(0, 5))


def test_missing_input_and_columns_fail_before_ray(tmp_path, captioner, monkeypatch):
    import alip.captioning.pipeline as pipeline

    monkeypatch.setattr(pipeline, "ensure_ray", lambda *a: pytest.fail("Ray must not start"))
    with pytest.raises(CaptionJobError, match="does not exist"):
        run_captioning(job(tmp_path / "nope", tmp_path / "out", captioner))
    bad = world_table(5).drop_columns(["raw_text"])
    write_shard(bad, str(tmp_path / "in" / "a.parquet"), validate=False)
    with pytest.raises(CaptionJobError, match=r"missing column\(s\) \['raw_text'\]"):
        run_captioning(job(tmp_path / "in", tmp_path / "out", captioner))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, match", [
    (dict(max_actors=0), "max_actors"),
    (dict(min_actors=3, max_actors=2), "max_actors"),
    (dict(captioner="nonsense"), "unknown captioner spec"),
    (dict(captioner="hf:/no/such/model"), "does not exist"),
    (dict(dtype="fp8"), "dtype"),
    (dict(output="SAME"), "is the input folder"),
])
def test_bad_config_is_a_clear_error(tmp_path, captioner, change, match):
    cfg = job(tmp_path, tmp_path / "out", captioner)
    for k, v in change.items():
        setattr(cfg, k, str(tmp_path) if v == "SAME" else v)
    with pytest.raises(CaptionJobError, match=match):
        cfg.validate()


def test_output_of_another_job_is_not_mixed_in(tmp_path, captioner):
    write_world(str(tmp_path / "in"), 10, shards=1)
    layout = OutputLayout(str(tmp_path / "out"))
    layout.root.fs.create_dir(layout.root.path)
    assert layout.check_manifest({"input": "a", "captioner": "x"}) is False
    assert layout.check_manifest({"input": "a", "captioner": "x"}) is True
    with pytest.raises(CaptionJobError, match="captioner: earlier 'x', now 'y'"):
        layout.check_manifest({"input": "a", "captioner": "y"})
    write_shard(world_table(3), str(tmp_path / "foreign" / "x.parquet"))
    with pytest.raises(CaptionJobError, match="not written by the caption job"):
        OutputLayout(str(tmp_path / "foreign")).check_manifest({"input": "a"})


def test_cli_flags_map_to_config():
    args = build_parser().parse_args(
        ["--input", "s3://b/in", "--output", "out", "--captioner", "hf:x", "--max-actors", "4",
         "--gpus-per-actor", "1", "--num-beams", "5", "--no-progress", "--rows-per-unit", "100"])
    cfg = CaptionJobConfig(**vars(args))
    assert (cfg.input, cfg.max_actors, cfg.gpus_per_actor, cfg.num_beams, cfg.progress, cfg.rows_per_unit) == \
        ("s3://b/in", 4, 1.0, 5, False, 100)
    assert cfg.captioner_config().device == "cuda" and cfg.min_new_tokens is None


def test_webdataset_units_decode_and_pass_columns_through(tmp_path, captioner):
    rows = world_table(12, seed=3).to_pylist()
    rows[4]["image"] = b"not an image"
    write_webdataset(str(tmp_path / "wds" / "00000.tar"), rows[:6])
    write_webdataset(str(tmp_path / "wds" / "00001.tar"), rows[6:])
    fmt, units = plan_units(job(tmp_path / "wds", tmp_path / "out", captioner))
    assert fmt == "webdataset" and [(u.name, u.stop) for u in units] == [("00000", None), ("00001", None)]
    part = decode_unit(units[0], image_size=None, max_pixels=10**8)
    data, rejects = output_tables(part, ["a caption"] * 5, "cap-x")
    assert rejects.column("key").to_pylist() == [rows[4]["key"]]
    assert "unrecognised image format" in rejects.column("reason")[0].as_py()
    assert data.column_names[:5] == ["key", "image", "raw_text", "caption", "captioner"]
    assert data.column("url").to_pylist() == [f"http://x/{r['key']}" for r in rows[:6] if r is not rows[4]]
    assert set(data.column("captioner").to_pylist()) == {"cap-x"}


def test_ray_data_fault_tolerance_defaults_we_rely_on():
    """Actors restart forever and re-run their in-flight unit; tasks retry system failures forever."""
    from ray.data import DataContext
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
    from ray.data._internal.remote_fn import cached_remote_fn

    from alip.captioning.pipeline import decode_batch

    actor = ActorPoolMapOperator._apply_default_remote_args({}, DataContext.get_current())
    assert (actor["max_restarts"], actor["max_task_retries"]) == (-1, -1)
    assert cached_remote_fn(decode_batch, num_cpus=0.5)._default_options["max_retries"] == -1


def test_work_unit_round_trips_through_items():
    u = WorkUnit("a-00001", "s3://b/a.parquet", 10, 20, 10)
    assert WorkUnit.from_item(u.to_item()) == u


# ----------------------------------------------------------------------------- with Ray

@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One local Ray for the module; started after the S3 server so workers inherit its env."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_corrupt_images_rejected_rest_captioned_and_rerun_is_noop(tmp_path, captioner, ray_local, monkeypatch):
    keys, bad = write_world(str(tmp_path / "in"), 120, shards=3, n_corrupt=8)
    monkeypatch.setenv("ALIP_CAPTION_CALL_LOG", str(tmp_path / "log1"))
    cfg = job(tmp_path / "in", tmp_path / "out", captioner, rows_per_unit=25)  # 40-row shards -> 2 units each
    summary = run_captioning(cfg)
    name = cfg.captioner_config().name
    data, rejects = assert_exactly_once(str(tmp_path / "out"), keys, bad, captioner=name)
    assert (summary["units"], summary["rows_in"], summary["rows_captioned"], summary["rows_rejected"],
            summary["rows_skipped_as_done"]) == (6, 120, 112, 8, 0)
    assert summary["images_per_s"] > 0 and summary["captioner"] == name
    assert read_json(str(tmp_path / "out" / "_summary.json")) == summary
    assert (tmp_path / "out" / SUCCESS).exists() and (tmp_path / "out" / MANIFEST).exists()
    # Passthrough columns survive and the image bytes are the input's, untouched.
    src = read_shard(str(tmp_path / "in" / "world-00000.parquet"))
    assert {"shape", "colour", "description"} <= set(data.column_names)
    by_key = dict(zip(data.column("key").to_pylist(), data.column("image").to_pylist()))
    k0 = next(k for k in src.column("key").to_pylist() if k not in bad)
    assert by_key[k0] == src.column("image").to_pylist()[src.column("key").to_pylist().index(k0)]
    # Every good image was captioned exactly once; nothing else was.
    calls = [k for ks in read_call_log(tmp_path / "log1").values() for k in ks]
    assert sorted(calls) == sorted(set(keys) - set(bad))

    # Rerun: everything is skipped as done, the captioner is never called, output unchanged.
    monkeypatch.setenv("ALIP_CAPTION_CALL_LOG", str(tmp_path / "log2"))
    again = run_captioning(cfg)
    assert (again["units_skipped_as_done"], again["rows_skipped_as_done"], again["rows_captioned"]) == (6, 120, 0)
    assert read_call_log(tmp_path / "log2") == {}
    assert_exactly_once(str(tmp_path / "out"), keys, bad)


@pytest.mark.slow
def test_s3_input_and_output(s3_bucket, captioner, ray_local):
    keys, bad = write_world(f"{s3_bucket}/world", 60, shards=2, n_corrupt=2)
    summary = run_captioning(job(f"{s3_bucket}/world", f"{s3_bucket}/captioned", captioner, rows_per_unit=100))
    assert (summary["rows_captioned"], summary["rows_rejected"]) == (58, 2)
    assert summary["output"] == f"{s3_bucket}/captioned"
    assert_exactly_once(f"{s3_bucket}/captioned", keys, bad)
    assert read_json(f"{s3_bucket}/captioned/_summary.json")["rows_in"] == 60


@pytest.mark.slow
def test_sigkill_captioning_actor_mid_run_is_replaced_and_exactly_once(tmp_path, captioner, ray_local, monkeypatch):
    keys, bad = write_world(str(tmp_path / "in"), 200, shards=2, n_corrupt=6)
    log_dir = tmp_path / "log"
    monkeypatch.setenv("ALIP_CAPTION_CALL_LOG", str(log_dir))
    cfg = job(tmp_path / "in", tmp_path / "out", captioner, rows_per_unit=20)  # 10 units
    result: dict = {}

    def run():
        try:
            result["summary"] = run_captioning(cfg)
        except BaseException as exc:  # surfaced in the main thread below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.time() + 180
    while time.time() < deadline and thread.is_alive():
        calls = read_call_log(log_dir)
        # Kill once the actor has captioned its first batches, while most units are still queued.
        pid = next((p for p, ks in calls.items() if len(ks) >= 16), None)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed = pid
            break
        time.sleep(0.05)
    thread.join(timeout=240)
    assert not thread.is_alive(), "the job did not finish after its actor was killed"
    if "error" in result:
        raise result["error"]
    assert killed is not None, "the job finished before the actor could be killed"
    calls = read_call_log(log_dir)
    assert len(calls) >= 2 and killed in calls, f"no replacement actor: {sorted(calls)}"
    summary = result["summary"]
    assert (summary["rows_captioned"], summary["rows_rejected"], summary["units"]) == (194, 6, 10)
    assert_exactly_once(str(tmp_path / "out"), keys, bad)
    # Whatever the killed actor captioned but had not written yet was captioned again by its
    # replacement: all of it from the one unit it was working on (at most 20 rows).
    redone = set(calls[killed]) & {k for p, ks in calls.items() if p != killed for k in ks}
    assert sum(len(ks) for ks in calls.values()) == 194 + len(redone) and len(redone) <= 20
    assert len({int(k.split("-")[1]) // 20 for k in redone}) <= 1  # world keys: <seed>-<index>
