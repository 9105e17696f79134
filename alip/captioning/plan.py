"""Planning the caption job: work units, the output folder's layout, resume state. No Ray here.

Output folder layout (local or ``s3://``)::

    <output>/<unit>.parquet            captioned rows of one unit (key, image, raw_text, caption,
                                       captioner + passthrough columns) -- the unit's commit marker
    <output>/_rejects/<unit>.parquet   (key, reason) of that unit's rejected rows
    <output>/_caption_job.json         manifest: job identity + every input shard pinned (size,
                                       etag or mtime) with its units (see alip.captioning.manifest)
    <output>/_lease.json               the running job's lease (see alip.captioning.lease)
    <output>/_summary.json, _SUCCESS   written once every unit has its output

A unit is a fixed row range of an input shard (Parquet or WebDataset tar), named
deterministically from the shard name, so every run of the same job plans the same units.
Each file is committed atomically (:func:`alip.data.dataset.write_bytes`: one PUT on S3, temp
name + rename locally) and the rejects file is committed *before* the data file, so a data
file means the unit is done. That is still verified on resume (:meth:`OutputLayout.verify_done`:
data + rejects rows == the unit's rows, read from the Parquet footers); a short or unreadable
output is deleted and redone, never trusted.
"""

from __future__ import annotations

import json
import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from alip.captioning.config import CaptionJobConfig, CaptionJobError
from alip.data.dataset import (
    IO_THREADS,
    PARQUET,
    TEMP_MARK,
    WEBDATASET,
    _from_img2dataset_parquet,
    index_webdataset,
    io_map,
    list_shard_sizes,
    list_shards,
    read_footer,
    read_json,
    read_shard,
    read_webdataset_range,
    write_bytes,
)
from alip.data.schema import DatasetSchemaError, canonicalize, validate_table
from alip.data.storage import Location, StorageError, ensure_s3_connections, file_type, join, resolve, resolve_all

REJECTS_DIR = "_rejects"
MANIFEST = "_caption_job.json"
SUMMARY = "_summary.json"
SUCCESS = "_SUCCESS"
_IO_THREADS = 16  # tar indexes (a streaming read of each tar) and count_rows
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
        """Units whose data file exists (committed last, so normally complete; see :meth:`verify_done`)."""
        return set(self._parquet_sizes(self.root))

    def verify_done(self, units: list[WorkUnit]) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
        """Check the committed outputs of ``units``: ``(done, bad)``.

        ``done`` maps a unit to its ``(captioned, rejected)`` rows: its data and rejects files
        are readable and together hold exactly the unit's rows. ``bad`` maps a unit whose data
        file exists but fails that check to the reason; it must be redone (:meth:`discard`).
        """
        data_files = self._parquet_sizes(self.root)
        todo = [u for u in units if u.name in data_files]
        # Listed after the data files: a rejects file is committed before its data file, so every
        # data file above has its rejects file in this listing (unless something deleted it).
        rejects_files = self._parquet_sizes(self.rejects) if todo else {}
        ensure_s3_connections(IO_THREADS)
        root, rejects = resolve_all([self.root.uri, self.rejects.uri])  # one client, sized for IO_THREADS

        def check(unit: WorkUnit) -> tuple[str, tuple[int, int] | None, str | None]:
            name = f"{unit.name}.parquet"
            data, why = _footer_rows(self.data_uri(unit.name), root.child(name), data_files[unit.name])
            if data is None:
                return unit.name, None, f"data file {why}"
            rejected, why = _footer_rows(self.rejects_uri(unit.name), rejects.child(name),
                                         rejects_files.get(unit.name))
            if rejected is None:
                return unit.name, None, f"rejects file {why}"
            if unit.rows is not None and data + rejected != unit.rows:
                return unit.name, None, f"{data} captioned + {rejected} rejected rows, the unit has {unit.rows}"
            return unit.name, (data, rejected), None

        done, bad = {}, {}
        for name, rows, why in io_map(check, todo):
            if rows is None:
                bad[name] = why
            else:
                done[name] = rows
        return done, bad

    def _parquet_sizes(self, loc: Location) -> dict[str, int | None]:
        """``{unit name: size}`` of the committed ``<unit>.parquet`` files in ``loc`` (one listing)."""
        return {
            i.base_name[: -len(".parquet")]: i.size
            for i in self._list(loc)
            if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))
        }

    def discard(self, names) -> None:
        """Delete the outputs of units that must be redone (data file first: it is the marker)."""
        for name in names:
            for uri in (self.data_uri(name), self.rejects_uri(name)):
                loc = resolve(uri)
                if file_type(loc) != pafs.FileType.NotFound:
                    loc.fs.delete_file(loc.path)

    def remove_stale_temp_files(self) -> int:
        """Delete temp files of local writers that were killed (S3 commits have none: one PUT).

        Only the holder of the output's lease calls this (see :mod:`alip.captioning.lease`):
        while it holds the lease no other run writes here, so every temp file is a leftover of
        a dead writer, not one being written by a concurrent run.
        """
        if self.root.is_s3:
            return 0
        removed = 0
        for loc in (self.root, self.rejects):
            for info in self._list(loc):
                if info.type == pafs.FileType.File and info.base_name.startswith(".") and TEMP_MARK in info.base_name:
                    loc.fs.delete_file(info.path)
                    removed += 1
        return removed

    def clear(self) -> int:
        """Delete everything this job writes (``--overwrite``); other files (and the lease) are left alone."""
        removed = 0
        for loc in (self.root, self.rejects):
            for info in self._list(loc):
                if info.type == pafs.FileType.File and (
                    info.base_name.endswith(".parquet") or info.base_name in (MANIFEST, SUMMARY, SUCCESS)
                    or TEMP_MARK in info.base_name
                ):
                    loc.fs.delete_file(info.path)
                    removed += 1
        return removed

    def read_manifest(self) -> dict | None:
        """The manifest of an earlier run, None for a fresh folder; a folder that holds Parquet
        files but no manifest was not written by the caption job and is refused."""
        uri = self.root.child(MANIFEST).uri
        if file_type(resolve(uri)) != pafs.FileType.NotFound:
            return read_json(uri)
        if self.done_units():
            raise CaptionJobError(
                f"output {self.root.uri!r} already holds Parquet files but no {MANIFEST}: it was not "
                "written by the caption job. Choose an empty output folder."
            )
        return None

    def write_manifest(self, manifest: dict) -> None:
        # Compact JSON: json's C encoder (indent=2 falls back to the pure-Python one), about 7x
        # faster and half the bytes. A 40k-shard job pins ~800k units (~80 MB) at every start.
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
        write_bytes(body, self.root.child(MANIFEST).uri)

    def check_manifest(self, manifest: dict) -> bool:
        """Compare ``manifest``'s fields with the earlier run's; write it if there is none.

        Returns True when resuming an earlier run. Raises when the folder holds output of a
        different job (other input, captioner or unit size), which must not be mixed in.
        """
        existing = self.read_manifest()
        if existing is not None:
            check_same_job(existing, manifest, self.root.uri)
            return True
        self.write_manifest(manifest)
        return False

    def count_rows(self, names: list[str]) -> tuple[int, int]:
        """``(captioned, rejected)`` rows in the outputs of ``names`` (Parquet footers only)."""
        def rows(uri: str) -> int:
            n, _ = _footer_rows(uri)
            return n or 0

        with ThreadPoolExecutor(_IO_THREADS) as pool:
            data = sum(pool.map(rows, [self.data_uri(n) for n in names]))
            rejected = sum(pool.map(rows, [self.rejects_uri(n) for n in names]))
        return data, rejected


