"""Start-up at LAION scale, by simulation: seconds, driver peak memory and S3 requests of each
job's driver before its first step/unit, for datasets of 1k, 10k and 40k shards on a slow S3.

    .venv/bin/python bench/bench_scale.py                          # 1000 10000 40000 shards, 50 ms (alone: long)
    .venv/bin/python bench/bench_scale.py --shards 200 1000        # what fits a dev box in minutes
    .venv/bin/python bench/bench_scale.py --shards 20 --latency-ms 5 --json out.json   # tiny (the test)

The slow S3: moto's server (tests/s3_server.py) behind a latency proxy on 127.0.0.1 (LatencyProxy
below): every request waits --latency-ms (default 50: S3 from another region or a busy prefix; in
region it is 10-30 ms), then is forwarded. The proxy counts requests by kind (LIST, HEAD, GET of a
whole object, "GET tail" = a ranged GET ending at the object's end, i.e. a Parquet footer read,
"GET range" = any other ranged GET, e.g. data pages, PUT, DELETE) and by area (input shards,
committed caption outputs, the job's own files). The jobs reach it as they reach any S3
(ALIP_S3_ENDPOINT): nothing in alip is patched except where Ray would start (see below).

The data: N shards of --rows rows (default 10,000: LAION's img2dataset shards) in the dataset format
of alip/data (key, image, raw_text + caption, captioner; write_shard: zstd, row groups of 4096), real
Parquet with real footers; one template file per row count is stored under every shard's key (images
are one tiny PNG: nothing measured here decodes them). Objects are put straight into moto's backend
(no proxy, no HTTP): 40k shards + 400k committed units take about a minute (moto holds them in
memory: ~6 GB at 40k shards).

Each phase runs in a fresh subprocess (its driver peak RSS is its own), from the job's entry point
up to the moment it would start Ray (alip.ray_setup.connect_ray is replaced by a stop):
  pretrain        alip.pretrain.job.main (--config vit-b-32): config, validate (inspect_dataset:
                  every shard's footer -> read units), plan_steps; then, not timed, what the read
                  units cost to ship (pickled bytes, unpickle seconds: what every train worker and
                  read task pays) and the first read item's plan (alip.pretrain.stream.locate)
  explore         alip.explore.job.run_explore: export check, list, schema, every shard's row count
  caption fresh   alip.captioning.job.run_captioning on an empty output: list, pin (etag listing),
                  plan every shard (footers), lease, manifest
  caption resumed the same command again after the first half of the units were committed (data +
                  rejects files, correct row counts, the commit index parts): manifest, pin, lease,
                  resume_state (listing; the commit index; footers of units it does not vouch for), manifest
Each job's module imports happen before its clock starts (a fixed cost); its peak RSS (VmHWM) counts
them (pretraining and explore import torch: ~1 GB before any data). The table gives seconds, driver
peak RSS, requests by kind; then each figure's growth with N (per 10x shards) and a straight line
to 41,000 shards. "sim busy" is the CPU the simulated S3 (moto + proxy, this process) used: a phase
whose wall time is near it measures the simulator, not the job. The JSON (--json) also has the
caption job's seconds per planning step and the most requests the server saw in flight at once.

Measured 2026-12-03 on the 2-core dev box, not alone (other sessions ran tests), `--shards 200 1000`,
50 ms, before -> after issue 26's changes, at 1000 shards (10M rows): start-up pretrain 264.9 ->
3.0 s (main() validates twice: 4006 -> 2006 requests, no HEAD per shard), explore 111.2 -> 1.6 s,
caption fresh 20.8 -> 4.0 s, caption resumed (10,000 of 20,000 units committed) 397.6 -> 31.6 s
(40,070 -> 20,056 requests: one tail read per committed file, no HEAD); driver peak RSS 1011 ->
1086, 1044 -> 1082, 236 -> 256, 190 -> 227 MB (thread pools: +20-120 MB, flat in N). The 1k, 10k
and 40k sizes measured alone: docs/benchmarks.md.

Simulator shortcuts (what moto does not do like S3, fixed here so that it does not dominate):
moto lists a prefix by scanning and sorting every key of the bucket for every page of 1000
(hours for 800k committed outputs); the bench gives moto a sorted index (IndexedListing). And
moto takes ~3 ms of CPU per request: GET/HEAD of template objects (identical bytes under many
keys) are answered by the proxy from moto's own earlier response to the same request on the same
template (LatencyProxy.templates), after the same injected latency.
"""
from __future__ import annotations

