"""The pretraining data stream: which rows each rank reads, in which order, from which position.

A dataset is a list of read units (one Parquet row group each). Epoch e reads all units in a
permutation of its own, seeded by (seed, e); the epochs are concatenated into one stream of rows.
Optionally the stream is shuffled further inside windows of `shuffle_window` consecutive positions
(a seeded permutation per window: the bounded local shuffle, done in the plan rather than in a
per-worker buffer so that it does not depend on the worker count).

Global step s trains on stream positions [s * G, (s + 1) * G), G the global batch: a fixed set of
rows whatever the worker count. With W workers rank r takes a fixed contiguous slice of it,
positions [s G + off_r, s G + off_r + share_r) with `batch_shares(G, W)` (G // W rows, one more for
the first G % W ranks; off_r the sum of the shares before r). Gates and loss are computed over the
gathered global batch and are invariant to the order of its rows, so W workers train exactly what
one worker trains (tests/test_pretrain_job.py compares 1 and 2 workers through the real job).

Each rank reads only its own rows, in step order: its plan is a list of small items (a few steps of
its slice each, `rank_items`), and a read task turns an item into exactly those rows, decoded. The
data position is a number of global samples, `step * G`: a resumed run (any worker count) plans
from its checkpoint's step, so no row already trained on is read or decoded again, and the rows
decoded but never trained at a kill are only the items in flight (bounded by the job, see
alip.pretrain.job.READ_AHEAD_ITEMS).

Pure Python (+ numpy, pyarrow); no Ray, unit-tested directly.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alip.data.storage import resolve

# Environment variable naming a directory where every reader process appends the stream ranges it
# decoded (one "first_position count time" line per contiguous range): how the tests and
# bench_chaos count decoded rows.
READ_TRACE_ENV = "ALIP_READ_TRACE_DIR"
EPOCH_COLUMN = "epoch"  # alip.pretrain.data.EPOCH: part of each row's augmentation seed
# Rows a read item holds at least (whole steps of a rank's slice): one step of a real run (a
# rank's share is hundreds of rows), a few steps of a tiny one, so per-task overhead stays small
# next to decoding while an item in flight is little work to lose.
MIN_ITEM_ROWS = 16
# Row groups a reader process keeps after reading them: consecutive items of a rank usually fall in
# the same row group (or, with a shuffle window, the same few), which is then read once, not per item.
ROW_GROUP_CACHE = 4


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


# ----------------------------------------------------------------------------- who reads what

def batch_shares(global_batch_size: int, world_size: int) -> list[int]:
    """Rank r's share of the global batch: G // W, plus one row for the first G % W ranks (the rule
    of alip.training.split_global_batch, restated here to keep this module free of torch)."""
    if not 1 <= world_size <= global_batch_size:
        raise ValueError(f"cannot split a global batch of {global_batch_size} over {world_size} workers")
    base, extra = divmod(global_batch_size, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def rank_slice(step: int, global_batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """Stream positions [start, stop) that rank `rank` of `world_size` trains on at step `step`."""
    shares = batch_shares(global_batch_size, world_size)
    start = step * global_batch_size + sum(shares[:rank])
    return start, start + shares[rank]


def rank_positions(first_step: int, n_steps: int, global_batch_size: int, world_size: int,
                   rank: int) -> np.ndarray:
    """Stream positions of rank `rank` for steps [first_step, first_step + n_steps), step by step."""
    start, stop = rank_slice(first_step, global_batch_size, world_size, rank)
    steps = np.arange(n_steps, dtype=np.int64)[:, None] * global_batch_size
    return (steps + np.arange(start, stop, dtype=np.int64)[None, :]).reshape(-1)


def steps_per_item(share: int, min_rows: int = MIN_ITEM_ROWS) -> int:
    return max(1, -(-min_rows // share))


def rank_items(first_step: int, end_step: int, share: int, min_rows: int = MIN_ITEM_ROWS) -> list[dict]:
    """The read items of one rank from `first_step` (its checkpoint's step) to `end_step` (the end
    of the schedule): whole steps each, at least `min_rows` rows where the schedule allows. Nothing
    before the position and nothing past the last step is listed, so nothing of it is ever read."""
    per_item = steps_per_item(share, min_rows)
    return [{"first_step": s, "steps": min(per_item, end_step - s)} for s in range(first_step, end_step, per_item)]


def n_rank_items(first_step: int, end_step: int, share: int, min_rows: int = MIN_ITEM_ROWS) -> int:
    """len(rank_items(...)) without listing them (a days-long run has millions of steps)."""
    return max(0, -(-(end_step - first_step) // steps_per_item(share, min_rows)))


def shuffle_positions(positions: np.ndarray, seed: int, window: int) -> np.ndarray:
    """The source position each stream position holds after the windowed shuffle: window k
    (positions [k w, (k + 1) w)) is permuted by its own seeded permutation. window 0: no shuffle."""
    positions = np.asarray(positions, dtype=np.int64)
    if window <= 1:
        return positions
    out = np.empty_like(positions)
    windows, inside = np.divmod(positions, window)
    for k in np.unique(windows):
        perm = np.random.default_rng([int(seed), int(k), 0x5F1E]).permutation(window)
        sel = windows == k
        out[sel] = k * window + perm[inside[sel]]
    return out


def locate(units: list[ReadUnit], seed: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit index, row inside the unit, epoch) of each (unshuffled) stream position."""
    if not units:
        raise ValueError("no read units: the dataset is empty")
    positions = np.asarray(positions, dtype=np.int64)
    sizes = np.array([u.rows for u in units], dtype=np.int64)
    epochs, offsets = np.divmod(positions, int(sizes.sum()))
    unit_idx = np.empty_like(positions)
    rows = np.empty_like(positions)
    for e in np.unique(epochs):
        order = epoch_order(len(units), seed, int(e))
        ends = np.cumsum(sizes[order])
        sel = epochs == e
        k = np.searchsorted(ends, offsets[sel], side="right")
        unit_idx[sel] = order[k]
        rows[sel] = offsets[sel] - (ends[k] - sizes[order][k])
    return unit_idx, rows, epochs


