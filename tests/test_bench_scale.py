"""bench/bench_scale.py: its moto listing index answers like moto, and the bench runs end to end at a
tiny size (20 shards, 5 ms) with request counts that say what each start-up reads.

The figures themselves come from a full run alone (see the script's docstring)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_scale import COLUMNS, PHASES, IndexedListing, per_10x, total

ROOT = Path(__file__).resolve().parents[1]


def test_indexed_listing_answers_like_moto(s3_server):
    """Same pages, folders and continuation tokens as moto's own ListObjectsV2 (not installed here:
    the comparison calls both on the same bucket)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import FakeKey, s3_backends

    from s3_server import create_bucket

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    name = create_bucket(s3_server)
    keys = [f"in/part-{i:04d}.parquet" for i in range(37)] + ["in/_manifest.json", "in.txt", "in/sub/a", "in/sub/b",
                                                                "in/sub-x", "in/z/deep/1", "out/a", "top"]
    for k in keys:
        backend.put_object(name, k, b"x")
    bucket = backend.get_bucket(name)
    listing = IndexedListing()

    def names(page):
        return [k.name if isinstance(k, FakeKey) else k for k in page]

    for prefix in (None, "", "in/", "in", "in/sub", "in/part-00", "nothing/"):
        for delimiter in (None, "/"):
            for max_keys in (1000, 5, 1):
                ours, theirs, token_ours, token_theirs = [], [], None, None
                for _ in range(100):
                    a = listing.list_objects_v2(backend, bucket, prefix, delimiter, token_ours, None, max_keys)
                    b = backend.list_objects_v2(bucket, prefix, delimiter, token_theirs, None, max_keys)
                    assert names(a[0]) == names(b[0]) and a[1] == b[1], (prefix, delimiter, max_keys)
                    ours += names(a[0])
                    theirs += names(b[0])
                    token_ours, token_theirs = a[2], b[2]
                    if not a[1]:
                        break
                assert ours == theirs
    start = listing.list_objects_v2(backend, bucket, "in/", None, None, "in/part-0030.parquet", 1000)
    assert names(start[0]) == names(backend.list_objects_v2(bucket, "in/", None, None, "in/part-0030.parquet", 1000)[0])


def test_per_10x():
    assert per_10x(1.0, 10.0, 100, 1000) == pytest.approx(10.0)
    assert per_10x(2.0, 4.0, 1000, 10000) == pytest.approx(2.0)
    assert per_10x(1.0, 4.0, 1000, 4000) == pytest.approx(4.0 ** (1 / 0.60206), rel=1e-4)


@pytest.mark.slow
def test_bench_scale_tiny_run(tmp_path):
    out = tmp_path / "scale.json"
    cmd = [sys.executable, "bench/bench_scale.py", "--shards", "20", "40", "--latency-ms", "5", "--rows", "2000",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    # The table: a header with every request kind, one line per size and phase, then the growth.
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("shards phase"))
    assert all(kind in lines[header] for kind in COLUMNS)
    rows = [line.split() for line in lines[header + 2: header + 2 + 2 * len(PHASES)]]
    assert [(int(r[0]), r[1]) for r in rows] == [(n, p) for n in (20, 40) for p in PHASES]
    assert all(len(r) == 2 + 2 + len(COLUMNS) + 2 for r in rows)
    assert "Growth per 10x shards" in proc.stdout and "extrapolation to 41,000 shards" in proc.stdout

    results = json.loads(out.read_text())["results"]
    for res in results:
        n, phases = res["shards"], res["phases"]
        assert set(phases) == set(PHASES)
        for r in phases.values():
            assert r["seconds"] > 0 and r["rss_peak_mb"] >= r["rss_base_mb"] > 0
        # Pretraining: every validate reads each shard's footer once, one request (sizes listed).
        p = phases["pretrain"]
        calls = len(p["validate_calls_s"])
        assert p["rows"] == n * 2000 and p["units"] == n  # 2000 rows: one row group per shard
        assert total(p["requests"], "GET tail", "input") == n * calls
        assert total(p["requests"], "HEAD", "input") <= 2 * calls  # the folder, never a shard
        assert total(p["requests"], "GET", "input") == total(p["requests"], "GET range", "input") == 0
        # Explore: the first shard's schema, then every shard's footer once.
        e = phases["explore"]
        assert total(e["requests"], "GET tail", "input") == n + 1 and total(e["requests"], "GET range") == 0
        # Caption, fresh: one footer read per shard, the manifest and the lease written.
        f = phases["caption_fresh"]
        assert total(f["requests"], "GET tail", "input") == n and total(f["requests"], "HEAD", "input") <= 2
        assert total(f["requests"], "PUT", "job files") >= 2
        # Caption, resumed: the input is not read again (the manifest pins it; one etag listing);
        # committed outputs are listed (their folder); the commit index says the rest.
        r = phases["caption_resumed"]
        assert res["units"] == n * 4 and res["committed"] == n * 2  # 2000 rows / 512 per unit
        on_input = {k: total(r["requests"], k, "input") for k in COLUMNS}
        assert on_input["LIST"] >= 1 and on_input["HEAD"] <= 1  # the folder, listed (+ pyarrow's HEAD of it)
        assert sum(on_input.values()) == on_input["LIST"] + on_input["HEAD"]  # no shard is read
        on_outputs = {k: total(r["requests"], k, "outputs") for k in COLUMNS}
        # The commit index vouches for every committed unit: no committed output is read, only listed.
        assert sum(on_outputs.values()) == 0
        assert total(r["requests"], "LIST", "output folder") >= 1
        assert total(r["requests"], "GET range", "job files") >= 1  # the index part(s)
