"""The pretraining data stream: which rows a run reads, in which order, from which position.

A dataset is a list of read units (one Parquet row group each). Epoch e reads all units in a
permutation of its own, seeded by (seed, e); the epochs are concatenated into one stream of rows,
and global step s trains on stream rows [s * G, (s + 1) * G) where G is the global batch. So the
data position is a number of global samples, `step * G`, independent of the worker count, and a
resumed run reads from the first unconsumed unit (from the first unconsumed row of it): no row that
was already trained on is decoded again, except the rows that were in flight when the run died.

Which rank trains which rows: the decoded stream comes in blocks and Ray Train's split deals each
block to a rank (the one with the fewest rows so far), so the global batch SIZE is exact at every
worker count but its rows depend on how blocks were dealt: the rows consumed at step s are the
stream prefix s G give or take the blocks each rank holds, and a resume re-reads from row s G, so
those rows may be trained once more or not at all in that epoch. (Whether global batches can be
made identical across worker counts is open: tests/test_pretrain_job.py's 1-vs-2-worker test
through Ray Data is an xfail.)

Pure Python (+ pyarrow metadata); no Ray, unit-tested directly.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alip.data.storage import resolve

# Rows per block the reader hands to the decode stage: small enough that "blocks in flight" stays
# a small number of rows, large enough that per-block overhead is negligible.
READ_BLOCK_ROWS = 256
# Environment variable naming a directory where every reader process appends the stream ranges it
# read (one "first_row count" line per block): how the tests and bench_chaos count decoded rows.
READ_TRACE_ENV = "ALIP_READ_TRACE_DIR"
EPOCH_COLUMN = "epoch"  # alip.pretrain.data.EPOCH: part of each row's augmentation seed


@dataclass(frozen=True)
class ReadUnit:
    """One Parquet row group of one shard."""

    shard: str
    row_group: int
    rows: int


@dataclass(frozen=True)
class StreamPosition:
    """Where a run stands: steps taken and global samples consumed (= step * global batch)."""

    step: int
    samples: int
    global_batch_size: int

    def epoch(self, rows_per_epoch: int) -> int:
        return self.samples // rows_per_epoch

    def to_dict(self) -> dict:
        return asdict(self)


def units_of_shard(shard: str, meta: pq.FileMetaData) -> list[ReadUnit]:
    return [ReadUnit(shard, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
            if meta.row_group(i).num_rows > 0]


def total_steps(rows_per_epoch: int, epochs: int, global_batch_size: int, max_steps: int | None) -> int:
    """Steps of the whole run: epochs x rows / G (the stream crosses epoch boundaries, so no rows
    are dropped per epoch), or --max-steps. Independent of the worker count by construction."""
    return max_steps if max_steps else (epochs * rows_per_epoch) // global_batch_size


def epoch_order(n_units: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the units that epoch `epoch` reads them in (a fresh one every epoch)."""
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(n_units)


def plan_reads(units: list[ReadUnit], seed: int, start_sample: int, n_samples: int) -> list[dict]:
    """The read items covering stream rows [start_sample, start_sample + n_samples).

    Each item is one unit (or its tail, for the unit the position falls into): shard, row group,
    first and end row inside the group, the stream index of its first row, and its epoch. Units
    before the position are not listed at all, so a resumed run never opens them."""
    if not units:
        raise ValueError("no read units: the dataset is empty")
    rows_per_epoch = sum(u.rows for u in units)
    epoch, offset = divmod(int(start_sample), rows_per_epoch)
    items: list[dict] = []
    stream_pos, remaining = int(start_sample), int(n_samples)
    while remaining > 0:
        for idx in epoch_order(len(units), seed, epoch):
            unit = units[idx]
            if offset >= unit.rows:
                offset -= unit.rows
                continue
            start, offset = offset, 0
            items.append({"shard": unit.shard, "row_group": unit.row_group, "start": start,
                          "stop": unit.rows, "stream_start": stream_pos, "epoch": epoch})
            stream_pos += unit.rows - start
            remaining -= unit.rows - start
            if remaining <= 0:
                break
        epoch += 1
    return items


def read_margin(max_workers: int, global_batch_size: int) -> int:
    """Extra stream rows planned beyond the last step. Ray Train splits the stream equally over
    the ranks while ranks may take unequal shares of a global batch (G // W or G // W + 1 rows), so
    the rank with the larger share needs up to one row per step more than an equal split gives it;
    that is covered by planning W extra rows per step (see `rows_to_plan`); this margin adds one
    read block per rank for the end of the stream. Rows planned but never reached are never read."""
    return max_workers * READ_BLOCK_ROWS + global_batch_size


def rows_to_plan(steps_left: int, global_batch_size: int, max_workers: int) -> int:
    return steps_left * (global_batch_size + max_workers) + read_margin(max_workers, global_batch_size)


def read_items(batch: dict, columns: list[str], block_rows: int = READ_BLOCK_ROWS) -> Iterator[pa.Table]:
    """Ray Data map_batches generator: read the listed units' row groups and yield their rows
    from `start` on, in blocks of at most `block_rows` (what the decode stage works on)."""
    trace_dir = os.environ.get(READ_TRACE_ENV)
    epochs = batch.get("epoch", np.zeros(len(batch["shard"]), dtype=np.int64))
    for shard, group, start, stop, first, epoch in zip(batch["shard"], batch["row_group"], batch["start"],
                                                        batch["stop"], batch["stream_start"], epochs):
        loc = resolve(str(shard))
        with loc.fs.open_input_file(loc.path) as f:
            table = pq.ParquetFile(f).read_row_group(int(group), columns=columns)
        table = table.slice(int(start), int(stop) - int(start))
        for off in range(0, table.num_rows, block_rows):
            # The epoch travels with the rows: each row's augmentation is seeded by (seed, epoch, key),
            # so it is the same whichever worker count or process decodes it.
            part = table.slice(off, block_rows)
            part = part.append_column(EPOCH_COLUMN, pa.array(np.full(part.num_rows, int(epoch), dtype=np.int64)))
            if trace_dir:
                _trace(trace_dir, int(first) + off, part.num_rows)
            yield part


def _trace(trace_dir: str, first: int, count: int) -> None:
    os.makedirs(trace_dir, exist_ok=True)
    with open(os.path.join(trace_dir, f"reader-{os.getpid()}.txt"), "a") as f:
        f.write(f"{first} {count} {time.time():.3f}\n")


def read_trace(trace_dir: str) -> list[tuple[int, int, float]]:
    """(first stream row, rows, unix time) of every block the readers handed to decoding."""
    out = []
    if not os.path.isdir(trace_dir):
        return out
    for name in sorted(os.listdir(trace_dir)):
        with open(os.path.join(trace_dir, name)) as f:
            for line in f:
                a, b, t = line.split()
                out.append((int(a), int(b), float(t)))
    return out


# ----------------------------------------------------------------------------- resume position

def latest_registered_position(run_uri: str, position_file: str) -> dict | None:
    """The position.json of the checkpoint Ray Train will restore (the latest one its checkpoint
    manager registered), read from the run's storage; None for a fresh run. Read by the dataset
    factory when a worker group starts, so the stream begins exactly where that checkpoint ends."""
    loc = resolve(run_uri)
    snap = loc.child("checkpoint_manager_snapshot.json")
    try:
        with loc.fs.open_input_stream(snap.path) as f:
            state = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, OSError):
        return None
    latest = state.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    if not name:
        return None
    try:
        with loc.fs.open_input_stream(loc.child(name).child(position_file).path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, OSError):
        step = (latest.get("metrics") or {}).get("step")
        return {"step": int(step)} if step is not None else None