def plan_reads(units: list[ReadUnit], seed: int, start_sample: int, n_samples: int) -> list[dict]:
    """The (unshuffled) stream rows [start_sample, start_sample + n_samples) as runs inside units:
    shard, row group, first and end row inside the group, stream index of the first row, epoch.
    A whole-stream view (one reader, no ranks): what the epoch permutation looks like."""
    positions = np.arange(int(start_sample), int(start_sample) + int(n_samples), dtype=np.int64)
    unit_idx, rows, epochs = locate(units, seed, positions)
    items: list[dict] = []
    for i, pos in enumerate(positions):
        u, r, e = int(unit_idx[i]), int(rows[i]), int(epochs[i])
        last = items[-1] if items else None
        if last and last["_unit"] == u and last["epoch"] == e and last["stop"] == r:
            last["stop"] = r + 1
        else:
            items.append({"_unit": u, "shard": units[u].shard, "row_group": units[u].row_group, "start": r,
                          "stop": r + 1, "stream_start": int(pos), "epoch": e})
    for it in items:
        del it["_unit"]
    return items


# ----------------------------------------------------------------------------- the reader

_row_groups: OrderedDict = OrderedDict()  # (shard, group, columns) -> pa.Table, per reader process


def _read_row_group(shard: str, group: int, columns: tuple[str, ...]) -> pa.Table:
    key = (shard, group, columns)
    if key in _row_groups:
        _row_groups.move_to_end(key)
        return _row_groups[key]
    loc = resolve(shard)
    with loc.fs.open_input_file(loc.path) as f:
        table = pq.ParquetFile(f).read_row_group(int(group), columns=list(columns))
    _row_groups[key] = table
    while len(_row_groups) > ROW_GROUP_CACHE:
        _row_groups.popitem(last=False)
    return table


def read_positions(units: list[ReadUnit], seed: int, positions: np.ndarray, columns: list[str],
                   shuffle_window: int = 0) -> pa.Table:
    """The rows at these stream positions, in this order, with their epoch (an `epoch` column: each
    row's augmentation is seeded by (seed, epoch, key), the same whoever decodes it). Each row
    group involved is read once (and kept for the next call, see ROW_GROUP_CACHE)."""
    positions = np.asarray(positions, dtype=np.int64)
    unit_idx, rows, epochs = locate(units, seed, shuffle_positions(positions, seed, shuffle_window))
    parts, order = [], []
    for u in np.unique(unit_idx):
        sel = np.flatnonzero(unit_idx == u)
        table = _read_row_group(units[u].shard, units[u].row_group, tuple(columns))
        parts.append(table.take(pa.array(rows[sel])))
        order.append(sel)
    table = pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
    table = table.append_column(EPOCH_COLUMN, pa.array(epochs, type=pa.int64()))
    trace_dir = os.environ.get(READ_TRACE_ENV)
    if trace_dir:
        _trace(trace_dir, positions)
    return table


def _trace(trace_dir: str, positions: np.ndarray) -> None:
    os.makedirs(trace_dir, exist_ok=True)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    now = time.time()
    with open(os.path.join(trace_dir, f"reader-{os.getpid()}.txt"), "a") as f:
        for run in np.split(positions, breaks):
            f.write(f"{int(run[0])} {len(run)} {now:.3f}\n")


def read_trace(trace_dir: str) -> list[tuple[int, int, float]]:
    """(first stream position, rows, unix time) of every contiguous range the readers decoded."""
    out = []
    if not os.path.isdir(trace_dir):
        return out
    for name in sorted(os.listdir(trace_dir)):
        with open(os.path.join(trace_dir, name)) as f:
            for line in f:
                a, b, t = line.split()
                out.append((int(a), int(b), float(t)))
    return out
