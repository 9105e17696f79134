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
"""

import os

import pytest

from s3_server import create_bucket, moto_s3_server

#: the user's settings that would point a test's defaults at their own files
USER_PATH_ENV = ("ALIP_SERVE_MODEL", "ALIP_EVAL_DATA")


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
