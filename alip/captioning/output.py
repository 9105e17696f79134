"""The caption job's output folder: its layout and the resume state found there. No Ray here.

Output folder layout (local or ``s3://``)::

    <output>/<unit>.parquet            captioned rows of one unit (key, image, raw_text, caption,
                                       captioner + passthrough columns) -- the unit's commit marker
    <output>/_rejects/<unit>.parquet   (key, reason) of that unit's rejected rows
    <output>/_caption_job.json         manifest: job identity + every input shard pinned (size,
                                       etag or mtime) with its units (see alip.captioning.manifest)
    <output>/_lease.json               the running job's lease (see alip.captioning.lease)
    <output>/_index/<run>-<n>.parquet  the commit index: rows and file sizes of committed units, so a
                                       resume need not read every footer (alip.captioning.commit_index)
    <output>/_summary.json, _SUCCESS   written once every unit has its output

A unit is a fixed row range of an input shard (Parquet or WebDataset tar), named
deterministically from the shard name, so every run of the same job plans the same units.
Each file is committed atomically (:func:`alip.data.dataset.write_bytes`: one PUT on S3, temp
name + rename locally) and the rejects file is committed *before* the data file, so a data
file means the unit is done. That is still verified on resume (:meth:`OutputLayout.resume_state`:
data + rejects rows == the unit's rows, from the commit index when it vouches for the listed file
size, else from the Parquet footers); a short or unreadable output is deleted and redone.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from alip.captioning.commit_index import INDEX_DIR, trusted_units
from alip.captioning.config import CaptionJobError
from alip.captioning.plan import WorkUnit
from alip.data.dataset import (IO_THREADS, TEMP_MARK, file_version, io_map, read_footer, read_json, s3_client,
                               write_bytes)
from alip.data.storage import Location, StorageError, ensure_s3_connections, file_type, join, resolve, resolve_all

REJECTS_DIR = "_rejects"
MANIFEST = "_caption_job.json"
SUMMARY = "_summary.json"
SUCCESS = "_SUCCESS"
_IO_THREADS = 16  # count_rows


@dataclass
class ResumeState:
    """What :meth:`OutputLayout.resume_state` found: units done (rows), units to redo (why), how
    many of the done ones the commit index vouched for, and the listings it made."""

    done: dict[str, tuple[int, int]]
    bad: dict[str, str]
    trusted: int
    data_sizes: dict[str, int | None]
    rejects_sizes: dict[str, int | None]


class OutputLayout:
    """Paths of the output folder and the resume state found there."""

    def __init__(self, uri: str):
        self.root = resolve(uri)
        self.rejects = self.root.child(REJECTS_DIR)
        self.index = self.root.child(INDEX_DIR)

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

    def verify_done(self, units: list[WorkUnit], entries: dict | None = None
                    ) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
        """Check the committed outputs of ``units``: ``(done, bad)`` (see :meth:`resume_state`)."""
        state = self.resume_state(units, entries)
        return state.done, state.bad

    def resume_state(self, units: list[WorkUnit], entries: dict | None = None) -> "ResumeState":
        """The committed outputs of ``units``, checked.

        ``done`` maps a unit to its ``(captioned, rejected)`` rows: the commit index
        (``entries``, alip/captioning/commit_index.py) vouches for it, or its data and rejects
        files are readable and together hold exactly the unit's rows (their footers). ``bad``
        maps a unit whose data file exists but fails that check to the reason; it must be redone
        (:meth:`discard`).
        """
        data_files = self._sizes_of(self.root, [u.name for u in units])
        committed = [u for u in units if u.name in data_files]
        done = trusted_units(committed, data_files, entries or {})
        trusted = len(done)
        todo = [u for u in committed if u.name not in done]
        # Listed after the data files: a rejects file is committed before its data file, so every
        # data file above has its rejects file in this listing (unless something deleted it).
        rejects_files = self._sizes_of(self.rejects, [u.name for u in todo]) if todo else {}
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

        bad = {}
        for name, rows, why in io_map(check, todo):
            if rows is None:
                bad[name] = why
            else:
                done[name] = rows
        return ResumeState(done, bad, trusted, data_files, rejects_files)

    def _sizes_of(self, loc: Location, names: list[str]) -> dict[str, int | None]:
        """``{unit name: size}`` of the committed ``<unit>.parquet`` files in ``loc`` among
        ``names``: one listing, or on S3 for many names, key ranges listed concurrently."""
        if loc.is_s3 and len(names) >= PARALLEL_LIST_FROM:
            return _s3_sizes_by_range(loc, names)
        wanted = set(names)
        return {n: size for n, size in self._parquet_sizes(loc).items() if n in wanted}

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
        for loc in (self.root, self.rejects, self.index):
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

    def manifest_version(self) -> dict | None:
        """Size + etag (S3) or mtime (local) of the manifest, None if there is none: one request
        tells whether another run rewrote it, without reading its ~80 MB at LAION scale again."""
        return file_version(self.root.child(MANIFEST).uri)

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


#: A resume of at least this many units lists an S3 output folder in key ranges of _KEYS_PER_RANGE,
#: IO_THREADS at a time: one listing is a page of 1000 keys after another (400 pages, ~80 s on the
#: bench's 50 ms S3, for LAION-400M's 400,000 committed units).
PARALLEL_LIST_FROM = 10_000
_KEYS_PER_RANGE = 5_000
_PAGE_KEYS = 1000  # S3's most per page


def _s3_sizes_by_range(loc: Location, names: list[str]) -> dict[str, int]:
    """``{name: size}`` of the ``<name>.parquet`` objects directly in the S3 folder ``loc``, for
    ``names``. The sorted expected keys are cut into ranges listed concurrently: a range starts
    after the key before it (StartAfter) and stops past its last expected key. The same answer as
    one listing of the folder, in a fraction of its sequential requests."""
    bucket, _, folder = loc.path.partition("/")
    prefix = folder.rstrip("/") + "/" if folder else ""
    keys = sorted(f"{prefix}{n}.parquet" for n in names)  # str order == S3's UTF-8 byte order
    wanted = set(keys)
    ranges = [(keys[i - 1] if i else None, keys[min(i + _KEYS_PER_RANGE, len(keys)) - 1])
              for i in range(0, len(keys), _KEYS_PER_RANGE)]
    client = s3_client(raw_timestamps=True)

    def list_range(bounds: tuple[str | None, str]) -> dict[str, int]:
        after, last = bounds
        found: dict[str, int] = {}
        kwargs = dict(Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=_PAGE_KEYS,
                      **({"StartAfter": after} if after else {}))
        try:
            while True:
                page = client.list_objects_v2(**kwargs)
                for obj in page.get("Contents", []):
                    if obj["Key"] > last:
                        return found
                    if obj["Key"] in wanted:
                        found[obj["Key"]] = obj["Size"]
                if not page.get("IsTruncated"):
                    return found
                kwargs["ContinuationToken"] = page["NextContinuationToken"]
        except Exception as exc:  # botocore's errors are not OSErrors
            raise StorageError(f"cannot list s3://{bucket}/{prefix}: {exc}") from exc

    out: dict[str, int] = {}
    for part in io_map(list_range, ranges):
        out.update(part)
    return {key[len(prefix):-len(".parquet")]: size for key, size in out.items()}


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
