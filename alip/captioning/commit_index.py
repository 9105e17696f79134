"""The caption job's commit index: what a resume needs to know about committed units, in a few files.

Without it a resume proves each committed unit done by reading the footers of its data and
rejects files: two requests per unit, 800,000 at LAION-400M's 400,000 units (818 s on a 50 ms S3,
bench/bench_scale.py). With it, the driver reads a few index files instead::

    <output>/_index/<run>-<seq>.parquet    one row per unit committed by run <run>:
                                           unit, captioned, rejected, data_bytes, rejects_bytes

Who writes it: the job's driver, which holds the output's lease (alip/captioning/lease.py), so
no two runs write index files at once. Units are recorded as their commits are reported, and a
part is written every ``flush_units`` units or ``flush_s`` seconds, and when the run ends. A run
that dies loses at most its last unflushed part: those units are verified by their footers on the
next resume, as every unit was before this index.

The trust rule on resume (:func:`trusted_units`): a unit is done, with the indexed row counts,
when its data file is listed at exactly the indexed size and the indexed counts add up to the
unit's planned rows. Why the size is enough: each output file is written whole in one step (one
PUT on S3, a rename locally) and never modified; a data file is committed after its rejects file
(alip/captioning/unit.py: write_unit), so a listed data file means both were committed. A file
of another size (a unit redone by a run that died before its index part was written, a file
replaced by hand) or a unit not in the index is verified by its footers as before. Several entries
for one unit (redone by a later run) are all kept: the one that matches the listed size counts.

Compaction: a resume that read more than ``COMPACT_PARTS`` parts writes one part with every
unit it trusted or verified, then deletes the parts it read, so the index stays a few files.
No Ray here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from alip.data.dataset import io_map, parquet_body, write_bytes
from alip.data.storage import Location, StorageError, file_type

INDEX_DIR = "_index"
SCHEMA = pa.schema([("unit", pa.string()), ("captioned", pa.int64()), ("rejected", pa.int64()),
                    ("data_bytes", pa.int64()), ("rejects_bytes", pa.int64())])
COMPACT_PARTS = 64
#: A part every FLUSH_UNITS units or FLUSH_S seconds: a run killed at any moment loses at most that
#: much of its index (those units cost their footer reads on the next resume, nothing else).
FLUSH_UNITS, FLUSH_S = 2000, 60.0
#: An index entry: (captioned rows, rejected rows, data file bytes, rejects file bytes).
Entry = tuple[int, int, int, int]


def _run_id() -> str:
    # Sorts by start time (parts are read in name order; nothing depends on it but a reader's eye).
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def _table(rows: list[dict]) -> pa.Table:
    return pa.table({name: [r[name] for r in rows] for name in SCHEMA.names}, schema=SCHEMA)


class CommitIndexWriter:
    """Collects this run's committed units (the rows ``finish_unit`` returns) and writes them as
    index parts. Only the lease holder uses it."""

    def __init__(self, index_dir: Location, flush_units: int = FLUSH_UNITS, flush_s: float = FLUSH_S,
                 clock: Callable[[], float] = time.monotonic):
        if flush_units < 1 or flush_s <= 0:
            raise ValueError(f"flush_units must be >= 1 and flush_s > 0, got {flush_units}, {flush_s}")
        self.dir = index_dir
        self.flush_units, self.flush_s, self.clock = flush_units, flush_s, clock
        self.run = _run_id()
        self.parts = 0
        self._pending: list[dict] = []
        self._last = clock()

    def add(self, row: dict) -> None:
        """A unit's commit report (needs unit, captioned, rejected, data_bytes, rejects_bytes)."""
        missing = [n for n in SCHEMA.names if n not in row]
        if missing:
            raise ValueError(f"commit report of {row.get('unit')!r} lacks {missing}")
        self._pending.append(row)
        if len(self._pending) >= self.flush_units or self.clock() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> str | None:
        """Write the units recorded since the last part as one part; returns its URI (None: nothing)."""
        self._last = self.clock()
        if not self._pending:
            return None
        uri = self.write_part(self._pending)
        self._pending = []
        return uri

    def write_part(self, rows: list[dict]) -> str:
        """Write ``rows`` (commit reports) as this run's next part; returns its URI."""
        uri = self.dir.child(f"{self.run}-{self.parts:06d}.parquet").uri
        write_bytes(parquet_body(_table(rows)), uri)
        self.parts += 1
        return uri


