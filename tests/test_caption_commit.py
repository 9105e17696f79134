"""Atomic unit commits on the local S3 server, and verification of committed units on resume.

The killed-writer tests run a real writer process against the real S3 server through a TCP
proxy that forwards the upload slowly, and kill the writer (SIGTERM turned into SystemExit, as
Ray does; or SIGKILL) once the server has received part of the upload's body.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alip.captioning.output import OutputLayout

from alip.captioning.plan import WorkUnit
from alip.captioning.unit import write_unit
from alip.data.dataset import write_bytes, write_shard
from alip.data.schema import REJECTS_SCHEMA
from alip.data.storage import resolve

REPO = Path(__file__).resolve().parents[1]

# The writer: a unit of ~3 MB of incompressible image bytes, committed with write_unit.
WRITER = r"""
import signal, sys
import numpy as np, pyarrow as pa
from alip.captioning.output import OutputLayout
from alip.captioning.unit import write_unit
from alip.data.schema import REJECTS_SCHEMA

def write(out):
    rng = np.random.default_rng(0)
    n = 48
    data = pa.table({"key": [f"k{i}" for i in range(n)],
                     "image": [rng.bytes(64 * 1024) for _ in range(n)],
                     "raw_text": ["t"] * n, "caption": ["a caption"] * n, "captioner": ["c"] * n})
    rejects = pa.table({"key": ["bad"], "reason": ["corrupt"]}, schema=REJECTS_SCHEMA)
    print("writing", flush=True)
    write_unit(OutputLayout(out), "unit-00000", data, rejects)
    print("committed", flush=True)

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))  # what Ray does to a worker it stops
    write(sys.argv[1])
"""


class SlowProxy:
    """A TCP proxy to the S3 server that forwards requests at ~1 MB/s and counts the bytes."""

    def __init__(self, target: str, rate_bytes_s: int = 1 << 20):
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        self.rate = rate_bytes_s
        self.upstream_bytes = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        chunk = 16 * 1024
        try:
            while True:
                data = src.recv(chunk)
                if not data:
                    break
                dst.sendall(data)
                if upstream:
                    self.upstream_bytes += len(data)
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def _exists(uri: str) -> bool:
    loc = resolve(uri)
    return loc.fs.get_file_info(loc.path).type != pa.fs.FileType.NotFound


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SystemExit", "SIGKILL"])
def test_writer_killed_mid_upload_commits_nothing(s3_server, s3_bucket, sig):
    out = f"{s3_bucket}/captioned"
    layout = OutputLayout(out)
    proxy = SlowProxy(s3_server)
    env = dict(os.environ, ALIP_S3_ENDPOINT=proxy.endpoint, AWS_ENDPOINT_URL=proxy.endpoint, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, out], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Rejects (tiny) are committed first; kill once ~1 MB of the data file's PUT has arrived.
        deadline = time.time() + 60
        while time.time() < deadline and proxy.upstream_bytes < (1 << 20) and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        assert _exists(layout.rejects_uri("unit-00000")) and not _exists(layout.data_uri("unit-00000"))
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    assert "committed" not in stdout
    assert proc.returncode == (1 if sig == signal.SIGTERM else -signal.SIGKILL), stderr[-2000:]
    time.sleep(0.5)  # the server notices the cut connection
    # Nothing committed: the data file (the unit's marker) is absent, so the unit is redone.
    assert not _exists(layout.data_uri("unit-00000"))
    unit = WorkUnit("unit-00000", "s3://x/in.parquet", 0, 49, 49)
    assert layout.verify_done([unit]) == ({}, {})
    # The rerun (the same write, no proxy, no kill) commits the unit completely.
    t0 = time.time()
    writer: dict = {"__name__": "rerun"}
    exec(WRITER, writer)
    writer["write"](out)
    assert layout.verify_done([unit]) == ({"unit-00000": (48, 1)}, {})
    print(f"killed after {proxy.upstream_bytes} bytes sent; rerun {time.time() - t0:.1f} s")



def _unit_tables(n: int, bad: int = 1) -> tuple[pa.Table, pa.Table]:
    data = pa.table({"key": [f"k{i}" for i in range(n)], "image": [b"x"] * n, "raw_text": ["t"] * n,
                     "caption": ["c"] * n, "captioner": ["cap"] * n})
    rejects = pa.table({"key": [f"r{i}" for i in range(bad)], "reason": ["corrupt"] * bad}, schema=REJECTS_SCHEMA)
    return data, rejects


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_verifies_committed_units_and_redoes_short_or_unreadable_ones(tmp_path, where, request):
    root = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    layout = OutputLayout(root)
    units = [WorkUnit(f"u{i}", "in.parquet", 10 * i, 10 * i + 10, 10) for i in range(6)]
    data, rejects = _unit_tables(9, bad=1)
    write_unit(layout, "u0", data, rejects)  # complete: 9 + 1 == 10
    # u1: the 0-row file an interrupted pyarrow stream upload used to leave (and no rejects).
    buf = pa.BufferOutputStream()
    pq.write_table(data.slice(0, 0), buf)
    write_bytes(buf.getvalue(), layout.data_uri("u1"))
    # u2: short (5 + 1 rows for a 10-row unit); u3: truncated garbage; u4: data without rejects.
    write_unit(layout, "u2", data.slice(0, 5), rejects)
    write_shard(rejects.slice(0, 0), layout.rejects_uri("u3"), validate=False)
    write_bytes(b"PAR1 half a file", layout.data_uri("u3"))
    write_shard(data.slice(0, 10 - 0), layout.data_uri("u4"), require_caption=True)
    # u5: never written.
    done, bad = layout.verify_done(units)
    assert done == {"u0": (9, 1)}
    assert set(bad) == {"u1", "u2", "u3", "u4"}
    assert "rejects file is missing" in bad["u1"] and "rejects file is missing" in bad["u4"]
    assert bad["u2"] == "5 captioned + 1 rejected rows, the unit has 10"
    assert bad["u3"].startswith("data file is unreadable")
    layout.discard(bad)
    assert layout.done_units() == {"u0"}
    for name in bad:
        assert not _exists(layout.rejects_uri(name))


def test_write_bytes_interrupted_leaves_no_local_file(tmp_path, monkeypatch):
    """A local writer interrupted by SystemExit neither commits the file nor leaves its temp file."""
    target = tmp_path / "out" / "u.parquet"
    target.parent.mkdir()
    real_replace = os.replace

    def exit_before_rename(src, dst):
        raise SystemExit(1)

    monkeypatch.setattr(os, "replace", exit_before_rename)
    with pytest.raises(SystemExit):
        write_bytes(np.arange(10).tobytes(), str(target))
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.listdir(target.parent) == []