import argparse
import bisect
import http.client
import io
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the slow S3

#: Request kinds the proxy counts. A "GET tail" is a ranged GET that ends at the object's last byte
#: (a Parquet footer read); a "GET range" any other ranged GET (data pages, tar slices).
KINDS = ("LIST", "HEAD", "GET", "GET tail", "GET range", "PUT", "DELETE", "POST")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen() backlog: the default 5 drops bursts of new connections


class LatencyProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of an S3 server: every request waits `latency_s`,
    then is forwarded as is (headers, body, query) over a kept-alive connection per proxy thread.
    Counts requests by kind (KINDS) and by area (`area(bucket, key)`, e.g. input / outputs), the
    response bytes, and the upstream server's own time (what the simulated S3 itself took)."""

    def __init__(self, upstream: str, latency_s: float = 0.05, area=None):
        self.upstream = urlsplit(upstream).netloc
        self.latency_s = latency_s
        self.area = area or (lambda bucket, key: bucket)
        # Objects known to hold the same bytes as others (one template Parquet file under many keys):
        # "bucket/key" -> template id. A GET/HEAD of such a key is answered with the server's own
        # response to the same request on an earlier key of that template (see _handle).
        self.templates: dict[str, str] = {}
        self._cache: dict = {}
        self._lock = threading.Lock()
        self.in_flight = 0
        self.reset()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):  # one line per request otherwise
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._local = threading.local()
        self._thread: threading.Thread | None = None

    def start(self) -> "LatencyProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.requests: dict = defaultdict(int)  # (kind, area) -> count
            self.bytes: dict = defaultdict(int)  # (kind, area) -> request + response body bytes
            self.server_s = 0.0
            self.max_in_flight = self.in_flight  # most requests served at once: the client's concurrency

    def snapshot(self) -> dict:
        """{"requests": {kind: {area: n}}, "bytes": {...}, "server_s": upstream seconds, "max_in_flight": n}."""
        with self._lock:
            req, byt = defaultdict(dict), defaultdict(dict)
            for (kind, area), n in self.requests.items():
                req[kind][area] = n
            for (kind, area), n in self.bytes.items():
                byt[kind][area] = n
            return {"requests": dict(req), "bytes": dict(byt), "server_s": round(self.server_s, 3),
                    "max_in_flight": self.max_in_flight}

    # -------------------------------------------------------------------------------- forwarding

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.upstream, timeout=120)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(h.rfile.read(size))
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = self._read_body(h)
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.latency_s)
            self._serve(h, body)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _serve(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        split = urlsplit(h.path)
        bucket, _, key = unquote(split.path).lstrip("/").partition("/")
        plain = not split.query or split.query.startswith("x-id=")  # an object read, not ?tagging, ?acl...
        template = self.templates.get(f"{bucket}/{key}") if h.command in ("GET", "HEAD") and plain else None
        if h.command in ("PUT", "POST", "DELETE"):
            self.templates.pop(f"{bucket}/{key}", None)  # changed: no longer a copy of its template
        cache_key = (template, h.command, h.headers.get("Range"))
        hit = self._cache.get(cache_key) if template else None
        spent = 0.0
        if hit is None:
            t0 = time.perf_counter()
            status, reason, resp_headers, data = self._forward(h, body)
            spent = time.perf_counter() - t0
            if template and status in (200, 206):
                self._cache[cache_key] = (status, reason, resp_headers, data)
        else:
            status, reason, resp_headers, data = hit
        content_range = next((v for k, v in resp_headers if k.lower() == "content-range"), None)
        kind = self._kind(h.command, split, h.headers.get("Range"), content_range)
        if kind == "LIST":
            key = next((unquote(p[len("prefix="):]) for p in split.query.split("&") if p.startswith("prefix=")), "")
        area = self.area(bucket, key)
        with self._lock:
            self.requests[(kind, area)] += 1
            self.bytes[(kind, area)] += len(body) + len(data)
            self.server_s += spent
        length = next((v for k, v in resp_headers if k.lower() == "content-length"), "0") if h.command == "HEAD" \
            else str(len(data))
        out = [f"HTTP/1.1 {status} {reason}\r\n"]
        out += [f"{k}: {v}\r\n" for k, v in resp_headers if k.lower() not in _HOP and k.lower() != "content-length"]
        out.append(f"Content-Length: {length or 0}\r\n\r\n")
        h.wfile.write("".join(out).encode("latin-1") + (data if h.command != "HEAD" else b""))  # one send

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple:
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        if body or h.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):  # a kept-alive upstream connection may have been closed meanwhile
            conn = self._conn()
            try:
                conn.request(h.command, h.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise

    @staticmethod
    def _kind(method: str, split, rng: str | None, content_range: str | None) -> str:
        if method != "GET":
            return method
        path = split.path.lstrip("/")
        if "/" not in path or path.endswith("/") or "list-type" in split.query:
            return "LIST"
        if not rng:
            return "GET"
        if rng.replace(" ", "").startswith("bytes=-"):
            return "GET tail"
        content_range = content_range or ""  # "bytes a-b/size"
        try:
            span, size = content_range.split(" ", 1)[1].split("/")
            if int(span.split("-")[1]) + 1 == int(size):
                return "GET tail"
        except (IndexError, ValueError):
            pass
        return "GET range"


class IndexedListing:
    """moto's ListObjectsV2 over a sorted index of each bucket's keys (rebuilt after any write), so
    that a LIST costs one page, as on S3, instead of a scan and sort of the whole bucket per page
    (moto's own: hours to list 800k committed outputs). Same answers as moto's own
    (tests/test_bench_scale.py compares them); `install()` puts it in place of moto's."""

    def __init__(self):
        self.generation = 0  # bumped by every write while installed
        self._index: dict = {}

    def names_of(self, bucket) -> list[str]:
        cached = self._index.get(id(bucket))
        if cached and cached[0] == self.generation and cached[1] == len(bucket.keys):
            return cached[2]
        names = sorted(bucket.keys.keys())
        self._index[id(bucket)] = (self.generation, len(bucket.keys), names)
        return names

    def list_objects_v2(self, backend, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
        from moto.s3 import models
        from moto.s3.exceptions import MethodNotAllowed

        if isinstance(bucket, models.FakeTableStorageBucket):
            raise MethodNotAllowed()
        names, prefix = self.names_of(bucket), prefix or ""
        after = backend._pagination_tokens.get(continuation_token) if continuation_token else start_after
        out: list = []
        i = bisect.bisect_left(names, max(prefix, after) if after else prefix)
        while i < len(names) and len(out) <= max_keys:  # one more than asked: is the page truncated?
            name = names[i]
            if not name.startswith(prefix):
                break
            rest = name[len(prefix):]
            if delimiter and delimiter in rest:
                folder = prefix + rest.split(delimiter)[0] + delimiter
                i = bisect.bisect_left(names, folder[:-1] + chr(ord(folder[-1]) + 1))  # past the folder
                if after is None or folder > after:
                    out.append(folder)
                continue
            key = bucket.keys[name]
            if not isinstance(key, models.FakeDeleteMarker) and (after is None or name > after):
                out.append(key)
            i += 1
        return backend._truncate_result(out, max_keys)

    def install(self) -> None:
        from moto.s3 import models

        cls = models.S3Backend
        if getattr(cls, "_bench_indexed", False):
            return
        listing = self

        def counted(fn):
            def wrapper(backend, *a, **kw):
                listing.generation += 1
                try:
                    return fn(backend, *a, **kw)
                finally:
                    listing.generation += 1
            return wrapper

        for name in ("put_object", "delete_object", "delete_objects", "copy_object", "complete_multipart_upload",
                     "delete_bucket"):
            if hasattr(cls, name):
                setattr(cls, name, counted(getattr(cls, name)))
        cls.list_objects_v2 = lambda backend, *a, **kw: listing.list_objects_v2(backend, *a, **kw)
        cls._bench_indexed = True


# ----------------------------------------------------------------------------- synthetic data

def _backend():
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def put_direct(bucket: str, key: str, body: bytes) -> None:
    """Store an object in moto's backend directly (no HTTP, no proxy: not counted)."""
    _backend().put_object(bucket, key, body, disable_notification=True)


def _parquet_bytes(write, *args) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.parquet")
        write(*args, path)
        return Path(path).read_bytes()


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 80, 40)).save(buf, "PNG")
    return buf.getvalue()