def _parts(index_dir: Location) -> list[pafs.FileInfo]:
    if file_type(index_dir) == pafs.FileType.NotFound:
        return []
    try:
        infos = index_dir.fs.get_file_info(pafs.FileSelector(index_dir.path, recursive=False))
    except OSError as exc:
        raise StorageError(f"cannot list {index_dir.uri!r}: {exc}") from exc
    return sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                   and not i.base_name.startswith(".")), key=lambda i: i.base_name)


def read_index(index_dir: Location, log: Callable[[str], None] | None = None) -> tuple[dict[str, list[Entry]], list[str]]:
    """``({unit: [entries]}, part paths read)``. An unreadable part is skipped with a message:
    its units are verified by their footers instead, which is always safe."""
    infos = _parts(index_dir)

    def read(info: pafs.FileInfo) -> pa.Table | None:
        try:
            with index_dir.fs.open_input_file(info.path) as f:
                table = pq.read_table(f)
            return table.select(SCHEMA.names).cast(SCHEMA)
        except (OSError, pa.ArrowException, KeyError) as exc:
            if log:
                log(f"[caption] commit index part {info.path} is unreadable, its units are verified by "
                    f"their footers ({str(exc).splitlines()[0][:200]})")
            return None

    entries: dict[str, list[Entry]] = {}
    for table in io_map(read, infos):
        if table is None:
            continue
        cols = [table.column(n).to_pylist() for n in SCHEMA.names]
        for unit, *entry in zip(*cols):
            entries.setdefault(unit, []).append(tuple(entry))
    return entries, [i.path for i in infos]


def trusted_units(units, data_sizes: dict[str, int | None], entries: dict[str, list[Entry]]) -> dict[str, tuple[int, int]]:
    """``{unit: (captioned, rejected)}`` of the committed ``units`` (WorkUnits) the index vouches
    for by the trust rule in the module doc; the others need their footers read."""
    out = {}
    for unit in units:
        size = data_sizes.get(unit.name)
        if size is None:
            continue
        for captioned, rejected, data_bytes, _ in entries.get(unit.name, ()):
            if data_bytes == size and (unit.rows is None or captioned + rejected == unit.rows):
                out[unit.name] = (captioned, rejected)
                break
    return out


def compact(index_dir: Location, read_paths: list[str], done: dict[str, tuple[int, int]],
            entries: dict[str, list[Entry]], data_sizes: dict[str, int | None],
            rejects_sizes: dict[str, int | None]) -> str | None:
    """Replace the parts in ``read_paths`` by one part holding every unit in ``done`` (trusted or
    verified now, with the sizes listed now). Written before the old parts are deleted: a crash
    in between leaves duplicates, which the trust rule tolerates. Returns the new part's URI."""
    if len(read_paths) <= COMPACT_PARTS:
        return None
    rows = []
    for name, (captioned, rejected) in done.items():
        rejects_bytes = rejects_sizes.get(name)
        if rejects_bytes is None:  # not listed (trusted without listing): keep what the index said
            rejects_bytes = next((e[3] for e in entries.get(name, ()) if e[2] == data_sizes.get(name)), -1)
        rows.append(dict(unit=name, captioned=captioned, rejected=rejected, data_bytes=data_sizes[name],
                         rejects_bytes=rejects_bytes))
    uri = CommitIndexWriter(index_dir).write_part(rows)
    list(io_map(index_dir.fs.delete_file, read_paths))
    return uri
