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

import json
import posixpath
import tarfile
import uuid
from collections.abc import Iterator
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
from alip.data.storage import Location, StorageError, ensure_dir, file_type, join, resolve

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
    if format not in ("auto",) + FORMATS:
        raise ValueError(f"format must be 'auto', 'parquet' or 'webdataset', got {format!r}")
    loc = resolve(uri)
    kind = file_type(loc)
    if kind == pafs.FileType.NotFound:
        raise StorageError(f"dataset {uri!r} does not exist")
    if kind == pafs.FileType.File:
        fmt = _format_of(loc.path)
        if fmt is None or (format != "auto" and fmt != format):
            raise DatasetError(f"{uri!r} is not a {format if format != 'auto' else 'Parquet or .tar'} shard")
        return [loc.uri]
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
    except OSError as exc:
        raise StorageError(f"cannot list {uri!r}: {exc}") from exc
    by_format: dict[str, list[str]] = {PARQUET: [], WEBDATASET: []}
    for info in infos:
        if info.type != pafs.FileType.File or _is_hidden(info.base_name):
            continue
        fmt = _format_of(info.base_name)
        if fmt is not None:
            by_format[fmt].append(join(loc.uri, info.base_name))
    if format == "auto":
        format = WEBDATASET if by_format[WEBDATASET] else PARQUET
    shards = sorted(by_format[format])
    if not shards:
        raise DatasetError(
            f"no {format} shards (*.{'tar' if format == WEBDATASET else 'parquet'}) found in {uri!r}"
        )
    return shards


def detect_format(uri: str) -> str:
    """``"parquet"`` or ``"webdataset"`` for a dataset folder or shard."""
    return _format_of(list_shards(uri)[0])  # type: ignore[return-value]


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


def webdataset_to_table(source: str | IO[bytes], where: str | None = None) -> pa.Table:
    """Convert one WebDataset tar (a path/URI or a binary stream) into a canonical table.

    Members are grouped by sample: the part of the file name before its first dot (the
    WebDataset convention), so ``000000000.jpg``/``.txt``/``.json`` form one sample. The key is
    the JSON's ``"key"`` if present, else that basename. A sample without an image keeps a
    null image (it becomes a reject at decode time rather than vanishing); a missing ``.txt``
    falls back to the JSON's ``"caption"``, then to ``""``. Columns: key, image, raw_text, url.
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
                if not member.isfile():
                    continue
                dirname, base = posixpath.split(member.name)
                if _is_hidden(base) or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                sample_id = posixpath.join(dirname, stem)
                ext = ext.lower()
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
        meta = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DatasetSchemaError(f"{where}: bad JSON for sample {sample_id!r}: {exc}") from exc
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None and not ({"txt", "json"} & parts.keys()):
            continue  # unrelated file in the tar (e.g. a README), not a sample
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

def write_shard(table: pa.Table, uri: str, validate: bool = True, require_caption: bool = False) -> str:
    """Write ``table`` as one Parquet file at ``uri`` atomically; returns ``uri``.

    Local files are written under a hidden temporary name and renamed into place, so readers
    never see half a shard. On S3 an object only appears once its (single or multipart)
    upload completes, which is atomic by itself.
    """
    if validate:
        validate_table(table, require_caption=require_caption, where=uri)
    if not uri.endswith(".parquet"):
        raise ValueError(f"shard URI must end with .parquet, got {uri!r}")
    loc = resolve(uri)
    parent, name = posixpath.split(loc.path)
    ensure_dir(Location(loc.fs, parent, posixpath.split(loc.uri)[0]))
    # Small row groups keep streaming readers (Ray Data, iter_batches) memory-friendly.
    kwargs = dict(compression="zstd", row_group_size=4096)
    try:
        if loc.is_s3:
            with loc.fs.open_output_stream(loc.path) as out:
                pq.write_table(table, out, **kwargs)
        else:
            tmp = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
            try:
                with loc.fs.open_output_stream(tmp) as out:
                    pq.write_table(table, out, **kwargs)
                loc.fs.move(tmp, loc.path)
            finally:
                if loc.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                    loc.fs.delete_file(tmp)
    except OSError as exc:
        raise StorageError(f"cannot write {uri!r}: {exc}") from exc
    return loc.uri


def write_json(obj, uri: str) -> str:
    """Write a small JSON document (manifests, summaries) to a local path or S3 URI."""
    loc = resolve(uri)
    parent = posixpath.split(loc.path)[0]
    ensure_dir(Location(loc.fs, parent, posixpath.split(loc.uri)[0]))
    with loc.fs.open_output_stream(loc.path) as out:
        out.write(json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))
    return loc.uri


def read_json(uri: str):
    """Read a JSON document written by :func:`write_json`."""
    with _open_input(resolve(uri)) as stream:
        return json.loads(stream.read().decode("utf-8"))
