"""Reading and writing dataset shards: Parquet (ours) and WebDataset tars (img2dataset's).

Shards live in one folder or S3 prefix (see :mod:`alip.data.storage`). Every reader returns a
pyarrow Table in the canonical schema (:mod:`alip.data.schema`), whatever the input format:

* Parquet with ``key``/``image``/``raw_text``; img2dataset's ``output_format="parquet"``
  (image in ``jpg``/``png``/``webp``, alt-text in ``caption``) is mapped onto it.
* img2dataset ``output_format="webdataset"``: ``00000.tar`` holding ``<key>.jpg|png|webp``,
  ``<key>.txt`` (alt-text) and ``<key>.json`` (``{"key": ..., "url": ...}``) per sample.
  img2dataset writes ``00000.parquet`` metadata files next to the tars; when a folder has
  tars, the tars are the dataset and those Parquet files are ignored.

Files whose name starts with ``_`` or ``.`` (manifests, temp files) are never shards.
"""

from __future__ import annotations

import functools
import io
import json
import os
import posixpath
import socket
import tarfile
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from alip.data.schema import (
    CAPTION,
    IMAGE,
    KEY,
    RAW_TEXT,
    DatasetSchemaError,
    canonicalize,
    validate_table,
)
from alip.data.storage import (
    CONNECT_TIMEOUT_S,
    MAX_ATTEMPTS,
    Location,
    StorageError,
    ensure_dir,
    ensure_s3_connections,
    file_info,
    join,
    resolve,
    resolve_all,
    s3_endpoint,
)

PARQUET = "parquet"
WEBDATASET = "webdataset"
FORMATS = (PARQUET, WEBDATASET)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class DatasetError(ValueError):
    """A dataset location holds no usable shards or mixes formats."""


def _is_hidden(name: str) -> bool:
    return name.startswith("_") or name.startswith(".")


def _format_of(path: str) -> str | None:
    if path.endswith(".parquet"):
        return PARQUET
    if path.endswith(".tar"):
        return WEBDATASET
    return None


def list_shards(uri: str, format: str = "auto") -> list[str]:
    """Sorted shard URIs under ``uri`` (a folder/prefix, or a single shard file).

    ``format`` is ``"auto"``, ``"parquet"`` or ``"webdataset"``. Auto-detection picks tars
    when any are present (img2dataset puts metadata Parquet beside them), else Parquet.
    """
    return list(list_shard_sizes(uri, format))


def list_shard_sizes(uri: str, format: str = "auto") -> dict[str, int | None]:
    """:func:`list_shards` with each shard's size in bytes, from the same listing (no request
    per shard): ``{shard URI: size}`` in shard order (None where the storage did not say)."""
    if format not in ("auto",) + FORMATS:
        raise ValueError(f"format must be 'auto', 'parquet' or 'webdataset', got {format!r}")
    loc = resolve(uri)
    info = file_info(loc)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"dataset {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        fmt = _format_of(loc.path)
        if fmt is None or (format != "auto" and fmt != format):
            raise DatasetError(f"{uri!r} is not a {format if format != 'auto' else 'Parquet or .tar'} shard")
        return {loc.uri: info.size}
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
    except OSError as exc:
        raise StorageError(f"cannot list {uri!r}: {exc}") from exc
    by_format: dict[str, dict[str, int | None]] = {PARQUET: {}, WEBDATASET: {}}
    for info in infos:
        if info.type != pafs.FileType.File or _is_hidden(info.base_name):
            continue
        fmt = _format_of(info.base_name)
        if fmt is not None:
            by_format[fmt][join(loc.uri, info.base_name)] = info.size
    if format == "auto":
        format = WEBDATASET if by_format[WEBDATASET] else PARQUET
    shards = sorted(by_format[format])
    if not shards:
        raise DatasetError(
            f"no {format} shards (*.{'tar' if format == WEBDATASET else 'parquet'}) found in {uri!r}"
        )
    return {s: by_format[format][s] for s in shards}


