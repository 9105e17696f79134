import io
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pyarrow as pa
import pytest
from PIL import Image

from alip.data.images import (
    ImageDecodeError,
    decode_batch,
    decode_image,
    decode_table,
    write_rejects,
)


def _encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_with_header_size(width, height):
    png = bytearray(_encode(Image.new("1", (8, 8))))
    # IHDR chunk: 8-byte signature, 4-byte length, b"IHDR", width, height, ..., CRC over type+data
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_decode_formats_to_rgb():
    rgb = Image.new("RGB", (20, 10), (200, 10, 10))
    for fmt in ("PNG", "JPEG", "WEBP"):
        out = decode_image(_encode(rgb, fmt))
        assert out.mode == "RGB" and out.size == (20, 10)
        assert abs(int(np.asarray(out)[5, 5, 0]) - 200) < 10
    gray = decode_image(_encode(Image.new("L", (4, 4), 77)))
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [77, 77, 77]


def test_transparency_is_composited_on_white_not_black():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(_encode(rgba)))[0, 0].tolist() == [255, 255, 255]


def test_corrupt_truncated_empty_and_null_are_rejected_with_reasons():
    good = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageDecodeError, match="unrecognised image format"):
        decode_image(b"<html>404 not found</html>")
    with pytest.raises(ImageDecodeError, match="corrupt image"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(ImageDecodeError, match="empty image bytes"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="missing image bytes"):
        decode_image(None)


def test_decompression_bomb_is_rejected_before_decoding():
    # A tiny file whose header claims 12000x12000 = 144M pixels (432 MB as RGB): the limit must
    # be enforced from the header alone, before any pixel is decoded.
    bomb = _png_with_header_size(12000, 12000)
    assert len(bomb) < 1000
    with pytest.raises(ImageDecodeError, match=r"image too large: 12000x12000.*decompression bomb"):
        decode_image(bomb)
    # Beyond 2x PIL's own limit PIL refuses at open(); that is a reject too, not a crash.
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(_png_with_header_size(20000, 20000))
    small = _encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageDecodeError, match="max_pixels=5000"):
        decode_image(small, max_pixels=5000)


def test_decode_batch_keeps_indices_and_never_drops_silently():
    good = _encode(Image.new("RGB", (8, 8), (0, 255, 0)))
    keys = ["a", "b", "c", "d"]
    blobs = [good, b"garbage", None, good]
    images, rejects = decode_batch(keys, blobs)
    assert [i for i, _ in images] == [0, 3]
    assert [k for k, _ in rejects] == ["b", "c"]
    assert len(images) + len(rejects) == len(keys)
    assert "unrecognised" in rejects[0][1] and "missing" in rejects[1][1]
    with pytest.raises(ValueError, match="3 keys but 2 images"):
        decode_batch(["a", "b", "c"], [good, good])


def test_decode_table_and_write_rejects(tmp_path):
    good = _encode(Image.new("RGB", (8, 8)))
    table = pa.table({"key": ["k1", "k2", "k3"], "image": [good, b"\xff\xd8broken", good],
                      "raw_text": ["x", "y", "z"], "extra": [1, 2, 3]})
    kept, images, rejects = decode_table(table)
    assert kept.column("key").to_pylist() == ["k1", "k3"] and kept.column("extra").to_pylist() == [1, 3]
    assert len(images) == 2 and rejects.column_names == ["key", "reason"]
    assert rejects.column("key").to_pylist() == ["k2"]
    out = tmp_path / "rejects" / "rejects-00000.parquet"
    assert write_rejects(rejects, str(out)) == 1
    back = pq.read_table(out)
    assert back.to_pylist() == rejects.to_pylist()
    assert write_rejects([], str(tmp_path / "none.parquet")) == 0  # "no rejects" is recorded too
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
