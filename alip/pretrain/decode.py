"""The read task of a training rank: its rows of a few steps, read, decoded, augmented, tokenised.

A module of its own so that a read task's process imports only what decoding needs (pyarrow, PIL,
torch for the resize kernel, open_clip's tokenizer module alone): not alip.pretrain.job, the
model or the open_clip package. Ray runs these tasks in fresh worker processes after every group
restart, and on this 2-core box `import open_clip` alone takes ~5 s of the restart's first batch
(bench/bench_chaos.py, "first batch + step"); torch takes ~1.7 s.
"""
from __future__ import annotations

import functools

import numpy as np

from alip.data.schema import CAPTION, IMAGE, KEY, RAW_TEXT
from alip.pretrain.stream import ReadUnit, batch_shares, rank_positions, read_positions, steps_per_item

READ_COLUMNS = [KEY, IMAGE, RAW_TEXT, CAPTION]


@functools.lru_cache(maxsize=4)
def _preprocessor(image_size: int, context_length: int, seed: int):
    from alip.pretrain.data import TrainPreprocessor

    return TrainPreprocessor(image_size, context_length, train=True, seed=seed)


def read_and_decode(item: int, first_step: int, end_step: int, units: list[ReadUnit], seed: int,
                    global_batch_size: int, world_size: int, rank: int, shuffle_window: int, image_size: int,
                    context_length: int) -> dict:
    """One read item of rank `rank` (its index in `rank_items(first_step, end_step, share)`): the
    rank's rows of the item's steps, read, decoded, augmented and tokenised, exactly `share` rows
    per step in step order (a Ray task of alip.pretrain.rank_reader). A row that cannot be decoded
    is skipped with a warning (alip.pretrain.data) and its step is filled up by repeating that
    step's other rows, so every step still has its share: the ranks' batch shares are fixed by the
    config (the loss gathers them without a size exchange)."""
    share = batch_shares(global_batch_size, world_size)[rank]
    per_item = steps_per_item(share)
    first = first_step + int(item) * per_item
    n_steps = min(per_item, end_step - first)
    positions = rank_positions(first, n_steps, global_batch_size, world_size, rank)
    table = read_positions(units, seed, positions, READ_COLUMNS, shuffle_window)
    prep = _preprocessor(image_size, context_length, seed)
    out: dict[str, list] = {}
    for i in range(n_steps):
        rows = table.slice(i * share, share)
        step = prep({c: rows.column(c).to_numpy(zero_copy_only=False) for c in rows.column_names})
        got = len(step["image"])
        if got == 0:
            raise RuntimeError(f"no row of rank {rank}'s share of step {first + i} could be decoded")
        if got < share:  # deterministic fill: the same rows whoever decodes them
            step = {k: v[np.arange(share) % got] for k, v in step.items()}
        for k, v in step.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}