def detect_format(uri: str) -> str:
    """``"parquet"`` or ``"webdataset"`` for a dataset folder or shard."""
    return _format_of(list_shards(uri)[0])  # type: ignore[return-value]


# ----------------------------------------------------------------------------- footers

#: Requests a driver keeps in flight for per-file metadata (every shard's Parquet footer before a
#: job starts, every committed output's at a resume). Each one mostly waits (tens of ms on S3):
#: 64 at a time read 40,000 footers in about 30 s at 50 ms a request, one at a time over half an hour.
IO_THREADS = 64
_FRAGMENTS = None  # pyarrow.dataset.ParquetFileFormat, imported on first use


def io_map(fn: Callable, items, threads: int = IO_THREADS) -> Iterator:
    """``fn(item)`` for each item, in order, computed ``threads`` at a time (I/O-bound calls).

    Behaves like a plain loop to the consumer: an exception of ``fn`` is raised when the
    iteration reaches its item, after every result before it was yielded. At most 4 x ``threads``
    calls run ahead of the consumer (memory stays bounded for a million items); those still
    queued when it stops (an error, a ``break``) are cancelled, those running finish unread.
    """
    items = list(items)
    if not items:
        return
    pool = ThreadPoolExecutor(max(1, min(threads, len(items))), thread_name_prefix="io-map")
    pending: deque = deque()
    nxt = 0
    try:
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < 4 * threads:
                pending.append(pool.submit(fn, items[nxt]))
                nxt += 1
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def read_footer(loc: Location, size: int | None = None) -> pq.FileMetaData:
    """A Parquet file's footer (no data read). With its ``size`` known (from a listing), an S3 file
    costs one ranged GET of its tail instead of a HEAD and a GET. Whatever fails on that path (the
    file changed or vanished since it was listed, it is not Parquet) is read again the plain way,
    which raises exactly the error the plain way raises."""
    global _FRAGMENTS
    if size is not None and loc.is_s3:
        try:
            if _FRAGMENTS is None:
                import pyarrow.dataset as pads

                _FRAGMENTS = pads.ParquetFileFormat()
            return _FRAGMENTS.make_fragment(loc.path, filesystem=loc.fs, file_size=size).metadata
        except (OSError, pa.ArrowException):
            pass
    with loc.fs.open_input_file(loc.path) as f:
        return pq.ParquetFile(f).metadata


def iter_footers(uris: list[str], sizes: dict[str, int | None] | None = None,
                 threads: int = IO_THREADS) -> Iterator[tuple[str, pq.FileMetaData]]:
    """``(uri, footer)`` of each Parquet file, in the order given, read ``threads`` at a time with
    one filesystem for all (:func:`read_footer`; ``sizes``, e.g. from :func:`list_shard_sizes`,
    save a request each). Errors come as from a plain loop (:func:`io_map`)."""
    uris = list(uris)
    sizes = sizes or {}
    ensure_s3_connections(threads)
    locs = resolve_all(uris)
    return zip(uris, io_map(lambda i: read_footer(locs[i], sizes.get(uris[i])), range(len(uris)), threads))


# ----------------------------------------------------------------------------- reading

def _from_img2dataset_parquet(table: pa.Table) -> pa.Table:
    """Map img2dataset's parquet layout (jpg/png/webp + caption) onto key/image/raw_text."""
    names = table.column_names
    if IMAGE not in names:
        for ext in IMAGE_EXTENSIONS:
            if ext in names:
                table = table.rename_columns([IMAGE if n == ext else n for n in names])
                names = table.column_names
                # In img2dataset output "caption" is the alt-text, not a synthetic caption.
                if RAW_TEXT not in names and CAPTION in names:
                    table = table.rename_columns([RAW_TEXT if n == CAPTION else n for n in names])
                break
    return table


