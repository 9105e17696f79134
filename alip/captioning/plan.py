"""Planning the caption job: work units, the output folder's layout, resume state. No Ray here.

Output folder layout (local or ``s3://``)::

    <output>/<unit>.parquet            captioned rows of one unit (key, image, raw_text, caption,
                                       captioner + passthrough columns) -- the unit's commit marker
    <output>/_rejects/<unit>.parquet   (key, reason) of that unit's undecodable images
    <output>/_caption_job.json         manifest: input, captioner id, unit size (pins the plan)
    <output>/_summary.json, _SUCCESS   written once every unit has its output

A unit is an input shard or a fixed row range of one, named deterministically from the shard
name, so every run of the same job plans the same units. Each file is written atomically
(temp name + rename locally, a single upload on S3) and the rejects file is written *before*
the data file, so "the data file exists" means "this unit is completely done" and a crash
leaves either nothing or a rejects file that the redo overwrites with identical content.
"""

from __future__ import annotations

import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from alip.captioning.config import CaptionJobConfig, CaptionJobError
from alip.data.dataset import (
    PARQUET,
    WEBDATASET,
    _from_img2dataset_parquet,
    list_shards,
    read_json,
    read_shard,
    write_json,
)
from alip.data.schema import DatasetSchemaError, canonicalize, validate_table
from alip.data.storage import Location, StorageError, file_type, join, resolve

REJECTS_DIR = "_rejects"
MANIFEST = "_caption_job.json"
SUMMARY = "_summary.json"
SUCCESS = "_SUCCESS"
_IO_THREADS = 16  # footer reads / listings are latency-bound on S3


@dataclass(frozen=True)
class WorkUnit:
    """Rows ``[start, stop)`` of ``shard`` (``stop=None``: the whole shard, e.g. a tar)."""

    name: str
    shard: str
    start: int = 0
    stop: int | None = None
    rows: int | None = None  # known up front for Parquet, None for WebDataset

    def to_item(self) -> dict:
        return asdict(self)

    @classmethod
    def from_item(cls, item: dict) -> "WorkUnit":
        return cls(**{k: item[k] for k in ("name", "shard", "start", "stop", "rows")})


def _stem(uri: str) -> str:
    base = posixpath.basename(uri)
    return base.rsplit(".", 1)[0]


def _parquet_footer(uri: str) -> pq.FileMetaData:
    loc = resolve(uri)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            return pq.ParquetFile(f).metadata
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


def plan_units(cfg: CaptionJobConfig) -> tuple[str, list[WorkUnit]]:
    """``(format, units)`` for the input dataset, validating every Parquet shard's columns."""
    try:
        shards = list_shards(cfg.input, format=cfg.input_format)
    except ValueError as exc:  # StorageError / DatasetError: missing folder, no shards, bad S3
        raise CaptionJobError(f"input {cfg.input!r}: {exc}") from exc
    fmt = WEBDATASET if shards[0].endswith(".tar") else PARQUET
    units: list[WorkUnit] = []
    if fmt == WEBDATASET:
        # A tar is a forward-only stream with no row index: it is one unit.
        units = [WorkUnit(_stem(s), s) for s in shards]
    else:
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            footers = list(pool.map(_parquet_footer, shards))
        for shard, meta in zip(shards, footers):
            check_parquet_schema(shard, meta.schema.to_arrow_schema())
            rows = meta.num_rows
            n = max(1, math.ceil(rows / cfg.rows_per_unit))
            if n == 1:
                units.append(WorkUnit(_stem(shard), shard, 0, rows, rows))
                continue
            for i in range(n):
                start, stop = i * cfg.rows_per_unit, min(rows, (i + 1) * cfg.rows_per_unit)
                units.append(WorkUnit(f"{_stem(shard)}-{i:05d}", shard, start, stop, stop - start))
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise CaptionJobError(
            f"input shards map to the same output name(s) {dup}; rename the input shards "
            f"or use a different --rows-per-unit"
        )
    return fmt, units


