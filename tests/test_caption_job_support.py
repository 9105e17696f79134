"""Helpers for the caption job tests (no tests here): a tiny random BLIP saved to disk, small
world datasets with corrupt images, and the exactly-once check."""

from __future__ import annotations

import collections
import io
import os
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from alip.captioning.output import REJECTS_DIR
from alip.data.dataset import list_shards, read_shard, write_shard
from alip.data.storage import resolve
from alip.data.world import COLOURS, POSITIONS, SHAPES, SIZES, world_table

# Generation settings that keep the tiny model fast and its captions non-empty.
FAST = dict(num_beams=1, max_new_tokens=6, min_new_tokens=2)


def make_tiny_blip(out_dir) -> str:
    """A tiny random BLIP (64 px) saved with its processor; returns the captioner spec."""
    import torch

    from alip.captioners.tiny import build_word_tokenizer, tiny_blip

    words = list(SHAPES) + list(COLOURS) + list(SIZES) + list(POSITIONS) + ["a", "on", "the", "at", "in"]
    torch.manual_seed(0)
    model, processor = tiny_blip(build_word_tokenizer(words), vision_hidden=32, vision_layers=1,
                                 text_hidden=32, text_layers=1, heads=2)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return f"hf:{out_dir}"


def corrupt(blob: bytes, kind: int) -> bytes | None:
    return [blob[: len(blob) // 2], b"<html>404 not found</html>", b"", None][kind % 4]


def write_world(uri: str, n: int, shards: int, n_corrupt: int = 0, seed: int = 0,
                row_group_size: int | None = None) -> tuple[list[str], list[str]]:
    """``n`` world rows in ``shards`` Parquet shards at ``uri``; every ``n // n_corrupt``-th image
    is broken in one of four ways. Returns ``(all_keys, corrupt_keys)``."""
    table = world_table(n, seed=seed)
    images = table.column("image").to_pylist()
    bad = set(range(0, n, max(1, n // n_corrupt))[:n_corrupt]) if n_corrupt else set()
    for j, i in enumerate(sorted(bad)):
        images[i] = corrupt(images[i], j)
    table = table.set_column(table.column_names.index("image"), "image", pa.array(images, pa.binary()))
    keys = table.column("key").to_pylist()
    per = -(-n // shards)
    for s in range(shards):
        part = table.slice(s * per, per)
        path = f"{uri}/world-{s:05d}.parquet"
        if row_group_size:  # several row groups per shard (tests the row-range reader)
            loc = resolve(path)
            loc.fs.create_dir(os.path.dirname(loc.path), recursive=True)
            with loc.fs.open_output_stream(loc.path) as f:
                pq.write_table(part, f, row_group_size=row_group_size)
        else:
            write_shard(part, path, validate=False)
    return keys, [keys[i] for i in sorted(bad)]


def write_webdataset(path: str, rows: list[dict]) -> None:
    """One img2dataset-style tar: <key>.png / .txt / .json per sample."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for r in rows:
            for ext, data in (("png", r["image"]), ("txt", r["raw_text"].encode()),
                              ("json", json.dumps({"key": r["key"], "url": f"http://x/{r['key']}"}).encode())):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{r['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def read_output(out: str) -> tuple[pa.Table, pa.Table]:
    """(all captioned rows, all rejects) of a caption job's output folder."""
    data = pa.concat_tables([read_shard(s) for s in list_shards(out, format="parquet")], promote_options="default")
    rejects = pa.concat_tables([_read_parquet(s) for s in list_shards(f"{out}/{REJECTS_DIR}", format="parquet")])
    return data, rejects


def _read_parquet(uri: str) -> pa.Table:
    loc = resolve(uri)
    with loc.fs.open_input_file(loc.path) as f:
        return pq.read_table(f)


def assert_exactly_once(out: str, keys: list[str], corrupt_keys: list[str], captioner: str | None = None):
    """Output keys == input keys minus rejects, no duplicates; rejects == the corrupt images."""
    data, rejects = read_output(out)
    got = data.column("key").to_pylist()
    dups = [k for k, c in collections.Counter(got).items() if c > 1]
    assert not dups, f"duplicated keys in output: {dups[:5]}"
    want = set(keys) - set(corrupt_keys)
    assert set(got) == want, (f"output keys != input keys - rejects: missing {sorted(want - set(got))[:5]}, "
                              f"unexpected {sorted(set(got) - want)[:5]}")
    rej = rejects.column("key").to_pylist()
    assert sorted(rej) == sorted(corrupt_keys), (f"rejects != the bad images: rejected but fine "
                                                 f"{sorted(set(rej) - set(corrupt_keys))[:5]}, bad but not "
                                                 f"rejected {sorted(set(corrupt_keys) - set(rej))[:5]}, "
                                                 f"{len(rej)} rejects for {len(corrupt_keys)} bad images")
    reasons = rejects.column("reason").to_pylist()
    assert all(reasons), f"rejects without a reason: {[k for k, r in zip(rej, reasons) if not r][:5]}"
    assert data.column("caption").null_count == 0, "null captions in the output"
    assert all(c.strip() for c in data.column("caption").to_pylist()), "empty captions in the output"
    if captioner is not None:
        assert set(data.column("captioner").to_pylist()) == {captioner}, set(data.column("captioner").to_pylist())
    return data, rejects


def read_call_log(log_dir) -> dict[int, list[str]]:
    """pid -> keys captioned by that process (ALIP_CAPTION_CALL_LOG files)."""
    out = {}
    if not os.path.isdir(log_dir):
        return out
    for name in os.listdir(log_dir):
        if name.endswith(".keys"):
            with open(os.path.join(log_dir, name)) as f:
                out[int(name[:-5])] = f.read().split()
    return out