def read_shard(uri: str, columns: list[str] | None = None, validate: bool = True) -> pa.Table:
    """Read one shard (Parquet or WebDataset tar) as a canonical table.

    ``columns`` restricts Parquet reads (the base columns are always included so the table
    stays valid). Raises :class:`DatasetSchemaError` naming the shard if it is malformed.
    """
    loc = resolve(uri)
    fmt = _format_of(loc.path)
    if fmt == WEBDATASET:
        with _open_input(loc) as stream:
            table = webdataset_to_table(stream, where=loc.uri)
        if columns is not None:
            table = table.select([c for c in table.column_names if c in set(columns) | {KEY, IMAGE, RAW_TEXT}])
    elif fmt == PARQUET:
        try:
            with _open_input(loc, random_access=True) as f:
                pf = pq.ParquetFile(f)
                read_cols = None
                if columns is not None:
                    # Only fetch what is asked for (plus the base columns and their img2dataset
                    # aliases): on S3 this skips the image bytes when only labels are needed.
                    wanted = {KEY, IMAGE, RAW_TEXT, CAPTION, *IMAGE_EXTENSIONS, *columns}
                    read_cols = [c for c in pf.schema_arrow.names if c in wanted]
                table = pf.read(columns=read_cols)
        except pa.ArrowInvalid as exc:
            raise DatasetSchemaError(f"{loc.uri}: not a readable Parquet file ({exc})") from exc
        table = _from_img2dataset_parquet(table)
        if columns is not None:
            wanted = list(dict.fromkeys([KEY, IMAGE, RAW_TEXT] + list(columns)))
            table = table.select([c for c in wanted if c in table.column_names])
    else:
        raise DatasetError(f"{uri!r}: unknown shard type (expected .parquet or .tar)")
    table = canonicalize(table)
    return validate_table(table, where=loc.uri) if validate else table


def _open_input(loc: Location, random_access: bool = False) -> IO[bytes]:
    try:
        # Parquet needs seeks (footer first); tars are read as a forward-only stream.
        return loc.fs.open_input_file(loc.path) if random_access else loc.fs.open_input_stream(loc.path)
    except FileNotFoundError as exc:
        raise StorageError(f"shard {loc.uri!r} does not exist") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {loc.uri!r}: {exc}") from exc