# ----------------------------------------------------------------------------- reading a unit

def read_unit(unit: WorkUnit) -> pa.Table:
    """The unit's rows as a canonical table; Parquet reads only the row groups it overlaps."""
    if unit.stop is None or unit.shard.endswith(".tar"):
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


# ----------------------------------------------------------------------------- output folder

class OutputLayout:
    """Paths of the output folder and the resume state found there."""

    def __init__(self, uri: str):
        self.root = resolve(uri)
        self.rejects = self.root.child(REJECTS_DIR)

    def data_uri(self, name: str) -> str:
        return join(self.root.uri, f"{name}.parquet")

    def rejects_uri(self, name: str) -> str:
        return join(self.rejects.uri, f"{name}.parquet")

    def _list(self, loc: Location) -> list[pafs.FileInfo]:
        if file_type(loc) == pafs.FileType.NotFound:
            return []
        try:
            return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
        except OSError as exc:
            raise StorageError(f"cannot list {loc.uri!r}: {exc}") from exc

    def done_units(self) -> set[str]:
        """Units whose data file exists: those are complete (see the module doc)."""
        return {
            i.base_name[: -len(".parquet")]
            for i in self._list(self.root)
            if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))
        }

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a killed writer left behind (local only; S3 uploads are all-or-nothing).

        Only call while no writer of this job runs (at start and after the pipeline finished).
        """
        if self.root.is_s3:
            return 0
        removed = 0
        for loc in (self.root, self.rejects):
            for info in self._list(loc):
                if info.type == pafs.FileType.File and info.base_name.startswith(".") and ".tmp-" in info.base_name:
                    loc.fs.delete_file(info.path)
                    removed += 1
        return removed

    def clear(self) -> int:
        """Delete everything this job writes (``--overwrite``); other files are left alone."""
        removed = 0
        for loc in (self.root, self.rejects):
            for info in self._list(loc):
                if info.type == pafs.FileType.File and (
                    info.base_name.endswith(".parquet") or info.base_name in (MANIFEST, SUMMARY, SUCCESS)
                    or ".tmp-" in info.base_name
                ):
                    loc.fs.delete_file(info.path)
                    removed += 1
        return removed

    def check_manifest(self, manifest: dict) -> bool:
        """Compare with the manifest of an earlier run; write it if there is none.

        Returns True when resuming an earlier run. Raises when the folder holds output of a
        different job (other input, captioner or unit size), which must not be mixed in.
        """
        uri = self.root.child(MANIFEST).uri
        existing = None
        if file_type(resolve(uri)) != pafs.FileType.NotFound:
            existing = read_json(uri)
        elif self.done_units():
            raise CaptionJobError(
                f"output {self.root.uri!r} already holds Parquet files but no {MANIFEST}: it was not "
                "written by the caption job. Choose an empty output folder."
            )
        if existing is not None:
            diff = {k: (existing.get(k), v) for k, v in manifest.items() if existing.get(k) != v}
            if diff:
                details = "; ".join(f"{k}: earlier {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise CaptionJobError(
                    f"output {self.root.uri!r} holds the output of a different caption job ({details}). "
                    "Use a new output folder, or --overwrite to discard the earlier output."
                )
            return True
        write_json(manifest, uri)
        return False

    def count_rows(self, names: list[str]) -> tuple[int, int]:
        """``(captioned, rejected)`` rows in the outputs of ``names`` (Parquet footers only)."""
        def rows(uri: str) -> int:
            loc = resolve(uri)
            if file_type(loc) == pafs.FileType.NotFound:
                return 0
            return _parquet_footer(uri).num_rows

        with ThreadPoolExecutor(_IO_THREADS) as pool:
            data = sum(pool.map(rows, [self.data_uri(n) for n in names]))
            rejected = sum(pool.map(rows, [self.rejects_uri(n) for n in names]))
        return data, rejected
