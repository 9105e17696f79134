import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alip.data.dataset import (
    DatasetError,
    detect_format,
    iter_batches,
    iter_shards,
    list_shards,
    read_dataset,
    read_shard,
    webdataset_to_table,
    write_shard,
)
from alip.data.images import decode_table
from alip.data.schema import DatasetSchemaError
from alip.data.storage import StorageError, resolve


def _jpeg(colour):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _table(keys):
    return pa.table({"key": keys, "image": [_jpeg((10, 20, 30))] * len(keys),
                     "raw_text": [f"text {k}" for k in keys], "extra": list(range(len(keys)))})


def test_parquet_round_trip_sorted_listing_and_hidden_files_ignored(tmp_path):
    root = tmp_path / "ds"
    write_shard(_table(["c", "d"]), str(root / "part-00001.parquet"))
    write_shard(_table(["a", "b"]), str(root / "part-00000.parquet"))
    (root / "_manifest.parquet").write_bytes(b"not a shard")
    (root / ".part-00002.parquet.tmp-1").write_bytes(b"half written")
    (root / "notes.txt").write_text("ignored")
    shards = list_shards(str(root))
    assert [os.path.basename(s) for s in shards] == ["part-00000.parquet", "part-00001.parquet"]
    assert detect_format(str(root)) == "parquet"
    back = read_shard(shards[1])
    assert back.equals(_table(["c", "d"]))  # extra columns pass through
    assert read_dataset(str(root)).column("key").to_pylist() == ["a", "b", "c", "d"]
    assert read_dataset(str(root), limit=3).num_rows == 3
    assert [t.num_rows for t in iter_batches(str(root), batch_size=3)] == [2, 2]
    assert [u for u, _ in iter_shards(str(root))] == shards
    assert list_shards(shards[0]) == [shards[0]]  # a single shard file is a dataset too


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "s.parquet"
    write_shard(_table(["a"]), str(target))
    write_shard(_table(["b"]), str(target))  # overwrite in place via rename
    assert sorted(os.listdir(tmp_path / "out")) == ["s.parquet"]
    assert pq.read_table(target).column("key").to_pylist() == ["b"]
    # invalid tables are refused before anything is written
    with pytest.raises(DatasetSchemaError, match="duplicate key"):
        write_shard(_table(["x", "x"]), str(tmp_path / "out" / "bad.parquet"))
    assert sorted(os.listdir(tmp_path / "out")) == ["s.parquet"]
    with pytest.raises(ValueError, match="must end with .parquet"):
        write_shard(_table(["a"]), str(tmp_path / "x.csv"))