def shard_template(rows: int) -> bytes:
    """One captioned shard of `rows` rows as alip.data writes it (write_shard: zstd, row groups of
    4096): unique keys, one tiny PNG, short texts."""
    import pyarrow as pa

    from alip.data.dataset import write_shard

    png = _tiny_png()
    table = pa.table({"key": [f"{i:08d}" for i in range(rows)], "image": [png] * rows,
                      "raw_text": ["a photo of a thing"] * rows, "caption": ["a picture of a red thing"] * rows,
                      "captioner": ["bench"] * rows})
    return _parquet_bytes(lambda t, p: write_shard(t, p, require_caption=True), table)


def unit_templates(rows: int) -> tuple[bytes, bytes]:
    """A committed caption unit of `rows` rows: data file (rows - 1 captioned) + rejects file (1)."""
    import pyarrow as pa

    from alip.data.dataset import write_shard
    from alip.data.images import write_rejects

    n, png = rows - 1, _tiny_png()
    data = pa.table({"key": [f"{i:08d}" for i in range(n)], "image": [png] * n, "raw_text": ["a photo"] * n,
                     "caption": ["a picture"] * n, "captioner": ["bench"] * n})
    return (_parquet_bytes(lambda t, p: write_shard(t, p, require_caption=True), data),
            _parquet_bytes(write_rejects, [(f"{rows:08d}", "corrupt image")]))


