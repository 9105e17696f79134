"""Pinned input and incremental runs (manifest), WebDataset tars split into row ranges; then the
real caption job on the local S3 server: a unit left short by a killed writer is redone, shards
appended to the input are the only new work, a changed shard is refused, and a second run on
the same output is refused while the first one finishes unharmed."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alip.captioning import CaptionJobConfig, CaptionJobError, run_captioning
from alip.captioning.lease import LEASE
from alip.captioning.manifest import InputChangedError, pin_input
from alip.captioning.output import MANIFEST, OutputLayout
from alip.captioning.plan import plan_shards, plan_units, read_unit
from alip.data.dataset import list_shards, read_json, read_shard, shard_versions, write_bytes, write_shard
from alip.data.storage import resolve
from alip.data.world import world_table
from test_caption_job_support import (
    FAST,
    assert_exactly_once,
    make_tiny_blip,
    read_call_log,
    write_webdataset,
    write_world,
)

REPO = Path(__file__).resolve().parents[1]


def _identity(**kw) -> dict:
    return dict({"input": "in", "format": "parquet", "captioner": "cap[dtype=fp32]", "rows_per_unit": 20}, **kw)


class Planner:
    """plan_new for pin_input that records which shards it was asked to plan."""

    def __init__(self, fmt="parquet", rows_per_unit=20):
        self.fmt, self.rows_per_unit, self.calls = fmt, rows_per_unit, []

    def __call__(self, shards):
        self.calls.append(list(shards))
        return plan_shards(self.fmt, shards, self.rows_per_unit)


def _shards(uri: str) -> list[str]:
    return list_shards(uri)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_manifest_pins_sources_appends_new_shards_and_refuses_changed_ones(tmp_path, where, request):
    root = str(tmp_path / "in") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/in"
    write_world(root, 60, shards=2)  # 30 rows per shard -> 2 units each
    shards = _shards(root)
    first = pin_input(None, _identity(), shard_versions(shards), plan := Planner(), "out")
    assert plan.calls == [shards] and first.added == shards
    assert [u.name for u in first.units] == ["world-00000-00000", "world-00000-00001",
                                             "world-00001-00000", "world-00001-00001"]
    pins = first.manifest["sources"][shards[0]]
    assert pins["rows"] == 30 and pins["size"] > 0 and ("etag" in pins if where == "s3" else "mtime_ns" in pins)

    # Same input: units come from the manifest; nothing is read or planned again.
    again = pin_input(first.manifest, _identity(), shard_versions(shards), plan := Planner(), "out")
    assert plan.calls == [] and again.added == [] and again.units == first.units

    # A shard appended to the input: only it is planned; the earlier units are unchanged.
    write_shard(world_table(25, seed=7), f"{root}/world-00002.parquet")
    grown = _shards(root)
    more = pin_input(first.manifest, _identity(), shard_versions(grown), plan := Planner(), "out")
    assert plan.calls == [[grown[2]]] and more.added == [grown[2]]
    assert more.units[:4] == first.units and [u.name for u in more.units[4:]] == ["world-00002-00000",
                                                                                  "world-00002-00001"]

    # A pinned shard rewritten (same name, same row count, other rows) and one removed: refused, named.
    write_shard(world_table(30, seed=99), shards[1])
    loc = resolve(shards[0])
    loc.fs.delete_file(loc.path)
    now = shard_versions(_shards(root))
    with pytest.raises(InputChangedError) as err:
        pin_input(more.manifest, _identity(), now, Planner(), "out")
    msg = str(err.value)
    assert f"1 changed since they were captioned: {shards[1]} (" in msg and f"1 removed: {shards[0]}" in msg
    assert "--overwrite" in msg


def test_captioner_settings_are_part_of_the_job_identity(tmp_path):
    write_world(str(tmp_path / "in"), 10, shards=1)
    shards = _shards(str(tmp_path / "in"))
    first = pin_input(None, _identity(), shard_versions(shards), Planner(), "out")
    with pytest.raises(CaptionJobError, match=r"captioner: earlier 'cap\[dtype=fp32\]', now 'cap\[dtype=fp16\]'"):
        pin_input(first.manifest, _identity(captioner="cap[dtype=fp16]"), shard_versions(shards), Planner(), "out")
    # ... and the id the job pins does change with dtype, image size and generation settings.
    base = CaptionJobConfig(input="in", output="out", captioner="builtin")
    ids = {CaptionJobConfig(input="in", output="out", captioner="builtin", **kw).captioner_config().name
           for kw in ({}, {"dtype": "bf16"}, {"image_size": 48}, {"num_beams": 1}, {"max_new_tokens": 5})}
    assert len(ids) == 5 and base.captioner_config().name in ids


def _tar_rows(n: int, seed: int = 1) -> list[dict]:
    return world_table(n, seed=seed).to_pylist()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_webdataset_tar_is_split_into_row_ranges_read_by_byte_range(tmp_path, where, request):
    rows = _tar_rows(95)
    local = tmp_path / "wds" / "00000.tar"
    write_webdataset(str(local), rows)
    if where == "s3":
        root = f"{request.getfixturevalue('s3_bucket')}/wds"
        write_bytes(local.read_bytes(), f"{root}/00000.tar")
    else:
        root = str(tmp_path / "wds")
    cfg = CaptionJobConfig(input=root, output=str(tmp_path / "out"), rows_per_unit=20)
    fmt, units = plan_units(cfg)
    assert fmt == "webdataset"
    assert [(u.name, u.start, u.stop, u.rows) for u in units] == [
        (f"00000-{i:05d}", 20 * i, min(95, 20 * i + 20), min(20, 95 - 20 * i)) for i in range(5)]
    assert all(u.byte_stop - u.byte_start < local.stat().st_size / 3 for u in units)  # each reads its slice only
    parts = [read_unit(u) for u in units]
    whole = read_shard(f"{root}/00000.tar")
    assert pa.concat_tables(parts).equals(whole)  # exactly the tar's samples, each once, in order
    assert whole.column("key").to_pylist() == [r["key"] for r in rows]


def test_tar_whose_samples_are_not_adjacent_stays_one_unit(tmp_path):
    rows = _tar_rows(30)
    path = tmp_path / "wds" / "00000.tar"
    write_webdataset(str(path), rows)
    with tarfile.open(path, "a") as tar:  # a member of sample 0 after all the others
        info = tarfile.TarInfo(f"{rows[0]['key']}.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"3"))
    _, units = plan_units(CaptionJobConfig(input=str(tmp_path / "wds"), output=str(tmp_path / "o"), rows_per_unit=10))
    assert [(u.name, u.stop, u.rows, u.byte_start) for u in units] == [("00000", None, 30, None)]
    assert read_unit(units[0]).num_rows == 30


# ----------------------------------------------------------------------------- the real job (Ray)

@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One private local Ray for the module, started after the S3 server so workers inherit its env."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _job(inp, out, captioner, **kw) -> CaptionJobConfig:
    return CaptionJobConfig(input=str(inp), output=str(out), captioner=captioner, batch_size=8, rows_per_unit=20,
                            progress=False, **FAST, **kw)


def _zero_row_unit(layout: OutputLayout, name: str) -> None:
    """What the old writer left when SystemExit interrupted a streamed S3 upload: a 0-row file."""
    buf = pa.BufferOutputStream()
    pq.write_table(read_shard(layout.data_uri(name)).slice(0, 0), buf)
    write_bytes(buf.getvalue(), layout.data_uri(name))


@pytest.mark.slow
def test_s3_job_redoes_a_short_unit_captions_only_appended_shards_and_refuses_changed_input(
        s3_bucket, captioner, ray_local, monkeypatch, tmp_path):
    inp, out = f"{s3_bucket}/world", f"{s3_bucket}/captioned"
    keys, bad = write_world(inp, 60, shards=2, n_corrupt=4)  # 30 rows per shard -> 2 units each
    first = run_captioning(_job(inp, out, captioner))
    assert (first["units"], first["rows_captioned"], first["rows_rejected"]) == (4, 56, 4)
    layout = OutputLayout(out)
    assert layout.root.fs.get_file_info(layout.root.child(LEASE).path).type.name == "NotFound"  # released
    short = "world-00001-00000"
    short_keys = set(read_shard(layout.data_uri(short)).column("key").to_pylist())
    _zero_row_unit(layout, short)

    # A third shard lands in the input; the rerun captions it and the short unit, nothing else.
    new_keys, new_bad = write_world(f"{tmp_path}/extra", 15, shards=1, seed=5, n_corrupt=1)
    with open(f"{tmp_path}/extra/world-00000.parquet", "rb") as f:
        write_bytes(f.read(), f"{inp}/world-00002.parquet")
    monkeypatch.setenv("ALIP_CAPTION_CALL_LOG", str(tmp_path / "log"))
    second = run_captioning(_job(inp, out, captioner))
    assert (second["units"], second["units_skipped_as_done"], second["units_redone_after_verification"],
            second["shards_added"]) == (5, 3, 1, 1)
    calls = [k for ks in read_call_log(tmp_path / "log").values() for k in ks]
    assert sorted(calls) == sorted(short_keys | (set(new_keys) - set(new_bad)))
    assert_exactly_once(out, keys + new_keys, bad + new_bad)
    pinned = read_json(f"{out}/{MANIFEST}")["sources"]
    assert sorted(pinned) == [f"{inp}/world-{i:05d}.parquet" for i in range(3)]

    # A pinned shard rewritten in place (same name and row count): refused before Ray, named.
    write_world(f"{tmp_path}/other", 30, shards=1, seed=9)
    with open(f"{tmp_path}/other/world-00000.parquet", "rb") as f:
        write_bytes(f.read(), f"{inp}/world-00000.parquet")
    with pytest.raises(InputChangedError, match=f"{inp}/world-00000.parquet \\(size .*etag"):
        run_captioning(_job(inp, out, captioner))
    assert_exactly_once(out, keys + new_keys, bad + new_bad)  # the refused run changed nothing


@pytest.mark.slow
def test_second_run_on_the_same_output_is_refused_and_the_first_finishes_exactly_once(
        tmp_path, captioner, ray_local, monkeypatch):
    keys, bad = write_world(str(tmp_path / "in"), 300, shards=2, n_corrupt=2)
    out = tmp_path / "out"
    monkeypatch.setenv("ALIP_CAPTION_CALL_LOG", str(tmp_path / "log"))
    result: dict = {}

    def first_run():
        try:
            result["summary"] = run_captioning(_job(tmp_path / "in", out, captioner), log=None)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=first_run)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and not (out / LEASE).exists() and thread.is_alive():
        time.sleep(0.05)
    assert (out / LEASE).exists(), result
    holder = read_json(str(out / LEASE))["run_id"]
    # The second run: the same command from another process, as a user would start it.
    cmd = [sys.executable, "ray_jobs/caption.py", "--input", str(tmp_path / "in"), "--output", str(out),
           "--captioner", captioner, "--rows-per-unit", "20", "--batch-size", "8", "--ray-address", "local",
           "--no-progress"] + [a for k, v in FAST.items() for a in ("--" + k.replace("_", "-"), str(v))]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert thread.is_alive(), "the first run ended before the second could be refused"
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"is being written by another caption job: run {holder} on host" in second.stderr
    thread.join(timeout=240)
    assert not thread.is_alive() and "error" not in result, result
    assert result["summary"]["rows_captioned"] == 298
    calls = [k for ks in read_call_log(tmp_path / "log").values() for k in ks]
    assert sorted(calls) == sorted(set(keys) - set(bad))  # captioned once: the refused run did nothing
    assert_exactly_once(str(out), keys, bad)
    assert not (out / LEASE).exists()
