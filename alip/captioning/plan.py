"""Planning the caption job: work units and reading them. No Ray here.

A unit is a fixed row range of an input shard (Parquet or WebDataset tar), named
deterministically from the shard name, so every run of the same job plans the same units. The
output folder the units are committed to, and what a resume finds there: alip/captioning/output.py.
"""

from __future__ import annotations

import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from alip.captioning.config import CaptionJobConfig, CaptionJobError
from alip.data.dataset import (
    IO_THREADS,
    PARQUET,
    WEBDATASET,
    _from_img2dataset_parquet,
    index_webdataset,
    io_map,
    list_shard_sizes,
    list_shards,
    read_footer,
    read_shard,
    read_webdataset_range,
)
from alip.data.schema import DatasetSchemaError, canonicalize, validate_table
from alip.data.storage import Location, StorageError, ensure_s3_connections, resolve, resolve_all

_IO_THREADS = 16  # tar indexes (a streaming read of each tar)
#: Planning this many S3 Parquet shards or more lists their folder first: one request per 1000 files
#: gives every size, and a footer read with its size known is one request instead of two (a HEAD).
#: A few shards appended to a big input are cheaper with the HEADs.
LIST_SIZES_FROM = 16


_UNIT_FIELDS = ("name", "shard", "start", "stop", "rows", "byte_start", "byte_stop")


@dataclass(frozen=True, slots=True)
class WorkUnit:
    """Rows ``[start, stop)`` of ``shard`` (``stop=None``: the whole shard).

    Tar units that are a slice of their tar also carry the byte range holding those samples
    (``byte_start``/``byte_stop``, from the tar's index), read with one ranged request.
    (Slots: a LAION-size job plans ~800k units; ~50 bytes each instead of ~350.)
    """

    name: str
    shard: str
    start: int = 0
    stop: int | None = None
    rows: int | None = None  # known for every planned unit (Parquet footer, tar index)
    byte_start: int | None = None
    byte_stop: int | None = None

    def to_item(self) -> dict:
        # dataclasses.asdict's result, without its recursive copy (all fields are plain values):
        # a tenth of the time, which counts when a manifest pins 800k units.
        return {k: getattr(self, k) for k in _UNIT_FIELDS}

    @classmethod
    def from_item(cls, item: dict) -> "WorkUnit":
        return cls(**{k: item.get(k) for k in _UNIT_FIELDS})


def _stem(uri: str) -> str:
    base = posixpath.basename(uri)
    return base.rsplit(".", 1)[0]


def _parquet_footer(uri: str, loc: Location | None = None, size: int | None = None) -> pq.FileMetaData:
    loc = loc or resolve(uri)
    try:
        return read_footer(loc, size)
    except pa.ArrowInvalid as exc:
        raise CaptionJobError(f"{uri}: not a readable Parquet file ({exc})") from exc
    except OSError as exc:
        raise CaptionJobError(f"cannot read {uri!r}: {exc}") from exc


def check_parquet_schema(uri: str, schema: pa.Schema) -> None:
    """Fail now (not in a Ray task) if a shard lacks key/image/raw_text (img2dataset names accepted)."""
    empty = canonicalize(_from_img2dataset_parquet(schema.empty_table()))
    try:
        validate_table(empty, where=uri)
    except DatasetSchemaError as exc:
        raise CaptionJobError(f"input shard {exc}") from exc


def list_input(cfg: CaptionJobConfig) -> tuple[str, list[str]]:
    """``(format, shard URIs)`` of the input dataset."""
    try:
        shards = list_shards(cfg.input, format=cfg.input_format)
    except ValueError as exc:  # StorageError / DatasetError: missing folder, no shards, bad S3
        raise CaptionJobError(f"input {cfg.input!r}: {exc}") from exc
    return (WEBDATASET if shards[0].endswith(".tar") else PARQUET), shards


def _row_ranges(rows: int, rows_per_unit: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil(rows / rows_per_unit))
    return [(i * rows_per_unit, min(rows, (i + 1) * rows_per_unit)) for i in range(n)]


def _parquet_units(shard: str, rows_per_unit: int, loc: Location | None = None,
                   size: int | None = None) -> list[WorkUnit]:
    meta = _parquet_footer(shard, loc, size)
    check_parquet_schema(shard, meta.schema.to_arrow_schema())
    ranges = _row_ranges(meta.num_rows, rows_per_unit)
    if len(ranges) == 1:
        return [WorkUnit(_stem(shard), shard, 0, meta.num_rows, meta.num_rows)]
    return [WorkUnit(f"{_stem(shard)}-{i:05d}", shard, a, b, b - a) for i, (a, b) in enumerate(ranges)]


