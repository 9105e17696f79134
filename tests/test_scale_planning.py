"""Driver-side planning at scale (issue 26): every shard's / committed output's Parquet footer is
read concurrently, one request each, over one S3 client, with the same results and the same errors
as the plain one-after-another reads. Requests are counted by bench/bench_scale.py's latency proxy
in front of the tests' S3 server (tests/s3_server.py)."""
from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import alip.captioning.plan as plan
from alip.captioning.config import CaptionJobError
from alip.captioning.output import OutputLayout
from alip.captioning.plan import WorkUnit, plan_shards
from alip.captioning.stages import write_unit
from alip.data.dataset import io_map, iter_footers, list_shard_sizes, list_shards, write_bytes, write_shard
from alip.data.schema import REJECTS_SCHEMA
from alip.data.storage import resolve
from alip.pretrain.job import PretrainConfigError, inspect_dataset
from alip.pretrain.stream import units_of_shard
from bench.bench_scale import LatencyProxy


def _captioned(n: int, tag: str = "k", caption: bool = True) -> pa.Table:
    cols = {"key": [f"{tag}{i}" for i in range(n)], "image": [b"x"] * n, "raw_text": ["t"] * n}
    if caption:
        cols.update(caption=["c"] * n, captioner=["cap"] * n)
    return pa.table(cols)


