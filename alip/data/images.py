"""Decoding encoded image bytes into RGB PIL images, with rejects instead of crashes.

Web data always contains broken files: truncated JPEGs, HTML error pages saved as .jpg,
decompression bombs. Nothing is silently dropped: every image that cannot be used becomes a
``(key, reason)`` row in a rejects table that the caller writes next to its output.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence

import pyarrow as pa
from PIL import Image, ImageOps

from alip.data.dataset import write_shard
from alip.data.schema import IMAGE, KEY, REJECTS_SCHEMA

#: Default pixel limit (width * height). Larger images are refused before their pixels are
#: decoded, which is what protects workers from decompression bombs.
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageDecodeError(ValueError):
    """An image could not be decoded; ``reason`` is a short, table-friendly explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    # Composite transparency over white: a plain convert("RGB") turns transparent pixels black,
    # which changes what the image shows.
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


@contextlib.contextmanager
def open_checked(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    """Open encoded bytes lazily (header only) with the checks every decode path needs, and turn
    whatever the decoder raises inside the ``with`` block into :class:`ImageDecodeError`.

    Refuses missing/empty bytes, unknown formats, non-positive sizes and images over
    ``max_pixels`` pixels before a single pixel is decoded (decompression bombs). The caller
    decodes inside the block (``img.load()``, ``draft`` ...), so a corrupt or truncated body is
    mapped to the same table-friendly reasons whichever path decodes it."""
    if data is None:
        raise ImageDecodeError("missing image bytes (null)")
    if len(data) == 0:
        raise ImageDecodeError("empty image bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between MAX_IMAGE_PIXELS and 2x; we enforce our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"invalid image size {width}x{height}")
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width}x{height} = {width * height} pixels > max_pixels={max_pixels} "
                    "(possible decompression bomb)"
                )
            yield img
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"unrecognised image format (first bytes {bytes(data[:8])!r})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt image: {type(exc).__name__}: {exc}") from exc
    except MemoryError:
        raise ImageDecodeError("corrupt image: MemoryError while decoding (claims an absurd size)") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise anything (struct.error, IndexError, ...)
        # Web data is adversarial: whatever a plugin raises on one image must reject that image,
        # never the shard (an uncaught error would fail the job on every rerun).
        raise ImageDecodeError(f"undecodable image: {type(exc).__name__}: {exc}") from exc


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded bytes into an RGB image (EXIF orientation applied).

    Raises :class:`ImageDecodeError` for missing/empty bytes, unknown or corrupt formats,
    truncated files and images over ``max_pixels`` pixels.
    """
    with open_checked(data, max_pixels) as img:
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)


def decode_batch(
    keys: Sequence[str],
    blobs: Sequence[bytes | None],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[tuple[int, Image.Image]], list[tuple[str, str]]]:
    """Decode many images.

    Returns ``(images, rejects)``: ``images`` is a list of ``(row_index, RGB image)`` for the
    rows that decoded (so callers can ``table.take`` the kept rows), ``rejects`` a list of
    ``(key, reason)`` for the others. ``len(images) + len(rejects) == len(keys)`` always.
    """
    if len(keys) != len(blobs):
        raise ValueError(f"decode_batch: {len(keys)} keys but {len(blobs)} images")
    images: list[tuple[int, Image.Image]] = []
    rejects: list[tuple[str, str]] = []
    for i, (key, blob) in enumerate(zip(keys, blobs)):
        try:
            images.append((i, decode_image(blob, max_pixels=max_pixels)))
        except ImageDecodeError as exc:
            rejects.append((key, exc.reason))
    return images, rejects


def decode_table(
    table: pa.Table, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[pa.Table, list[Image.Image], pa.Table]:
    """Decode the ``image`` column of a dataset table.

    Returns ``(kept_rows, images, rejects_table)`` where ``images[i]`` belongs to row ``i`` of
    ``kept_rows`` and ``rejects_table`` has columns ``key``, ``reason``.
    """
    decoded, rejects = decode_batch(
        table.column(KEY).to_pylist(), table.column(IMAGE).to_pylist(), max_pixels=max_pixels
    )
    kept = table.take(pa.array([i for i, _ in decoded], type=pa.int64()))
    return kept, [img for _, img in decoded], rejects_table(rejects)


def rejects_table(rejects: Sequence[tuple[str, str]]) -> pa.Table:
    """A rejects table (columns ``key``, ``reason``) from ``(key, reason)`` pairs."""
    return pa.table(
        {KEY: [k for k, _ in rejects], "reason": [r for _, r in rejects]}, schema=REJECTS_SCHEMA
    )


def write_rejects(rejects: Sequence[tuple[str, str]] | pa.Table, uri: str) -> int:
    """Write rejects (pairs or a rejects table) as one Parquet file at ``uri``; returns the row count.

    Written even when empty, so "no rejects" is distinguishable from "rejects not recorded".
    """
    table = rejects if isinstance(rejects, pa.Table) else rejects_table(rejects)
    write_shard(table, uri, validate=False)
    return table.num_rows
