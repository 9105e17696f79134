"""Shared pytest fixtures (keep this file small; put helpers in their own modules).

S3 (tests/s3_server.py):
  s3_server  session-scoped. Starts moto's real S3-compatible HTTP server on 127.0.0.1 (a free
             port) and yields its endpoint URL, e.g. "http://127.0.0.1:41234". While it runs,
             AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY=testing, AWS_REGION/AWS_DEFAULT_REGION=us-east-1
             and AWS_ENDPOINT_URL/ALIP_S3_ENDPOINT=<endpoint> are set, so alip.data.storage,
             boto3, subprocesses and Ray workers started afterwards all reach it.
  s3_bucket  function-scoped. A fresh empty bucket on that server; yields "s3://<bucket>".
             Use it as a dataset root: f"{s3_bucket}/world", f"{s3_bucket}/captioned", ...

Working tree (autouse, session-scoped):
  scratch_cwd  the whole session runs in a scratch current directory, with $ALIP_DEMO_OUT (the demo's
             folder, also the default model of the serve app: alip.demo.demo_export) pointing at a
             scratch path that does not exist, and $ALIP_SERVE_MODEL / $ALIP_EVAL_DATA unset. So the
             defaults that resolve against the current directory or the checkout (demo_out/, runs/,
             data/, eval_data/) never see what a user's `make demo` or runs left there, and no test
             writes into the checkout by default. Guarded by tests/test_working_tree.py.

Running in parallel (`make test` runs `pytest -n 2 --dist loadfile`, pytest-xdist):
  * each worker gets its own Ray temp dir ($RAY_TMPDIR), so a Ray started by one worker (sessions,
    sockets, the `ray_current_cluster` file that a bare `ray.init()` would attach to) is invisible
    to the other;
  * files are handed out whole (module-scoped clusters are built once), longest first (FILE_SECONDS),
    so that no long file starts last.
"""

import os
import tempfile

import pytest

from s3_server import create_bucket, moto_s3_server
from suite_timeline import record as record_timeline

#: ALIP_TEST_TIMELINE=<file>: each test's start and end (and the machine's busy CPU) go there;
#: `python tests/suite_timeline.py <file>` reports them (lanes, FILE_SECONDS, how busy the box was).
TIMELINE = os.environ.get("ALIP_TEST_TIMELINE")

#: the user's settings that would point a test's defaults at their own files
USER_PATH_ENV = ("ALIP_SERVE_MODEL", "ALIP_EVAL_DATA")


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:  # before any test imports Ray; subprocesses (ray start, jobs) inherit it
        ray_tmp = os.path.join(tempfile.gettempdir(), f"alip-ray-{worker}")  # short: Ray's socket paths
        os.makedirs(ray_tmp, exist_ok=True)
        os.environ["RAY_TMPDIR"] = ray_tmp


#: Seconds each file took (>= 10 s) on one of two xdist workers: per-test start/end times of a
#: `make test` run alone, 2026-12-07, 2-core box (issue 24). Only the order the files are handed
#: out in (longest first, so no long file starts last); a stale figure costs balance, never correctness.
#: Files not named here count 20 s per slow test, 0.1 s per other test.
FILE_SECONDS = {
    "test_readme_commands.py": 620, "test_chaos_caption.py": 412, "test_pretrain_job.py": 312,
    "test_pretrain_elastic.py": 308, "test_caption_cluster.py": 286, "test_demo_console.py": 185,
    "test_captioners_ofa.py": 113, "test_caption_job_resume.py": 107, "test_serve_abuse.py": 96,
    "test_caption_manifest.py": 75, "test_bench_caption.py": 74, "test_serve_e2e.py": 57, "test_caption_job.py": 54,
    "test_bench_learning.py": 49, "test_explore_job.py": 43, "test_eval_e2e.py": 43, "test_bench_scale.py": 39,
    "test_caption_pool.py": 37, "test_distributed_equivalence.py": 28, "test_gpu_check.py": 23,
    "test_spot_watch.py": 21, "test_world_knobs.py": 20, "test_model.py": 20, "test_training_options.py": 16,
    "test_working_tree.py": 16, "test_pretrain_data_ray.py": 15, "test_captioners_builtin.py": 15,
    "test_ray_setup.py": 13, "test_caption_lease.py": 12, "test_scale_planning.py": 12, "test_bench_train_step.py": 11,
}


def pytest_collection_modifyitems(config, items):
    """The longest files first (a stable sort: a file's tests stay together, in order). make test
    passes --no-loadscope-reorder, so xdist hands the files out in this order."""
    seconds: dict[str, float] = {}
    for item in items:
        name = os.path.basename(item.fspath.strpath)
        if name in FILE_SECONDS:
            seconds[name] = FILE_SECONDS[name]
        else:
            seconds[name] = seconds.get(name, 0.0) + (20.0 if item.get_closest_marker("slow") else 0.1)
    items.sort(key=lambda item: -seconds[os.path.basename(item.fspath.strpath)])


def pytest_runtest_logstart(nodeid, location):
    if TIMELINE:
        record_timeline(TIMELINE, "start", nodeid)


def pytest_runtest_logfinish(nodeid, location):
    if TIMELINE:
        record_timeline(TIMELINE, "end", nodeid)


@pytest.fixture(scope="session", autouse=True)
def scratch_cwd(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("cwd")
    mp = pytest.MonkeyPatch()
    mp.chdir(scratch)
    mp.setenv("ALIP_DEMO_OUT", str(scratch / "no-demo-here"))
    for name in USER_PATH_ENV:
        if name in os.environ:
            mp.delenv(name)
    yield scratch
    mp.undo()


@pytest.fixture(scope="session")
def s3_server():
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server):
    yield f"s3://{create_bucket(s3_server)}"