def _sample_member(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """``(sample_id, ext)`` of a tar member that can belong to a sample, else None.

    Samples are grouped by the part of the file name before its first dot (the WebDataset
    convention), so ``000000000.jpg``/``.txt``/``.json`` form one sample.
    """
    if not member.isfile():
        return None
    dirname, base = posixpath.split(member.name)
    if _is_hidden(base) or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(dirname, stem), ext.lower()


def _is_sample(exts) -> bool:
    """A group of members is a sample if it has an image, a .txt or a .json (not e.g. a README)."""
    return bool(set(exts) & ({"txt", "json"} | set(IMAGE_EXTENSIONS)))


def webdataset_to_table(source: str | IO[bytes], where: str | None = None) -> pa.Table:
    """Convert one WebDataset tar (a path/URI or a binary stream) into a canonical table.

    Members are grouped by sample (:func:`_sample_member`). The key is the JSON's ``"key"`` if
    present, else that basename. A sample without an image keeps a null image (it becomes a
    reject at decode time rather than vanishing); a missing ``.txt`` falls back to the JSON's
    ``"caption"``, then to ``""``. Columns: key, image, raw_text, url.
    """
    if isinstance(source, str):
        loc = resolve(source)
        with _open_input(loc) as stream:
            return webdataset_to_table(stream, where=loc.uri)
    where = where or "<tar stream>"
    samples: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(fileobj=source, mode="r|*") as tar:  # streaming: works on S3 streams
            for member in tar:
                named = _sample_member(member)
                if named is None:
                    continue
                sample_id, ext = named
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if sample_id not in samples:
                    samples[sample_id] = {}
                    order.append(sample_id)
                samples[sample_id][ext] = data
    except tarfile.TarError as exc:
        raise DatasetSchemaError(f"{where}: not a readable tar file ({exc})") from exc
    keys, images, texts, urls = [], [], [], []
    for sample_id in order:
        parts = samples[sample_id]
        if not _is_sample(parts):
            continue  # unrelated file in the tar (e.g. a README), not a sample
        meta = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DatasetSchemaError(f"{where}: bad JSON for sample {sample_id!r}: {exc}") from exc
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if "txt" in parts:
            text = parts["txt"].decode("utf-8", errors="replace")
        else:
            text = meta.get("caption") or ""
        keys.append(str(meta.get("key") or posixpath.basename(sample_id)))
        images.append(image)
        texts.append(text)
        urls.append(meta.get("url"))
    return pa.table(
        {KEY: keys, IMAGE: images, RAW_TEXT: texts, "url": urls},
        schema=pa.schema([(KEY, pa.string()), (IMAGE, pa.binary()), (RAW_TEXT, pa.string()), ("url", pa.string())]),
    )


@dataclass(frozen=True)
class TarIndex:
    """Where each sample of a WebDataset tar starts, so row ranges can be read by byte range.

    ``offsets[i]`` is the byte offset of sample ``i``'s first member header; ``end`` is the
    offset just past the last member's data. ``splittable`` is False when a byte range would
    not reproduce the whole-tar grouping (a sample's members are not adjacent, or the tar has
    global PAX headers that apply to every member): such a tar is read whole.
    """

    offsets: list[int]
    end: int
    splittable: bool

    @property
    def rows(self) -> int:
        return len(self.offsets)

    def byte_range(self, start: int, stop: int) -> tuple[int, int]:
        """Bytes ``[a, b)`` holding exactly samples ``[start, stop)``."""
        return self.offsets[start], (self.offsets[stop] if stop < self.rows else self.end)


def index_webdataset(source: str | IO[bytes], where: str | None = None) -> TarIndex:
    """Scan a tar's headers (one streaming read) and index its samples (see :class:`TarIndex`)."""
    if isinstance(source, str):
        loc = resolve(source)
        with _open_input(loc) as stream:
            return index_webdataset(stream, where=loc.uri)
    first: dict[str, int] = {}
    exts: dict[str, set[str]] = {}
    adjacent, last, end = True, None, 0
    try:
        with tarfile.open(fileobj=source, mode="r|*") as tar:
            for member in tar:
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                named = _sample_member(member)
                if named is None:
                    continue
                sample_id, ext = named
                if sample_id not in first:
                    first[sample_id] = member.offset  # the first header of it (PAX/GNU long-name included)
                    exts[sample_id] = set()
                elif sample_id != last:
                    adjacent = False
                exts[sample_id].add(ext)
                last = sample_id
            global_headers = bool(tar.pax_headers)
    except tarfile.TarError as exc:
        raise DatasetSchemaError(f"{where or '<tar stream>'}: not a readable tar file ({exc})") from exc
    offsets = [off for sid, off in first.items() if _is_sample(exts[sid])]
    return TarIndex(offsets, end, adjacent and not global_headers)


def read_webdataset_range(uri: str, byte_start: int, byte_stop: int) -> pa.Table:
    """The samples stored in bytes ``[byte_start, byte_stop)`` of a tar (one ranged read)."""
    loc = resolve(uri)
    where = f"{loc.uri}[bytes {byte_start}:{byte_stop}]"
    with _open_input(loc, random_access=True) as f:
        try:
            chunk = f.read_at(byte_stop - byte_start, byte_start)
        except OSError as exc:
            raise StorageError(f"cannot read {where}: {exc}") from exc
    if len(chunk) != byte_stop - byte_start:
        raise DatasetSchemaError(f"{where}: the file is shorter than that; it changed since it was indexed")
    # The two zero blocks that end a tar archive, so the slice parses as a complete tar.
    table = webdataset_to_table(io.BytesIO(chunk + b"\0" * (2 * tarfile.BLOCKSIZE)), where=where)
    return validate_table(canonicalize(table), where=where)


def iter_shards(uri: str, columns: list[str] | None = None, format: str = "auto") -> Iterator[tuple[str, pa.Table]]:
    """Stream ``(shard_uri, table)`` one shard at a time (memory holds one shard)."""
    for shard in list_shards(uri, format=format):
        yield shard, read_shard(shard, columns=columns)


def iter_batches(uri: str, batch_size: int = 1024, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Stream tables of at most ``batch_size`` rows across all shards, in shard order."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for _, table in iter_shards(uri, columns=columns):
        for start in range(0, table.num_rows, batch_size):
            yield table.slice(start, batch_size)


def read_dataset(uri: str, columns: list[str] | None = None, limit: int | None = None) -> pa.Table:
    """Read a whole (small) dataset into one table; ``limit`` stops after that many rows."""
    tables, total = [], 0
    for _, table in iter_shards(uri, columns=columns):
        tables.append(table)
        total += table.num_rows
        if limit is not None and total >= limit:
            break
    if not tables:
        raise DatasetError(f"dataset {uri!r} is empty")
    out = pa.concat_tables(tables, promote_options="default")
    return out.slice(0, limit) if limit is not None else out


# ----------------------------------------------------------------------------- writing

def parquet_body(table: pa.Table) -> pa.Buffer:
    """``table`` serialised as one Parquet file in memory (what :func:`write_shard` commits)."""
    buf = pa.BufferOutputStream()
    # Small row groups keep streaming readers (Ray Data, iter_batches) memory-friendly.
    pq.write_table(table, buf, compression="zstd", row_group_size=4096)
    return buf.getvalue()


def write_shard(table: pa.Table, uri: str, validate: bool = True, require_caption: bool = False) -> str:
    """Write ``table`` as one Parquet file at ``uri`` atomically; returns ``uri``.

    The file is serialised in memory first, then committed in one step (:func:`write_bytes`):
    whatever interrupts the writer (an exception, ``SystemExit`` from Ray's SIGTERM, SIGKILL),
    the file is either complete at ``uri`` or absent.
    """
    if validate:
        validate_table(table, require_caption=require_caption, where=uri)
    if not uri.endswith(".parquet"):
        raise ValueError(f"shard URI must end with .parquet, got {uri!r}")
    return write_bytes(parquet_body(table), uri)


#: Marks temp files of :func:`write_bytes` (``.<name>.tmp-<host>-<pid>-<random>``).
TEMP_MARK = ".tmp-"


def write_bytes(data: bytes | pa.Buffer, uri: str) -> str:
    """Create or replace the file ``uri`` with ``data`` atomically; returns ``uri``.

    * S3: one ``PutObject`` request. The object only exists once S3 has received every byte,
      and a request cut short (killed process, dropped connection) leaves nothing. (A pyarrow
      output stream is not safe here: closing it -- which ``with`` does on any exception,
      ``SystemExit`` included -- completes the upload with whatever was written so far.)
    * Local: written to a hidden temp file beside it, then renamed into place. A writer killed
      with SIGKILL leaves only the temp file, which the caption job's lease holder removes.
    """
    loc = resolve(uri)
    parent, name = posixpath.split(loc.path)
    if loc.is_s3:
        bucket, _, key = loc.path.partition("/")
        body = data.to_pybytes() if isinstance(data, pa.Buffer) else bytes(data)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=body)
        except Exception as exc:  # botocore's ClientError / connection errors: not OSErrors
            if getattr(exc, "response", {}).get("Error", {}).get("Code") == "NoSuchBucket":
                raise StorageError(f"cannot write {uri!r}: bucket {bucket!r} does not exist") from exc
            raise StorageError(f"cannot write {uri!r}: {exc}") from exc
        return loc.uri
    ensure_dir(Location(loc.fs, parent, posixpath.split(loc.uri)[0]))
    tmp = posixpath.join(parent, f".{name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as out:
            out.write(memoryview(data))
        os.replace(tmp, loc.path)
    except OSError as exc:
        raise StorageError(f"cannot write {uri!r}: {exc}") from exc
    finally:  # also on SystemExit/KeyboardInterrupt: no half-written temp file stays behind
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return loc.uri


@functools.lru_cache(maxsize=1)
def _botocore_loader():
    import botocore.session

    return botocore.session.get_session().get_component("data_loader")


@functools.lru_cache(maxsize=4)
def _s3_client(endpoint: str | None, region: str, raw_timestamps: bool = False):
    import boto3
    import botocore.session
    from botocore.config import Config

    config = Config(
        region_name=region,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=max(CONNECT_TIMEOUT_S, 60.0),
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
    )
    session = botocore.session.get_session()
    session.register_component("data_loader", _botocore_loader())  # service models parsed once per process
    if raw_timestamps:  # timestamps stay strings: dateutil parsing is ~90% of a listing's CPU
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=lambda value: value)
    return boto3.session.Session(botocore_session=session).client("s3", endpoint_url=endpoint, config=config)


def s3_client(raw_timestamps: bool = False):
    """A boto3 S3 client configured like :func:`alip.data.storage.s3_filesystem` (same environment).

    pyarrow's S3 filesystem cannot send single-request uploads or conditional writes
    (``If-None-Match``/``If-Match``), which atomic commits and the caption job's lease need.
    Cached per endpoint/region; boto3 clients are thread-safe. ``raw_timestamps``: a client whose
    responses keep timestamps (LastModified, ...) as the strings S3 sent, for big listings (botocore
    parses each with dateutil: ~1 ms of CPU per listed object, a minute for 40,000 shards).
    """
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3_client(s3_endpoint(), region, raw_timestamps)


def shard_versions(uris: list[str]) -> dict[str, dict]:
    """What pins each shard's content: ``{uri: {"size": bytes, "etag": ...}}`` on S3 (one listing
    request per 1000 objects), ``{uri: {"size": bytes, "mtime_ns": ...}}`` locally."""
    out: dict[str, dict] = {}
    s3 = [u for u in uris if u.startswith("s3://")]
    for uri in uris:
        if not uri.startswith("s3://"):
            try:
                st = os.stat(resolve(uri).path)
            except OSError as exc:
                raise StorageError(f"cannot stat {uri!r}: {exc}") from exc
            out[uri] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    by_prefix: dict[tuple[str, str], set[str]] = {}
    for uri in s3:
        bucket, _, key = resolve(uri).path.partition("/")
        by_prefix.setdefault((bucket, posixpath.dirname(key)), set()).add(key)
    for (bucket, prefix), keys in by_prefix.items():
        found = {}
        try:
            pages = s3_client(raw_timestamps=True).get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=(prefix + "/") if prefix else "", Delimiter="/")
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"] in keys:
                        found[obj["Key"]] = {"size": obj["Size"], "etag": obj["ETag"].strip('"')}
        except Exception as exc:
            raise StorageError(f"cannot list s3://{bucket}/{prefix}: {exc}") from exc
        for key in keys:
            if key not in found:
                raise StorageError(f"shard s3://{bucket}/{key} does not exist")
            out[f"s3://{bucket}/{key}"] = found[key]
    return {uri: out[uri] for uri in uris}  # in the caller's (shard) order


def file_version(uri: str) -> dict | None:
    """What identifies one file's current content, without reading it: ``{"size", "etag"}`` on S3
    (one HEAD), ``{"size", "mtime_ns"}`` locally; None if there is no such file."""
    loc = resolve(uri)
    if loc.is_s3:
        bucket, _, key = loc.path.partition("/")
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # botocore's ClientError: 404 is "no such file", the rest is an error
            if str(getattr(exc, "response", {}).get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"cannot read the metadata of {uri!r}: {exc}") from exc
        return {"size": head["ContentLength"], "etag": head["ETag"].strip('"')}
    try:
        st = os.stat(loc.path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot stat {uri!r}: {exc}") from exc
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_json(obj, uri: str) -> str:
    """Write a small JSON document (manifests, summaries) to a local path or S3 URI, atomically."""
    return write_bytes(json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"), uri)


def read_json(uri: str):
    """Read a JSON document written by :func:`write_json`."""
    with _open_input(resolve(uri)) as stream:
        return json.loads(stream.read().decode("utf-8"))