def test_missing_and_empty_locations_have_clear_errors(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        list_shards(str(tmp_path / "nope"))
    with pytest.raises(StorageError, match="does not exist"):
        resolve(str(tmp_path / "nope"), must_exist=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no parquet shards \(\*.parquet\) found"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        list_shards("gs://bucket/x")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(DatasetSchemaError, match="not a readable Parquet file"):
        read_shard(str(tmp_path / "bad.parquet"))


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _img2dataset_webdataset(root):
    """The img2dataset webdataset layout: 00000.tar + 00000.parquet/_stats.json sidecars."""
    root.mkdir()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i, colour in enumerate(colours):
            stem = f"{i:09d}"
            _add(tar, f"{stem}.jpg", _jpeg(colour))
            _add(tar, f"{stem}.txt", f"alt text {i}".encode())
            _add(tar, f"{stem}.json", json.dumps({"key": stem, "url": f"http://x/{i}.jpg",
                                                   "caption": f"alt text {i}", "status": "success"}).encode())
        _add(tar, "000000003.json", json.dumps({"key": "000000003", "caption": "from json"}).encode())
    with tarfile.open(root / "00001.tar", "w") as tar:
        _add(tar, "000010000.png", _jpeg((9, 9, 9)))  # no txt/json: basename key, empty text
    pq.write_table(pa.table({"url": ["u"], "key": ["000000000"], "status": ["success"]}),
                   root / "00000.parquet")
    (root / "00000_stats.json").write_text("{}")


def test_webdataset_tars_from_img2dataset(tmp_path):
    root = tmp_path / "wds"
    _img2dataset_webdataset(root)
    shards = list_shards(str(root))
    assert [os.path.basename(s) for s in shards] == ["00000.tar", "00001.tar"]  # tars win over sidecars
    assert detect_format(str(root)) == "webdataset"
    assert [os.path.basename(s) for s in list_shards(str(root), format="parquet")] == ["00000.parquet"]
    t = read_shard(shards[0])
    assert t.column_names == ["key", "image", "raw_text", "url"]
    assert t.column("key").to_pylist() == ["000000000", "000000001", "000000002", "000000003"]
    assert t.column("raw_text").to_pylist() == ["alt text 0", "alt text 1", "alt text 2", "from json"]
    assert t.column("url").to_pylist()[:2] == ["http://x/0.jpg", "http://x/1.jpg"]
    kept, images, rejects = decode_table(t)
    assert [im.getpixel((8, 8))[1] > 200 for im in images] == [False, True, False]
    # the json-only sample has no image: it becomes a reject, it does not vanish
    assert rejects.to_pylist() == [{"key": "000000003", "reason": "missing image bytes (null)"}]
    t1 = read_dataset(str(root))
    assert t1.num_rows == 5 and t1.column("raw_text").to_pylist()[-1] == ""
    with open(shards[0], "rb") as f:  # the converter also takes a stream
        assert webdataset_to_table(f).equals(t)
    (tmp_path / "bad.tar").write_bytes(b"\x00" * 10 + b"not a tar")
    with pytest.raises(DatasetSchemaError, match="not a readable tar"):
        read_shard(str(tmp_path / "bad.tar"))


def test_img2dataset_parquet_layout_is_mapped(tmp_path):
    t = pa.table({"key": ["000", "001"], "jpg": [_jpeg((1, 1, 1)), None],
                  "caption": ["alt a", "alt b"], "url": ["u0", "u1"], "status": ["success", "failed_to_download"]})
    pq.write_table(t, tmp_path / "00000.parquet")
    back = read_shard(str(tmp_path / "00000.parquet"))
    assert {"key", "image", "raw_text", "url", "status"} <= set(back.column_names)
    assert back.column("raw_text").to_pylist() == ["alt a", "alt b"]
    assert "caption" not in back.column_names  # img2dataset's caption is the alt-text, not ours
    _, images, rejects = decode_table(back)
    assert len(images) == 1 and rejects.column("key").to_pylist() == ["001"]


def test_column_selection_reads_only_requested_columns(tmp_path):
    write_shard(_table(["a", "b"]), str(tmp_path / "s.parquet"))
    t = read_shard(str(tmp_path / "s.parquet"), columns=["extra"])
    assert t.column_names == ["key", "image", "raw_text", "extra"]
    t = read_shard(str(tmp_path / "s.parquet"), columns=[])
    assert t.column_names == ["key", "image", "raw_text"]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_index_byte_ranges_reproduce_the_whole_tar(tmp_path, fmt):
    """Row ranges of a tar read by byte range == the whole tar's rows, whatever the tar format
    (GNU long names and PAX headers come before the member they describe)."""
    from alip.data.dataset import index_webdataset, read_webdataset_range

    path = tmp_path / "00000.tar"
    deep = "d" * 60 + "/" + "e" * 60 if fmt != tarfile.USTAR_FORMAT else "dir"
    with tarfile.open(path, "w", format=fmt) as tar:
        _add(tar, "README", b"not a sample")
        for i in range(23):
            stem = f"{deep}/{i:09d}" + ("-ü" if fmt == tarfile.PAX_FORMAT else "")
            _add(tar, f"{stem}.jpg", _jpeg((i, 0, 0)))
            _add(tar, f"{stem}.txt", f"alt {i}".encode())
    whole = read_shard(str(path))
    index = index_webdataset(str(path))
    assert index.rows == whole.num_rows == 23 and index.splittable
    parts = [read_webdataset_range(str(path), *index.byte_range(a, min(a + 5, 23))) for a in range(0, 23, 5)]
    assert [p.num_rows for p in parts] == [5, 5, 5, 5, 3]
    assert pa.concat_tables(parts).equals(whole)
