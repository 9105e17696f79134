"""tests/suite_timeline.py: the recorder conftest.py calls, and its report (issue 24)."""
import subprocess
import sys
from pathlib import Path

from suite_timeline import busy_cpu_seconds, read, record, summarise

ROOT = Path(__file__).resolve().parents[1]


def test_lanes_file_seconds_and_busy_share(tmp_path, monkeypatch):
    path = tmp_path / "timeline.tsv"
    lines = [("gw0", 0, "start", 100, "tests/test_a.py::x"), ("gw1", 1, "start", 100.5, "tests/test_b.py::y"),
             ("main", 1, "start", 100.5, "tests/test_b.py::y"),  # the xdist controller's copy: ignored
             ("gw0", 30, "end", 150, "tests/test_a.py::x"), ("gw0", 30, "start", 150, "tests/test_a.py::z"),
             ("gw0", 40, "end", 170, "tests/test_a.py::z"), ("gw1", 41, "end", 180, "tests/test_b.py::y")]
    path.write_text("".join(f"{w}\t{t}\t{e}\t{c}\t{n}\n" for w, t, e, c, n in lines))
    s = summarise(read(str(path)))
    assert s["file_seconds"] == {"test_a.py": 40.0, "test_b.py": 40.0}
    assert s["lanes"] == {"gw0": [["test_a.py", 0.0, 40.0]], "gw1": [["test_b.py", 1.0, 41.0]]}
    assert s["wall_s"] == 41 and s["busy_cpu_s"] == 80
    out = subprocess.run([sys.executable, "tests/suite_timeline.py", str(path)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert 'FILE_SECONDS = {"test_a.py": 40, "test_b.py": 40}' in out and "machine busy 80 CPU-s" in out


def test_record_appends_one_line_per_event(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    path = str(tmp_path / "t.tsv")
    before = busy_cpu_seconds()
    record(path, "start", "tests/test_x.py::t")
    record(path, "end", "tests/test_x.py::t")
    (w1, t1, e1, c1, n1), (_, t2, e2, c2, _) = read(path)
    assert (w1, e1, e2, n1) == ("gw3", "start", "end", "tests/test_x.py::t")
    assert before <= c1 <= c2 and t1 <= t2
