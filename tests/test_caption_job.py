"""The caption job: planning and validation (no Ray), then real Ray runs on a tiny random BLIP:
corrupt images -> rejects + rerun, S3 in/out, and a SIGKILLed captioning actor."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from alip.captioning import CaptionJobConfig, CaptionJobError, build_parser, run_captioning
from alip.captioning.lease import OutputLease
from alip.captioning.output import MANIFEST, SUCCESS, OutputLayout
from alip.captioning.plan import WorkUnit, plan_units, read_unit
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


def test_prepare_unit_ships_model_inputs_not_pixels_and_finish_commits(tmp_path, captioner):
    """The CPU stages without Ray: prepared arrays for the good rows only (no RGB column), any
    decode problem a reject; finish_unit commits data + rejects with poison rows rejected too."""
    from alip.captioners import load_captioner
    from alip.captioning.stages import finish_unit, prepare_unit
    from alip.data.images import decode_image

    keys, bad = write_world(str(tmp_path / "in"), 12, shards=1, n_corrupt=4)
    cfg = job(tmp_path / "in", tmp_path / "out", captioner)
    cap_cfg = cfg.captioner_config()
    _, (unit,) = plan_units(cfg)
    rows, inputs = prepare_unit(unit, cap_cfg, max_pixels=10**8)
    assert rows.num_rows == 12 and "_pixels" not in rows.column_names
    reasons = dict(zip(rows.column("key").to_pylist(), rows.column("_reject").to_pylist()))
    assert {k for k, r in reasons.items() if r} == set(bad)
    good = [k for k in keys if k not in bad]
    assert inputs["pixel_values"].shape == (8, 3, 64, 64) and inputs["pixel_values"].dtype.name == "float32"
    cap = load_captioner(cap_cfg)
    src = read_unit(unit)
    images = [decode_image(b) for k, b in zip(src.column("key").to_pylist(), src.column("image").to_pylist())
              if k in good]
    captions = cap.generate_prepared(inputs)
    assert captions == cap.caption(images)  # the split pipeline captions exactly like caption()
    row = finish_unit(OutputLayout(str(tmp_path / "out")), unit.name, rows, captions[:3] + [None] + captions[4:],
                      {3: "captioner failed 3 time(s) on this image: caption worker crashed"}, cap.name)
    assert (row["rows"], row["captioned"], row["rejected"]) == (12, 7, 5)
    assert row["reject_reasons"]["captioner failed 3 time(s) on this image"] == 1
    # The file sizes the commit index keeps are the ones a listing gives.
    assert (row["data_bytes"], row["rejects_bytes"]) == (
        (tmp_path / "out" / f"{unit.name}.parquet").stat().st_size,
        (tmp_path / "out" / "_rejects" / f"{unit.name}.parquet").stat().st_size)
    data = read_shard(str(tmp_path / "out" / f"{unit.name}.parquet"))
    assert data.column("key").to_pylist() == good[:3] + good[4:]
    assert data.column("caption").to_pylist() == captions[:3] + captions[4:]


def test_decode_never_fails_on_any_image(monkeypatch):
    """Whatever a decoder raises on one image (struct.error, IndexError, MemoryError, ...) rejects it."""
    import struct

    from PIL import Image as PILImage

    from alip.data.images import ImageDecodeError, decode_image

    blob = world_table(1).column("image")[0].as_py()
    for exc in (struct.error("bad header"), IndexError("tile"), RuntimeError("plugin"), MemoryError(),
                PILImage.DecompressionBombError("bomb"), SyntaxError("x"), OSError("truncated")):
        def boom(*a, _exc=exc, **k):
            raise _exc
        monkeypatch.setattr(PILImage.Image, "load", boom)
        with pytest.raises(ImageDecodeError) as err:
            decode_image(blob)
        assert err.value.reason
    monkeypatch.undo()
    assert decode_image(blob).mode == "RGB"


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


def test_remote_options_the_scheduler_uses(tmp_path, captioner):
    """Ray never restarts a caption actor or retries its calls (the scheduler does, bounded);
    tasks retry system failures only."""
    from alip.captioning import pipeline

    cfg = job(tmp_path / "in", tmp_path / "out", captioner, decode_cpus=0.5, gpus_per_actor=0.0)
    opts = pipeline.remote_options(cfg)
    assert opts["actor"] == dict(num_cpus=1.0, num_gpus=0.0, max_restarts=0, max_task_retries=0)
    assert opts["prepare"]["max_retries"] > 0 and opts["prepare"]["retry_exceptions"] is False
    assert opts["finish"]["max_retries"] > 0 and opts["finish"]["num_cpus"] <= cfg.decode_cpus
    # That Ray really does not restart a killed caption actor (the scheduler replaces it, once) is
    # proven by test_sigkill_captioning_actor_mid_run_is_replaced_and_exactly_once.


def test_transient_storage_errors_are_retried_others_are_not():
    from alip.captioning.pipeline import with_transient_retries

    calls = []

    def flaky(fail_with):
        calls.append(1)
        if len(calls) < 3:
            raise OSError(fail_with)
        return "ok"

    assert with_transient_retries(flaky, "AWS Error NETWORK_CONNECTION", backoff_s=0.0) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError, match="no such file"):
        with_transient_retries(flaky, "no such file", backoff_s=0.0)
    assert len(calls) == 1


def test_work_unit_round_trips_through_items():
    u = WorkUnit("a-00001", "s3://b/a.parquet", 10, 20, 10)
    assert WorkUnit.from_item(u.to_item()) == u


# ----------------------------------------------------------------------------- with Ray

@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One local Ray for the module; started after the S3 server so workers inherit its env."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never another's cluster
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
    layout = OutputLayout(str(tmp_path / "out"))
    version = layout.manifest_version()
    reads = []
    real_read = OutputLayout.read_manifest
    monkeypatch.setattr(OutputLayout, "read_manifest", lambda self: reads.append(1) or real_read(self))
    said: list[str] = []
    again = run_captioning(cfg, log=said.append)
    # The commit index the first run wrote vouches for every unit: no footer is read. The
    # manifest is read once and, nothing being new, not rewritten.
    assert "[caption] 6 committed unit(s) found: 6 vouched for by the commit index, 0 verified by their footers" in said
    assert len(reads) == 1 and layout.manifest_version() == version
    # Another run rewrites the manifest between this run's read and its lease: read again.
    real_enter = OutputLease.__enter__

    def rewritten_meanwhile(lease):
        layout.write_manifest(real_read(layout))
        return real_enter(lease)

    monkeypatch.setattr(OutputLease, "__enter__", rewritten_meanwhile)
    reads.clear()
    assert run_captioning(cfg)["units_skipped_as_done"] == 6
    assert len(reads) == 2
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
    # Ray did not restart the killed actor (max_restarts=0): the scheduler saw it die once, on a
    # live node, and counted one failed call; the rows of that call were retried, none rejected.
    events = summary["cluster_events"]
    assert (events["actors_lost"], events["nodes_lost"], events["rows_poisoned"]) == (1, [], 0)
    assert events["chunk_failures"] == 1
    assert_exactly_once(str(tmp_path / "out"), keys, bad)
    # Captions already returned to the driver are never redone: at most the batch the actor was
    # running when it died (<= batch_size = 8 rows) is captioned twice.
    redone = set(calls[killed]) & {k for p, ks in calls.items() if p != killed for k in ks}
    assert sum(len(ks) for ks in calls.values()) == 194 + len(redone) and len(redone) <= 8