def _tar_units(shard: str, rows_per_unit: int) -> list[WorkUnit]:
    """A tar is split into row ranges like a Parquet shard (one streaming read of its headers
    finds where each sample starts), so a 10k-sample tar is not one multi-GB unit."""
    try:
        index = index_webdataset(shard)
    except ValueError as exc:  # StorageError / DatasetSchemaError naming the tar
        raise CaptionJobError(f"input shard {exc}") from exc
    ranges = _row_ranges(index.rows, rows_per_unit)
    if len(ranges) == 1 or not index.splittable:
        return [WorkUnit(_stem(shard), shard, 0, None, index.rows)]
    return [WorkUnit(f"{_stem(shard)}-{i:05d}", shard, a, b, b - a, *index.byte_range(a, b))
            for i, (a, b) in enumerate(ranges)]


def _listed_sizes(shards: list[str]) -> dict[str, int | None]:
    """Sizes of S3 shards from a listing of their folder(s): one request per 1000 files."""
    sizes: dict[str, int | None] = {}
    for parent in sorted({posixpath.dirname(s) for s in shards}):
        try:
            sizes.update(list_shard_sizes(parent, format=PARQUET))
        except ValueError:  # no sizes then: each footer is read the plain way (and fails there)
            pass
    return sizes


def plan_shards(fmt: str, shards: list[str], rows_per_unit: int) -> dict[str, list[WorkUnit]]:
    """The units of each shard (Parquet footers / tar indexes read in parallel).

    Parquet: IO_THREADS footers in flight over one filesystem; from LIST_SIZES_FROM S3 shards on,
    their folder is listed first, so that each footer is one request (sizes known), not two."""
    if fmt == WEBDATASET:  # a tar index is a streaming read of the whole tar: fewer at a time
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            return dict(zip(shards, pool.map(lambda s: _tar_units(s, rows_per_unit), shards)))
    listed = len(shards) >= LIST_SIZES_FROM and all(s.startswith("s3://") for s in shards)
    sizes = _listed_sizes(shards) if listed else {}
    ensure_s3_connections(IO_THREADS)
    locs = resolve_all(shards)
    plans = io_map(lambda i: _parquet_units(shards[i], rows_per_unit, locs[i], sizes.get(shards[i])),
                   range(len(shards)))
    return dict(zip(shards, plans))


def check_unique_names(units: list[WorkUnit]) -> None:
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise CaptionJobError(
            f"input shards map to the same output name(s) {dup}; rename the input shards "
            f"or use a different --rows-per-unit"
        )


def plan_units(cfg: CaptionJobConfig) -> tuple[str, list[WorkUnit]]:
    """``(format, units)`` for the whole input dataset, validating every Parquet shard's columns."""
    fmt, shards = list_input(cfg)
    planned = plan_shards(fmt, shards, cfg.rows_per_unit)
    units = [u for s in shards for u in planned[s]]
    check_unique_names(units)
    return fmt, units


# ----------------------------------------------------------------------------- reading a unit

def read_unit(unit: WorkUnit) -> pa.Table:
    """The unit's rows as a canonical table; Parquet reads only the row groups it overlaps, a
    tar slice only its byte range. A shard that no longer has the planned rows is an error."""
    if unit.shard.endswith(".tar"):
        if unit.byte_start is not None:
            table = read_webdataset_range(unit.shard, unit.byte_start, unit.byte_stop)
        else:
            table = read_shard(unit.shard)
        if unit.rows is not None and table.num_rows != unit.rows:
            raise DatasetSchemaError(
                f"{unit.shard}: unit {unit.name} should hold {unit.rows} samples but has {table.num_rows}; "
                "the shard changed since the job was planned"
            )
        return table
    if unit.stop is None:
        return read_shard(unit.shard)
    loc = resolve(unit.shard)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            groups, offset, first = [], 0, None
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset < unit.stop and offset + n > unit.start:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    except OSError as exc:
        raise StorageError(f"cannot read {unit.shard!r}: {exc}") from exc
    if first is not None:
        table = table.slice(unit.start - first, unit.stop - unit.start)
    if table.num_rows != unit.stop - unit.start:
        raise DatasetSchemaError(
            f"{unit.shard}: expected rows [{unit.start}, {unit.stop}) but read {table.num_rows}; "
            "the shard changed since the job was planned"
        )
    table = canonicalize(_from_img2dataset_parquet(table))
    return validate_table(table, where=f"{unit.shard}[{unit.start}:{unit.stop}]")
