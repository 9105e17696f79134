"""alip.ray_setup: which Ray a command gets, and which Ray lines are silenced (the rest still show).

Fast and Ray-free in this process: the filters are plain logging/threading behaviour (one test
starts real Rays in a child process, ~10 s). Real Ray runs of these
settings: tests/test_readme_commands.py asserts on the console of the README's commands."""

import logging
import subprocess
import sys
import textwrap

import pytest

from alip import ray_setup
from log_capture import capture_loggers


@pytest.fixture
def clean_loggers():
    names = {name for name, _ in ray_setup.HARMLESS_MESSAGES}
    saved = {n: list(logging.getLogger(n).filters) for n in names}
    for n in names:  # no filter left by an earlier Ray run in this process (a job test on this worker)
        logging.getLogger(n).filters[:] = [f for f in saved[n] if not isinstance(f, ray_setup._DropHarmless)]
    yield
    for n, filters in saved.items():
        logging.getLogger(n).filters[:] = filters


def test_harmless_messages_are_dropped_real_warnings_are_not(clean_loggers, caplog, monkeypatch):
    monkeypatch.delenv(ray_setup.VERBOSE_ENV, raising=False)
    ray_setup.install_log_filters()
    ray_setup.install_log_filters()  # idempotent: one filter per logger
    cleaner = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    assert sum(isinstance(f, ray_setup._DropHarmless) for f in cleaner.filters) == 1
    watcher = logging.getLogger("ray.train.v2._internal.execution.preemption")
    with capture_loggers(caplog, cleaner.name, watcher.name, "ray.data._internal.progress"):
        cleaner.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
        watcher.warning("PreemptionWatcher poll failed")
        watcher.warning("PreemptionWatcher: preemption detected — preempted_node_ids=%s", ["n1"])  # real: shown
        cleaner.error("Failed to remove placement group pg-1")  # real: shown
        logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, set ...")
    assert [r.getMessage() for r in caplog.records] == [
        "PreemptionWatcher: preemption detected — preempted_node_ids=['n1']",
        "Failed to remove placement group pg-1",
    ]


def test_verbose_env_keeps_everything(clean_loggers, caplog, monkeypatch):
    monkeypatch.setenv(ray_setup.VERBOSE_ENV, "1")
    ray_setup.install_log_filters()
    with capture_loggers(caplog, "ray.train.v2._internal.execution.preemption"):
        logging.getLogger("ray.train.v2._internal.execution.preemption").warning("PreemptionWatcher poll failed")
    assert [r.getMessage() for r in caplog.records] == ["PreemptionWatcher poll failed"]


def test_quiet_env_defaults_never_override_the_user(monkeypatch):
    monkeypatch.delenv(ray_setup.VERBOSE_ENV, raising=False)
    for key in ray_setup.QUIET_ENV:  # restored after the test
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")  # the user's choice
    ray_setup.quiet_ray()
    import os

    assert os.environ["RAY_DEDUP_LOGS"] == "0" and os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"


def test_only_the_placement_group_cleaner_thread_dies_quietly():
    # in a child process: the hook replaces threading.excepthook for the whole process
    code = textwrap.dedent("""
        import threading
        from alip import ray_setup
        ray_setup._quiet_cleaner_thread()
        def boom():
            raise ValueError("Couldn't obtain the API server address from GCS")
        for name in ("PlacementGroupCleanerMonitor", "SomethingReal"):
            t = threading.Thread(target=boom, name=name); t.start(); t.join()
        print("done")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "done"
    assert "SomethingReal" in out.stderr and "PlacementGroupCleanerMonitor" not in out.stderr
    assert out.stderr.count("Couldn't obtain the API server address") == 1


def test_connect_ray_attaches_only_when_told_where(monkeypatch):
    import ray

    assert not ray.is_initialized()
    calls = []
    monkeypatch.setattr(ray_setup, "init_local_ray", lambda num_cpus=None, **kw: calls.append(("local", num_cpus)))
    monkeypatch.setattr(ray_setup, "attach_ray", lambda address, **kw: calls.append(("attach", address)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_setup.connect_ray() and ray_setup.connect_ray("local", num_cpus=2)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6391")  # what `ray job submit` sets for its driver
    assert ray_setup.connect_ray()
    assert ray_setup.connect_ray("auto")
    assert calls == [("local", None), ("local", 2), ("attach", "127.0.0.1:6391"), ("attach", "auto")]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="use init_local_ray"):
        ray_setup.attach_ray("local")  # refused before Ray is touched
    assert not ray.is_initialized()


def test_private_local_ray_is_the_one_this_process_started_not_a_later_cluster():
    """A process that started a private local Ray, shut it down and attached to another Ray (a
    notebook; an xdist worker running test_caption_cluster after a local-Ray test) is on that other
    Ray: its caption job must size its pool by the cluster's rule, not the local one. Real Rays, in
    a child process (this one must stay Ray-free)."""
    code = textwrap.dedent("""
        import ray
        from alip import ray_setup
        assert not ray_setup.is_private_local_ray()
        ray_setup.init_local_ray(num_cpus=1, log=lambda *a: None)
        print("started", ray_setup.is_private_local_ray())
        ray.shutdown()
        print("after shutdown", ray_setup.is_private_local_ray())
        ray.init(address="local", num_cpus=1, include_dashboard=False)  # another Ray, not ours
        print("other", ray_setup.is_private_local_ray())
        ray.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("started", "after", "other"))]
    assert lines == ["started True", "after shutdown False", "other False"], out.stdout[-2000:]


def test_importing_alip_ray_setup_changes_no_logging():
    code = ("import logging, threading; hook = threading.excepthook; import alip.ray_setup; "
            "assert threading.excepthook is hook; "
            "assert not logging.getLogger('ray.train.v2._internal.execution.preemption').filters; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