def area_of(bucket: str, key: str) -> str:
    """Which part of a bench bucket a request touches (the proxy's per-area counts)."""
    if key.startswith("in/") or key == "in":
        return "input"
    if key in ("out", "out/", "out/_rejects", "out/_rejects/"):
        return "output folder"  # its listings (and pyarrow's HEAD of the folder's own key)
    if key.startswith("out/_index/"):
        return "job files"  # the commit index's parts
    if key.startswith("out/_rejects/") or (key.startswith("out/") and key.endswith(".parquet")
                                           and not key.rsplit("/", 1)[-1].startswith("_")):
        return "outputs"  # committed units: data and rejects files
    if key.startswith("out/"):
        return "job files"  # manifest, lease, summary
    if key.startswith("runs"):
        return "runs"
    if key.startswith("explore"):
        return "explore out"
    return "other"


def commit_half(bucket: str, proxy: LatencyProxy) -> tuple[int, int]:
    """Commit the first half of the units the caption job's manifest lists, as the job commits
    them (rejects file, then data file; right row counts), with the commit index parts the job's
    driver writes meanwhile (one per CommitIndexWriter's flush_units units). Returns (committed,
    total) units."""
    from alip.captioning.commit_index import FLUSH_UNITS, _run_id, _table
    from alip.data.dataset import parquet_body

    manifest = json.loads(_backend().get_object(bucket, "out/_caption_job.json").value)
    units = [u for entry in manifest["sources"].values() for u in entry["units"]]
    half = units[: len(units) // 2]
    templates: dict[int, tuple[bytes, bytes]] = {}
    reports = []
    for u in half:
        rows = u["rows"]
        if rows not in templates:
            templates[rows] = unit_templates(rows)
        data, rejects = templates[rows]
        for key, body, kind in ((f"out/_rejects/{u['name']}.parquet", rejects, "rejects"),
                                (f"out/{u['name']}.parquet", data, "data")):
            put_direct(bucket, key, body)
            proxy.templates[f"{bucket}/{key}"] = f"{kind}-{rows}"
        reports.append(dict(unit=u["name"], captioned=rows - 1, rejected=1, data_bytes=len(data),
                            rejects_bytes=len(rejects)))
    per_part, run = FLUSH_UNITS, _run_id()
    for n, start in enumerate(range(0, len(reports), per_part)):
        put_direct(bucket, f"out/_index/{run}-{n:06d}.parquet",
                   parquet_body(_table(reports[start:start + per_part])).to_pybytes())
    return len(half), len(units)


def make_export(path: Path) -> str:
    """What `alip explore` reads of a model before Ray starts: the export's config with gate state."""
    from alip.gates import GateState

    path.mkdir(parents=True, exist_ok=True)
    gates = {"state": GateState().to_dict(), "sharpness": 2.0, "momentum": 0.99, "objective": "alip", "step": 1}
    (path / "open_clip_config.json").write_text(json.dumps({"alip": {"model_name": "alip-micro", "gates": gates}}))
    return str(path)


# ----------------------------------------------------------------------------- one phase (child process)

class _RayWouldStart(BaseException):
    """Raised where the job would start Ray: the end of its start-up (BaseException: no `except
    Exception` of the job catches it)."""


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in MiB. (Not ru_maxrss:
    Linux carries it over fork + exec, so a child would report its parent's RSS, moto's objects.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_phase_here(phase: str, a: dict) -> dict:
    """Run one phase in this (fresh) process: the job's entry point until it would start Ray."""
    import alip.ray_setup

    reached: dict = {}

    def stop(*_args, **_kw):
        reached["t"] = time.perf_counter()
        raise _RayWouldStart()

    alip.ray_setup.connect_ray = stop
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    extra: dict = {}
    if phase == "pretrain":
        import alip.pretrain.job as job

        calls: list = []
        plain_validate = job.validate

        def validate(cfg):  # main() and run_training() both call it: time each call, keep the plan
            t = time.perf_counter()
            out = plain_validate(cfg)
            calls.append(round(time.perf_counter() - t, 3))
            extra["plan"] = out
            return out

        job.validate = validate
        argv = ["--config", a["preset"], "--data", a["data"], "--storage-path", a["storage"], "--eval-samples", "0"]
        run = lambda: job.main(argv)  # noqa: E731
    elif phase == "explore":
        import ray  # noqa: F401  (imported inside run_explore: a fixed cost, not timed)

        import alip.model  # noqa: F401
        from alip.explore.job import ExploreConfig, run_explore

        run = lambda: run_explore(ExploreConfig(model=a["model"], data=a["data"], out=a["out"]), log=say)  # noqa: E731
    elif phase in ("caption_fresh", "caption_resumed"):
        import alip.captioning.pipeline  # noqa: F401  (imported by the job where Ray starts: not timed)
        from alip.captioning.config import CaptionJobConfig
        from alip.captioning.job import run_captioning

        cfg = CaptionJobConfig(input=a["data"], output=a["out"], rows_per_unit=a["rows_per_unit"], progress=False)
        run = lambda: run_captioning(cfg, log=say)  # noqa: E731
        extra["steps"] = _time_caption_steps()
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    base = _rss_mb()
    t0 = time.perf_counter()
    try:
        run()
    except _RayWouldStart:
        pass
    if "t" not in reached:
        raise SystemExit(f"{phase}: the job never reached the point where Ray starts")
    out = {"seconds": round(reached["t"] - t0, 3), "rss_base_mb": round(base, 1)}
    if phase == "pretrain":
        out.update(_pretrain_extras(a, extra["plan"], calls))
    if "steps" in extra:
        out["steps_s"] = {k: round(v, 2) for k, v in extra["steps"].items()}
    out["rss_peak_mb"] = round(_rss_mb("VmHWM"), 1)
    return out


def _time_caption_steps() -> dict:
    """Seconds the caption job spends in each planning step it calls (summed over calls): where its
    start-up goes. Wraps the names job.py calls (module attributes and OutputLayout methods)."""
    import alip.captioning.job as job
    from alip.captioning.lease import OutputLease
    from alip.captioning.output import OutputLayout

    steps: dict = defaultdict(float)

    def timed(owner, name: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return

        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                steps[name] += time.perf_counter() - t
        setattr(owner, name, wrapper)

    for name in ("list_input", "shard_versions", "plan_shards", "pin_input", "read_index", "compact"):
        timed(job, name)
    for name in ("read_manifest", "write_manifest", "resume_state", "remove_stale_temp_files"):
        timed(OutputLayout, name)
    timed(OutputLease, "acquire")
    return steps


def _pretrain_extras(a: dict, plan, calls: list) -> dict:
    """Not timed as start-up: what the read units cost to ship and the first read item's plan."""
    import pickle

    from alip.pretrain.config import config_from_args
    from alip.pretrain.job import shuffle_window
    from alip.pretrain.stream import batch_shares, locate, rank_positions, shuffle_positions, steps_per_item

    units, rows, steps = plan
    cfg = config_from_args(["--config", a["preset"], "--data", a["data"], "--storage-path", a["storage"]])
    t = time.perf_counter()
    blob = pickle.dumps(units, protocol=5)
    dumps_s = time.perf_counter() - t
    t = time.perf_counter()
    pickle.loads(blob)
    loads_s = time.perf_counter() - t
    G, W, seed = cfg.train.global_batch_size, cfg.max_workers, cfg.train.seed
    share = batch_shares(G, W)[0]
    positions = rank_positions(0, steps_per_item(share), G, W, 0)
    t = time.perf_counter()
    locate(units, seed, shuffle_positions(positions, seed, shuffle_window(cfg, rows)))
    locate_s = time.perf_counter() - t
    return {"units": len(units), "rows": rows, "steps": steps, "validate_calls_s": calls, "workers": W,
            "units_pickle_mb": round(len(blob) / 2**20, 2), "units_pickle_s": round(dumps_s, 3),
            "units_unpickle_s": round(loads_s, 3), "first_item_locate_s": round(locate_s, 3)}


# ----------------------------------------------------------------------------- the driver of the bench

PHASES = ("pretrain", "explore", "caption_fresh", "caption_resumed")
COLUMNS = ("LIST", "HEAD", "GET", "GET tail", "GET range", "PUT", "DELETE")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_phase(phase: str, a: dict, proxy: LatencyProxy, env: dict, timeout_s: float) -> dict:
    proxy.reset()
    cpu0 = _cpu_s()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--phase-args", json.dumps(a)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["sim_busy_s"] = round(_cpu_s() - cpu0, 2)
    snap = proxy.snapshot()
    out["requests"], out["bytes"], out["server_s"] = snap["requests"], snap["bytes"], snap["server_s"]
    out["max_in_flight"] = snap["max_in_flight"]  # the job's concurrency, as the server saw it
    out["log"] = proc.stderr.strip().splitlines()[-3:]
    return out


def total(requests: dict, kind: str | None = None, area: str | None = None) -> int:
    return sum(n for k, by_area in requests.items() if kind in (None, k)
               for ar, n in by_area.items() if area in (None, ar))


def bench_size(n: int, args, proxy: LatencyProxy, env: dict, export: str) -> dict:
    bucket = f"scale-{n}"
    backend = _backend()
    backend.create_bucket(bucket, region_name="us-east-1")
    t = time.perf_counter()
    shard = shard_template(args.rows)
    for i in range(n):
        put_direct(bucket, f"in/part-{i:06d}.parquet", shard)
        proxy.templates[f"{bucket}/in/part-{i:06d}.parquet"] = f"shard-{args.rows}"
    made_s = time.perf_counter() - t
    data = f"s3://{bucket}/in"
    result: dict = {"shards": n, "rows": n * args.rows, "shard_bytes": len(shard), "phases": {}}
    print(f"\n{n} shards x {args.rows} rows ({len(shard) / 1024:.0f} KiB each) stored in {made_s:.1f} s", flush=True)
    jobs = {
        "pretrain": {"preset": args.preset, "data": data, "storage": f"s3://{bucket}/runs"},
        "explore": {"model": export, "data": data, "out": f"s3://{bucket}/explore/scores.parquet"},
        "caption_fresh": {"data": data, "out": f"s3://{bucket}/out", "rows_per_unit": args.rows_per_unit},
        "caption_resumed": {"data": data, "out": f"s3://{bucket}/out", "rows_per_unit": args.rows_per_unit},
    }
    for phase in args.phases:
        if phase == "caption_resumed":
            if "caption_fresh" not in result["phases"]:
                raise SystemExit("caption_resumed needs caption_fresh first")
            t = time.perf_counter()
            committed, units = commit_half(bucket, proxy)
            result.update(units=units, committed=committed,
                          manifest_mb=round(len(backend.get_object(bucket, "out/_caption_job.json").value) / 2**20, 2))
            print(f"  committed {committed} of {units} units in {time.perf_counter() - t:.1f} s", flush=True)
        r = run_phase(phase, jobs[phase], proxy, env, args.phase_timeout)
        result["phases"][phase] = r
        reqs = ", ".join(f"{k} {total(r['requests'], k)}" for k in COLUMNS if total(r["requests"], k))
        print(f"  {phase:<16} {r['seconds']:>8.1f} s  peak {r['rss_peak_mb']:>7.0f} MB  requests: {reqs}  "
              f"(sim busy {r['sim_busy_s']:.1f} s)", flush=True)
    bucket_obj = backend.get_bucket(bucket)  # free moto's memory for the next size
    for key in list(proxy.templates):
        if key.startswith(bucket + "/"):
            del proxy.templates[key]
    bucket_obj.keys.clear()
    return result


def per_10x(a: float, b: float, n_a: int, n_b: int) -> float:
    """How much a figure grows per 10x shards between two sizes: (b / a) ** (1 / log10(n_b / n_a))."""
    if a <= 0 or b <= 0 or n_a == n_b:
        return float("nan")
    return (b / a) ** (1 / math.log10(n_b / n_a))


def report(results: list[dict], latency_ms: float) -> str:
    lines = [f"\nStart-up by simulation, {latency_ms:g} ms per S3 request (driver side, until Ray would start)", ""]
    head = f"{'shards':>7} {'phase':<16}{'start-up s':>11}{'peak MB':>9}" + "".join(f"{k:>10}" for k in COLUMNS) \
        + f"{'requests':>10}{'sim busy s':>11}"
    lines += [head, "-" * len(head)]
    for res in results:
        for phase, r in res["phases"].items():
            lines.append(f"{res['shards']:>7} {phase:<16}{r['seconds']:>11.2f}{r['rss_peak_mb']:>9.0f}"
                         + "".join(f"{total(r['requests'], k):>10}" for k in COLUMNS)
                         + f"{total(r['requests']):>10}{r['sim_busy_s']:>11.1f}")
    lines.append("")
    for res in results:
        facts = [f"{res['rows']:,} rows"]
        if "pretrain" in res["phases"]:
            p = res["phases"]["pretrain"]
            facts.append(f"pretrain: {p['units']} read units, validate calls {p['validate_calls_s']} s, units pickled "
                         f"{p['units_pickle_mb']} MB (unpickle {p['units_unpickle_s']} s), first item plan "
                         f"{p['first_item_locate_s']} s, base RSS {p['rss_base_mb']:.0f} MB")
        if "units" in res:
            facts.append(f"caption: {res['units']} units, manifest {res['manifest_mb']} MB, "
                         f"{res['committed']} committed before the resume")
            for phase in ("caption_fresh", "caption_resumed"):
                if "steps_s" in res["phases"].get(phase, {}):
                    facts.append(f"{phase} steps (s): " + ", ".join(
                        f"{k} {v:g}" for k, v in res["phases"][phase]["steps_s"].items()))
            resumed = res["phases"].get("caption_resumed")
            if resumed:
                for area, what in (("outputs", "on committed output files"), ("output folder", "listing them")):
                    counts = {k: total(resumed["requests"], k, area) for k in COLUMNS}
                    facts.append(f"resume's requests {what}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        lines.append(f"{res['shards']:>7} shards: " + "; ".join(facts))
    if len(results) > 1:
        lines += ["", "Growth per 10x shards (between consecutive sizes):"]
        for phase in results[0]["phases"]:
            parts = []
            for a, b in zip(results, results[1:]):
                ra, rb = a["phases"].get(phase), b["phases"].get(phase)
                if not ra or not rb:
                    continue
                n_a, n_b = a["shards"], b["shards"]
                parts.append(f"{n_a}->{n_b}: time x{per_10x(ra['seconds'], rb['seconds'], n_a, n_b):.1f}, "
                             f"peak RSS x{per_10x(ra['rss_peak_mb'], rb['rss_peak_mb'], n_a, n_b):.2f}, "
                             f"requests x{per_10x(total(ra['requests']), total(rb['requests']), n_a, n_b):.1f}")
            lines.append(f"  {phase:<16}" + "; ".join(parts))
        a, b = results[-2], results[-1]
        lines += ["", "Straight-line extrapolation to 41,000 shards (LAION-400M) from "
                      f"{a['shards']} and {b['shards']}:"]
        for phase in b["phases"]:
            if phase not in a["phases"]:
                continue
            ra, rb = a["phases"][phase], b["phases"][phase]
            ext = lambda x, y: x + (y - x) * (41000 - a["shards"]) / (b["shards"] - a["shards"])  # noqa: E731
            lines.append(f"  {phase:<16}{ext(ra['seconds'], rb['seconds']):>9.0f} s  "
                         f"{ext(ra['rss_peak_mb'], rb['rss_peak_mb']):>7.0f} MB  "
                         f"{ext(total(ra['requests']), total(rb['requests'])):>10.0f} requests")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 10000, 40000], help="dataset sizes N")
    ap.add_argument("--rows", type=int, default=10000, help="rows per shard (default 10,000)")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="injected latency per S3 request")
    ap.add_argument("--rows-per-unit", type=int, default=512, help="caption job units (the job's default)")
    ap.add_argument("--preset", default="vit-b-32", help="pretraining preset (workers, batch, model)")
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--phase-timeout", type=float, default=4 * 3600, help="seconds per phase")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--phase-args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase_here(args.phase, json.loads(args.phase_args))), flush=True)
        return []
    if min(args.shards) < 2 or args.rows < 1 or args.latency_ms < 0:
        ap.error("--shards must be >= 2 (half of the units are committed), --rows >= 1, --latency-ms >= 0")

    sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import moto_s3_server

    results = []
    with moto_s3_server() as endpoint, tempfile.TemporaryDirectory() as tmp:
        IndexedListing().install()
        proxy = LatencyProxy(endpoint, args.latency_ms / 1000, area=area_of).start()
        env = dict(os.environ, ALIP_S3_ENDPOINT=proxy.endpoint, AWS_ENDPOINT_URL=proxy.endpoint,
                   ALIP_CACHE=os.path.join(tmp, "cache"))
        export = make_export(Path(tmp) / "export")
        print(f"slow S3: moto {endpoint} behind {proxy.endpoint}, {args.latency_ms:g} ms per request", flush=True)
        try:
            for n in args.shards:
                results.append(bench_size(n, args, proxy, env, export))
        finally:
            proxy.stop()
    print(report(results, args.latency_ms))
    if args.json:
        Path(args.json).write_text(json.dumps({"latency_ms": args.latency_ms, "rows_per_shard": args.rows,
                                               "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