def check_same_job(existing: dict, identity: dict, where: str) -> None:
    """Raise if the earlier manifest ``existing`` differs from ``identity`` in any of its fields."""
    diff = {k: (existing.get(k), v) for k, v in identity.items() if existing.get(k) != v}
    if diff:
        details = "; ".join(f"{k}: earlier {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise CaptionJobError(
            f"output {where!r} holds the output of a different caption job ({details}). "
            "Use a new output folder, or --overwrite to discard the earlier output."
        )


def _footer_rows(uri: str, loc: Location | None = None, size: int | None = None) -> tuple[int | None, str | None]:
    """``(rows, None)`` from a Parquet file's footer, or ``(None, why)`` if it is missing or unreadable.
    ``size`` (from a listing) saves a request on S3 (alip.data.dataset.read_footer)."""
    loc = loc or resolve(uri)
    try:
        return read_footer(loc, size).num_rows, None
    except FileNotFoundError:
        return None, "is missing"
    except (pa.ArrowInvalid, OSError) as exc:
        if file_type(loc) == pafs.FileType.NotFound:
            return None, "is missing"
        return None, f"is unreadable ({str(exc).splitlines()[0][:200]})"


def check_output_reachable(output: Location, nodes: list[dict]) -> None:
    """Refuse a local output folder that the cluster's nodes cannot all reach, before any work.

    ``nodes`` is ``ray.nodes()``. A local path names a different disk on every host, so with
    nodes on more than one host (told apart by IP address and hostname) each would commit its
    units to its own disk. Nodes of a simulated cluster on one machine share its disk: valid.
    """
    if output.is_s3:
        return
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    hosts = sorted({(n.get("NodeManagerAddress") or "?", n.get("NodeManagerHostname") or "?") for n in alive})
    ips = {ip for ip, _ in hosts}
    names = {name for _, name in hosts}
    if len(ips) > 1 or len(names) > 1:
        listed = ", ".join(f"{name} ({ip})" for ip, name in hosts[:5]) + (" ..." if len(hosts) > 5 else "")
        raise CaptionJobError(
            f"output {output.uri!r} is a local path, but the Ray cluster's nodes are on {len(hosts)} hosts "
            f"({listed}): each would write to its own disk. Write to shared storage (s3://bucket/prefix)."
        )
    if alive and not any((n.get("Resources") or {}).get(r, 0) > 0 for n in alive for r in ("CPU", "GPU")):
        # cluster.yaml's head has no CPUs: all work runs on worker nodes that the autoscaler
        # has yet to start, i.e. on other hosts.
        raise CaptionJobError(
            f"output {output.uri!r} is a local path, but no node of the Ray cluster can run work yet "
            "(an autoscaling head without CPUs?): the workers that will join are other hosts, each "
            "with its own disk. Write to shared storage (s3://bucket/prefix)."
        )