def _write_shards(root: str, rows: list[int]) -> list[str]:
    for i, n in enumerate(rows):
        write_shard(_captioned(n, f"s{i}-"), f"{root}/part-{i:03d}.parquet", validate=False)
    return list_shards(root)


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """The S3 server behind a counting proxy (20 ms a request); the code under test talks to the proxy."""
    p = LatencyProxy(s3_server, latency_s=0.02,
                     area=lambda bucket, key: "parquet" if key.endswith(".parquet") else "other").start()
    monkeypatch.setenv("ALIP_S3_ENDPOINT", p.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
    yield p
    p.stop()


def _on_parquet(proxy: LatencyProxy) -> dict[str, int]:
    return {kind: by_area["parquet"] for kind, by_area in proxy.snapshot()["requests"].items() if "parquet" in by_area}


def _plain_footer(uri: str) -> pq.FileMetaData:
    loc = resolve(uri)
    with loc.fs.open_input_file(loc.path) as f:
        return pq.ParquetFile(f).metadata


# ----------------------------------------------------------------------------- io_map

def test_io_map_keeps_order_bounds_concurrency_and_raises_where_a_loop_would():
    lock, state = threading.Lock(), {"now": 0, "max": 0, "calls": 0}

    def slow(i: int) -> int:
        with lock:
            state["now"] += 1
            state["calls"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.002 * (i % 5))
        with lock:
            state["now"] -= 1
        if i == 30:
            raise KeyError(i)
        return i * i

    assert list(io_map(slow, range(30), threads=8)) == [i * i for i in range(30)]
    assert 1 < state["max"] <= 8
    got = []
    with pytest.raises(KeyError):
        for v in io_map(slow, range(200), threads=4):
            got.append(v)
    assert got == [i * i for i in range(30)]  # everything before the failing item, in order
    time.sleep(0.2)
    assert state["calls"] <= 30 + 30 + 1 + 4 * 4  # no more than the window ran past the error
    assert list(io_map(slow, [])) == []


# ----------------------------------------------------------------------------- footers

def test_iter_footers_equal_plain_reads_one_request_each(s3_bucket, proxy):
    shards = _write_shards(f"{s3_bucket}/ds", [5000, 10, 4097, 1, 300] * 4)
    plain = [_plain_footer(s) for s in shards]
    sizes = list_shard_sizes(f"{s3_bucket}/ds")
    assert list(sizes) == shards and all(v > 0 for v in sizes.values())
    assert list_shard_sizes(shards[2]) == {shards[2]: sizes[shards[2]]}  # a single shard is a dataset too
    proxy.reset()
    got = list(iter_footers(shards, sizes))
    assert [u for u, _ in got] == shards
    assert all(m.equals(p) for (_, m), p in zip(got, plain))
    assert _on_parquet(proxy) == {"GET tail": len(shards)}  # no HEAD: the size came from the listing
    assert proxy.snapshot()["max_in_flight"] > 1
    proxy.reset()  # sizes unknown: still right, a HEAD more per file
    assert all(m.equals(p) for (_, m), p in zip(iter_footers(shards), plain))
    assert _on_parquet(proxy) == {"HEAD": len(shards), "GET tail": len(shards)}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_iter_footers_raise_the_plain_error_of_the_first_bad_file(tmp_path, where, request):
    root = str(tmp_path / "ds") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/ds"
    shards = _write_shards(root, [20] * 8)
    write_bytes(b"PAR1 not really", shards[3])  # not Parquet (after the listing: its size is stale too)
    sizes = list_shard_sizes(root)
    write_bytes(b"garbage", shards[5])
    with pytest.raises(pa.ArrowInvalid) as plain:
        _plain_footer(shards[3])
    got = []
    with pytest.raises(pa.ArrowInvalid) as concurrent:
        for uri, _ in iter_footers(shards, sizes):
            got.append(uri)
    assert got == shards[:3] and str(concurrent.value) == str(plain.value)
    # A file gone since the listing: the plain read's FileNotFoundError.
    resolve(shards[1]).fs.delete_file(resolve(shards[1]).path)
    with pytest.raises(FileNotFoundError):
        list(iter_footers(shards[:3], sizes))


# ----------------------------------------------------------------------------- pretraining

def test_inspect_dataset_units_rows_and_requests(s3_bucket, proxy):
    rows = [5000, 10, 4097, 1, 300, 8192, 7, 4096] * 2
    shards = _write_shards(f"{s3_bucket}/ds", rows)
    expected = [u for s in shards for u in units_of_shard(s, _plain_footer(s))]
    proxy.reset()
    units, total = inspect_dataset(f"{s3_bucket}/ds")
    assert units == expected and total == sum(rows)
    assert len(units) > len(shards)  # several row groups (4096 rows each) per large shard
    assert _on_parquet(proxy) == {"GET tail": len(shards)}
    assert proxy.snapshot()["max_in_flight"] > 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_inspect_dataset_names_the_first_shard_without_captions(tmp_path, where, request):
    root = str(tmp_path / "ds") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/ds"
    shards = _write_shards(root, [30] * 10)
    for i in (4, 7):
        write_shard(_captioned(30, caption=False), shards[i], validate=False)
    with pytest.raises(PretrainConfigError, match=rf"shard {shards[4]} lacks column\(s\) \['caption'\].*alip caption"):
        inspect_dataset(root)
    with pytest.raises(PretrainConfigError, match="does not exist"):
        inspect_dataset(f"{root}-missing")


# ----------------------------------------------------------------------------- caption job planning

def test_plan_shards_same_units_with_listed_sizes_one_request_per_shard(s3_bucket, proxy, monkeypatch):
    shards = _write_shards(f"{s3_bucket}/in", [1000, 20, 513, 512] * 3)
    monkeypatch.setattr(plan, "LIST_SIZES_FROM", 10**9)
    proxy.reset()
    one_by_one = plan_shards("parquet", shards, 512)
    assert _on_parquet(proxy) == {"HEAD": len(shards), "GET tail": len(shards)}
    monkeypatch.setattr(plan, "LIST_SIZES_FROM", 2)
    proxy.reset()
    listed = plan_shards("parquet", shards, 512)
    assert listed == one_by_one and list(listed) == shards
    assert [u.rows for u in listed[shards[0]]] == [512, 488]
    assert _on_parquet(proxy) == {"GET tail": len(shards)}  # + one LIST of the folder


def test_plan_shards_errors_unchanged_with_listed_sizes(s3_bucket, monkeypatch):
    shards = _write_shards(f"{s3_bucket}/in", [50] * 6)
    write_shard(pa.table({"key": ["a"], "raw_text": ["t"]}), shards[2], validate=False)  # no image column
    write_bytes(b"PAR1 torn", shards[4])
    errors = []
    for threshold in (10**9, 2):
        monkeypatch.setattr(plan, "LIST_SIZES_FROM", threshold)
        with pytest.raises(CaptionJobError) as exc:
            plan_shards("parquet", shards, 20)
        errors.append(str(exc.value))
    assert errors[0] == errors[1] and "missing column(s) ['image']" in errors[0] and shards[2] in errors[0]
    monkeypatch.setattr(plan, "LIST_SIZES_FROM", 2)
    with pytest.raises(CaptionJobError, match="not a readable Parquet file"):
        plan_shards("parquet", shards[3:], 20)


def test_work_units_and_manifest_at_scale_are_unchanged(tmp_path):
    """WorkUnit.to_item is asdict's result (without its copy); the manifest, written compact, reads
    back as the same document."""
    import dataclasses

    units = [WorkUnit("a-00001", "s3://b/in/a.parquet", 512, 1024, 512),
             WorkUnit("t", "s3://b/in/t.tar", 0, 20, 20, 1536, 99840), WorkUnit("w", "in/w.parquet")]
    for u in units:
        assert u.to_item() == dataclasses.asdict(u) and list(u.to_item()) == [f.name for f in dataclasses.fields(u)]
        assert WorkUnit.from_item(u.to_item()) == u
    layout = OutputLayout(str(tmp_path / "out"))
    manifest = {"version": 2, "input": "in", "units": 3, "sources": {"in/a.parquet": {
        "size": 1, "rows": 1024, "units": [{k: v for k, v in u.to_item().items() if k != "shard"} for u in units]}}}
    layout.write_manifest(manifest)
    assert layout.read_manifest() == manifest


def test_resume_reads_only_the_footers_of_committed_outputs(s3_bucket, proxy):
    layout = OutputLayout(f"{s3_bucket}/out")
    units = [WorkUnit(f"u{i:03d}", "s3://x/in.parquet", 10 * i, 10 * i + 10, 10) for i in range(30)]
    rejects = pa.table({"key": ["r0"], "reason": ["corrupt"]}, schema=REJECTS_SCHEMA)
    for u in units[:20]:
        write_unit(layout, u.name, _captioned(9, u.name), rejects)
    write_unit(layout, units[20].name, _captioned(5, "short"), rejects)  # short: to be redone
    proxy.reset()
    done, bad = layout.verify_done(units)
    assert done == {u.name: (9, 1) for u in units[:20]}
    assert bad == {units[20].name: "5 captioned + 1 rejected rows, the unit has 10"}
    # Two listings (outputs, rejects) and one tail read per committed file: nothing else of them.
    assert _on_parquet(proxy) == {"GET tail": 2 * 21}
    assert proxy.snapshot()["max_in_flight"] > 1


# ----------------------------------------------------------------------------- explore planning

def test_explore_counts_rows_from_footers_before_ray(s3_bucket, proxy, tmp_path, monkeypatch):
    import json

    import alip.ray_setup
    from alip.explore.job import ExploreConfig, run_explore
    from alip.gates import GateState

    rows = [300, 7, 4097, 1] * 3
    _write_shards(f"{s3_bucket}/cap", rows)
    export = tmp_path / "export"
    export.mkdir()
    gates = {"state": GateState().to_dict(), "sharpness": 2.0, "objective": "alip", "step": 1}
    (export / "open_clip_config.json").write_text(json.dumps({"alip": {"model_name": "alip-micro", "gates": gates}}))

    class RayWouldStart(Exception):
        pass

    def stop(*_a, **_kw):
        raise RayWouldStart

    monkeypatch.setattr(alip.ray_setup, "connect_ray", stop)
    logs: list[str] = []
    proxy.reset()
    with pytest.raises(RayWouldStart):
        run_explore(ExploreConfig(model=str(export), data=f"{s3_bucket}/cap", out=f"{s3_bucket}/scores.parquet"),
                    log=logs.append)
    assert any(f"scoring {sum(rows)} samples of {len(rows)} shard(s)" in line for line in logs)
    # The first shard's schema (a HEAD + a tail read), then one tail read per shard.
    assert _on_parquet(proxy) == {"HEAD": 1, "GET tail": len(rows) + 1}
