"""Shared pytest fixtures (keep this file small; put helpers in their own modules).

S3 (tests/s3_server.py):
  s3_server  session-scoped. Starts moto's real S3-compatible HTTP server on 127.0.0.1 (a free
             port) and yields its endpoint URL, e.g. "http://127.0.0.1:41234". While it runs,
             AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY=testing, AWS_REGION/AWS_DEFAULT_REGION=us-east-1
             and AWS_ENDPOINT_URL/ALIP_S3_ENDPOINT=<endpoint> are set, so alip.data.storage,
             boto3, subprocesses and Ray workers started afterwards all reach it.
  s3_bucket  function-scoped. A fresh empty bucket on that server; yields "s3://<bucket>".
             Use it as a dataset root: f"{s3_bucket}/world", f"{s3_bucket}/captioned", ...
"""

import pytest

from s3_server import create_bucket, moto_s3_server


@pytest.fixture(scope="session")
def s3_server():
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server):
    yield f"s3://{create_bucket(s3_server)}"
