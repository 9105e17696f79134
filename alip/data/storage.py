"""Resolve dataset locations (local paths or ``s3://bucket/prefix``) into pyarrow filesystems.

Everything that reads or writes data goes through :func:`resolve`, so local folders and
S3-compatible object stores (AWS, MinIO, Ceph, moto in the tests) behave the same way.

S3 settings come from the environment, like every AWS tool:

* endpoint: ``ALIP_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:9000``);
  unset means AWS itself.
* region: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``).
* credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
  ``~/.aws`` files or instance metadata (resolved by the AWS SDK inside pyarrow).

A custom endpoint is probed with a plain TCP connect before use so that a wrong or down
endpoint fails in seconds with a readable message instead of hanging in SDK retries.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

#: Seconds allowed for the TCP probe and the SDK's connect timeout.
CONNECT_TIMEOUT_S = float(os.environ.get("ALIP_S3_CONNECT_TIMEOUT", "5"))
#: SDK attempts per request (first try included); small so broken setups fail fast.
MAX_ATTEMPTS = int(os.environ.get("ALIP_S3_MAX_ATTEMPTS", "3"))


class StorageError(ValueError):
    """Storage is unreachable, misconfigured, or a path does not exist."""


@dataclass(frozen=True)
class Location:
    """A resolved location: the filesystem, the path inside it, and the original URI."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def child(self, name: str) -> "Location":
        """The location of ``name`` inside this folder/prefix."""
        return Location(self.fs, join(self.path, name), join(self.uri, name))


def join(base: str, name: str) -> str:
    """Join a path or URI with a child name using '/' (S3 keys and POSIX paths alike)."""
    return base.rstrip("/") + "/" + name.lstrip("/")


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself."""
    return os.environ.get("ALIP_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


def _probe_endpoint(endpoint: str) -> None:
    parsed = urlparse(endpoint if "://" in endpoint else "http://" + endpoint)
    host = parsed.hostname
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise StorageError(
            f"S3 endpoint {endpoint!r} is unreachable ({exc}). Check that the object store is "
            "running and that ALIP_S3_ENDPOINT / AWS_ENDPOINT_URL points at it "
            "(e.g. http://127.0.0.1:9000)."
        ) from exc


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """Build a pyarrow S3FileSystem from the environment (see module doc), probing custom endpoints."""
    endpoint = endpoint if endpoint is not None else s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict = dict(
        region=region,
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=max(CONNECT_TIMEOUT_S, 30.0),
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    )
    if endpoint:
        _probe_endpoint(endpoint)
        parsed = urlparse(endpoint if "://" in endpoint else "http://" + endpoint)
        kwargs["scheme"] = parsed.scheme or "http"
        kwargs["endpoint_override"] = parsed.netloc
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, *, must_exist: bool = False) -> Location:
    """Turn ``uri`` (local path, ``file://`` URI or ``s3://bucket/prefix``) into a :class:`Location`.

    With ``must_exist=True`` a missing path raises :class:`StorageError` naming the path.
    Storage errors (refused connection, bad credentials, missing bucket) are raised as
    :class:`StorageError` with the underlying message.
    """
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"expected a local path or s3://bucket/prefix, got {uri!r}")
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):].strip("/")
        if not rest:
            raise StorageError(f"{uri!r} has no bucket name; use s3://bucket/prefix")
        loc = Location(s3_filesystem(), rest, "s3://" + rest)
    elif "://" in uri and not uri.startswith("file://"):
        raise StorageError(
            f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix"
        )
    else:
        path = os.path.abspath(os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri))
        loc = Location(pafs.LocalFileSystem(), path, path)
    if must_exist and file_type(loc) == pafs.FileType.NotFound:
        raise StorageError(f"{uri!r} does not exist")
    return loc


def ensure_s3_connections(n: int) -> None:
    """Let S3 filesystems made from now on keep ``n`` connections. pyarrow's S3 client keeps
    max(25, Arrow's IO thread count) of them, and a request beyond that waits for one: the IO
    thread count is raised to ``n`` (process-wide, never lowered; idle threads cost nothing)."""
    if pa.io_thread_count() < n:
        pa.set_io_thread_count(n)


def resolve_all(uris: list[str]) -> list[Location]:
    """:func:`resolve` for many URIs (e.g. every shard of a dataset), with one filesystem for all
    the S3 ones: one client with its kept-alive connections and one endpoint probe, where resolving
    each URI builds a client and probes the endpoint per file."""
    s3 = None
    out = []
    for uri in uris:
        if isinstance(uri, str) and uri.startswith("s3://") and uri[len("s3://"):].strip("/"):
            path = uri[len("s3://"):].strip("/")
            s3 = s3 or resolve(uri).fs
            out.append(Location(s3, path, "s3://" + path))
        else:
            out.append(resolve(uri))
    return out


def file_info(loc: Location) -> pafs.FileInfo:
    """The pyarrow FileInfo of a location (type, size), with storage failures turned into StorageError."""
    try:
        return loc.fs.get_file_info(loc.path)
    except OSError as exc:  # pyarrow raises OSError for S3 network/auth failures
        raise StorageError(f"cannot access {loc.uri!r}: {exc}") from exc


def file_type(loc: Location) -> pafs.FileType:
    """The pyarrow FileType of a location, with storage failures turned into StorageError."""
    return file_info(loc).type


def ensure_dir(loc: Location) -> None:
    """Create a local folder (S3 prefixes need no creation; the bucket must already exist)."""
    if loc.is_s3:
        bucket = loc.path.split("/", 1)[0]
        try:
            info = loc.fs.get_file_info(bucket)
        except OSError as exc:
            raise StorageError(f"cannot access bucket {bucket!r}: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"bucket {bucket!r} does not exist; create it first (aws s3 mb s3://{bucket})")
        return
    loc.fs.create_dir(loc.path, recursive=True)
