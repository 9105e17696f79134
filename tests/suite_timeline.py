"""Where the suite's time goes: per-test start/end times and the machine's busy CPU (issue 24).

    ALIP_TEST_TIMELINE=/tmp/timeline.tsv make test       # record (conftest.py calls record())
    .venv/bin/python tests/suite_timeline.py /tmp/timeline.tsv

Each xdist worker appends one line per test start and end: worker, unix time, event, the machine's
busy CPU-seconds so far (/proc/stat, all cores), test id. The report prints each lane's files in the
order they ran, the files' seconds as `FILE_SECONDS` (conftest.py) wants them, and how busy the
machine was. Why it matters: on the 2-core box the suite is CPU-bound (96-100 % busy at -n 2), so
a test's cost is its CPU-seconds, and a test's in-suite seconds are roughly its alone seconds
times the slowdown of whatever ran beside it.
"""
from __future__ import annotations

import collections
import os
import sys
import time


def busy_cpu_seconds() -> float:
    """CPU-seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return float("nan")
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8)) / os.sysconf("SC_CLK_TCK")


def record(path: str, event: str, nodeid: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}\t{time.time():.2f}\t{event}\t"
                f"{busy_cpu_seconds():.2f}\t{nodeid}\n")


def read(path: str) -> list[tuple[str, float, str, float, str]]:
    rows = []
    with open(path) as f:
        for line in f:
            worker, t, event, cpu, nodeid = line.rstrip("\n").split("\t", 4)
            rows.append((worker, float(t), event, float(cpu), nodeid))
    return rows


def summarise(rows) -> dict:
    """Per-file lane seconds, each lane's files in order, and the machine's busy share. Under xdist
    the controller ("main") logs every test again as its workers report them: those rows are dropped."""
    if any(r[0] != "main" for r in rows):
        rows = [r for r in rows if r[0] != "main"]
    started, seconds, lanes = {}, collections.Counter(), collections.defaultdict(list)
    for worker, t, event, _cpu, nodeid in rows:
        name = os.path.basename(nodeid.split("::")[0])
        if event == "start":
            started[(worker, nodeid)] = t
            if not lanes[worker] or lanes[worker][-1][0] != name:
                lanes[worker].append([name, t, t])
        elif (worker, nodeid) in started:
            seconds[name] += t - started.pop((worker, nodeid))
            lanes[worker][-1][2] = t
    wall = max(r[1] for r in rows) - min(r[1] for r in rows) if rows else 0.0
    cpu = max(r[3] for r in rows) - min(r[3] for r in rows) if rows else 0.0
    return {"file_seconds": dict(seconds.most_common()), "lanes": dict(lanes), "wall_s": wall, "busy_cpu_s": cpu}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/suite_timeline.py <file written by ALIP_TEST_TIMELINE=<file> make test>",
              file=sys.stderr)
        return 2
    s = summarise(read(argv[0]))
    t0 = min((start for lane in s["lanes"].values() for _, start, _ in lane), default=0.0)
    for worker in sorted(s["lanes"]):
        print(f"{worker}:")
        for name, start, end in s["lanes"][worker]:
            if end - start >= 10:
                print(f"  {start - t0:6.0f} -> {end - t0:6.0f}  {end - start:5.0f} s  {name}")
    print("FILE_SECONDS = {" + ", ".join(f'"{n}": {round(v)}' for n, v in s["file_seconds"].items() if v >= 10) + "}")
    cores = os.cpu_count() or 1
    busy = s["busy_cpu_s"] / (s["wall_s"] * cores) if s["wall_s"] else float("nan")
    print(f"wall {s['wall_s']:.0f} s, machine busy {s['busy_cpu_s']:.0f} CPU-s = {busy:.0%} of {cores} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
