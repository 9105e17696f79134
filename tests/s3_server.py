"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1.

Tests talk to it over HTTP exactly like they would to MinIO or AWS (pyarrow's S3 client,
boto3, subprocesses, Ray workers), nothing is monkey-patched; conditional writes are made atomic
(as on S3: see _atomic_conditional_server). Exposed through the
``s3_server`` / ``s3_bucket`` fixtures in ``tests/conftest.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _atomic_conditional_server(ip: str, port: int):
    """moto's ThreadedMotoServer, with conditional requests (If-Match / If-None-Match) made atomic
    as they are on S3. moto checks the condition, then writes, with no lock between: two concurrent
    "create if absent" PUTs of one key can both succeed. Under load (the suite on two xdist
    workers) test_caption_lease's race saw two lease winners that real S3 would never allow."""
    import threading

    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:
            inner = DomainDispatcherApplication(create_backend_app)
            conditional = threading.Lock()

            def app(environ, start_response):
                if "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ:
                    with conditional:  # check and write as one step; the response read inside the lock
                        return list(inner(environ, start_response))
                return inner(environ, start_response)

            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return Server(ip_address=ip, port=port, verbose=False)


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """Start moto's threaded server on a free local port, set the S3 env vars, yield the endpoint.

    Sets AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY=testing, the region, and both
    AWS_ENDPOINT_URL and ALIP_S3_ENDPOINT to the server; restores the environment on exit.
    The variables are inherited by subprocesses and by Ray workers started afterwards.
    """
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = _atomic_conditional_server("127.0.0.1", port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(S3_ENV, AWS_ENDPOINT_URL=endpoint, ALIP_S3_ENDPOINT=endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def create_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket on the server (a fresh unique name by default); returns its name."""
    import boto3

    name = name or f"alip-test-{uuid.uuid4().hex[:10]}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=name)
    return name
