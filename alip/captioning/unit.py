"""Processing one work unit, in two halves that run in different Ray workers (no Ray imports here).

1. :func:`decode_unit` (CPU task): read the unit's rows, decode + resize every image. The
   result keeps all input columns and adds private columns: the unit name and size, the RGB
   pixels (raw bytes + height/width, so any passthrough schema survives Arrow round trips)
   and a reject reason (null for good rows).
2. :func:`finish_unit` (captioning actor): caption the good rows, then write the rejects file
   and the data file (in that order: the data file is the unit's commit marker).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from alip.captioning.output import OutputLayout
from alip.captioning.plan import WorkUnit, read_unit
from alip.data.dataset import parquet_body, write_bytes
from alip.data.images import ImageDecodeError, decode_image
from alip.data.schema import BASE_COLUMNS, CAPTION, CAPTION_COLUMNS, CAPTIONER, IMAGE, KEY, REJECTS_SCHEMA, validate_table

UNIT = "_unit"
UNIT_ROWS = "_unit_rows"
PIXELS = "_pixels"
HEIGHT = "_height"
WIDTH = "_width"
REJECT = "_reject"
PRIVATE = (UNIT, UNIT_ROWS, PIXELS, HEIGHT, WIDTH, REJECT)


class UnitSplitError(RuntimeError):
    """A batch did not hold whole units: the exactly-once guarantee would not hold, so stop."""


def decode_unit(unit: WorkUnit, image_size: int | None, max_pixels: int) -> pa.Table:
    """Read and decode one unit (see module doc). ``image_size`` resizes to a square (None: keep)."""
    table = read_unit(unit)
    pixels, heights, widths, reasons = [], [], [], []
    for blob in table.column(IMAGE).to_pylist():
        try:
            img = decode_image(blob, max_pixels=max_pixels)
            if image_size and img.size != (image_size, image_size):
                # The captioner's processor resizes to this square size too: doing it here moves
                # the work to cheap CPU tasks and shrinks what travels to the (GPU) actor.
                img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
            pixels.append(img.tobytes())
            widths.append(img.width)
            heights.append(img.height)
            reasons.append(None)
        except ImageDecodeError as exc:
            pixels.append(b"")
            widths.append(0)
            heights.append(0)
            reasons.append(exc.reason)
    n = table.num_rows
    return (
        table.append_column(UNIT, pa.array([unit.name] * n, pa.string()))
        .append_column(UNIT_ROWS, pa.array([n] * n, pa.int64()))
        .append_column(PIXELS, pa.array(pixels, pa.binary()))
        .append_column(HEIGHT, pa.array(heights, pa.int32()))
        .append_column(WIDTH, pa.array(widths, pa.int32()))
        .append_column(REJECT, pa.array(reasons, pa.string()))
    )


def split_units(batch: pa.Table) -> list[tuple[str, pa.Table]]:
    """Group a batch by unit, checking that each unit is complete (guards the one-block-per-unit plan)."""
    if batch.num_rows == 0:
        return []
    names = batch.column(UNIT)
    out = []
    for name in pc.unique(names).to_pylist():
        part = batch.filter(pc.equal(names, name))
        expected = part.column(UNIT_ROWS)[0].as_py()
        if part.num_rows != expected:
            raise UnitSplitError(
                f"unit {name!r} arrived with {part.num_rows} of its {expected} rows; Ray Data split the "
                "unit's block. Lower --rows-per-unit."
            )
        out.append((name, part))
    return out


def images_of(part: pa.Table) -> list[Image.Image]:
    """PIL images of the decoded (non-rejected) rows, in row order."""
    return [
        Image.frombytes("RGB", (w, h), bytes(p))
        for p, h, w in zip(part.column(PIXELS).to_pylist(), part.column(HEIGHT).to_pylist(),
                           part.column(WIDTH).to_pylist())
    ]


def output_tables(part: pa.Table, captions: list[str], captioner: str) -> tuple[pa.Table, pa.Table]:
    """``(data, rejects)`` for a decoded unit ``part`` given captions of its good rows."""
    rejected = pc.invert(pc.is_null(part.column(REJECT)))
    bad = part.filter(rejected)
    good = part.filter(pc.invert(rejected))
    if len(captions) != good.num_rows:
        raise RuntimeError(f"captioner returned {len(captions)} captions for {good.num_rows} images")
    rejects = pa.table({KEY: bad.column(KEY), "reason": bad.column(REJECT)}, schema=REJECTS_SCHEMA)
    # An input that was captioned before gets new captions: the old columns are replaced.
    keep = [c for c in good.column_names if c not in PRIVATE and c not in CAPTION_COLUMNS]
    data = good.select(keep)
    data = data.append_column(CAPTION, pa.array(captions, pa.string()))
    data = data.append_column(CAPTIONER, pa.array([captioner] * good.num_rows, pa.string()))
    order = list(BASE_COLUMNS) + list(CAPTION_COLUMNS)
    return data.select(order + [c for c in data.column_names if c not in order]), rejects


def write_unit(layout: OutputLayout, name: str, data: pa.Table, rejects: pa.Table) -> tuple[int, int]:
    """Rejects first, then the data file: the data file's existence means the unit is done.
    Returns the two files' sizes in bytes ``(data, rejects)``: what a listing reports from then on
    (each file is committed whole, in one step), kept by the job's commit index
    (alip/captioning/commit_index.py)."""
    validate_table(data, require_caption=True, where=layout.data_uri(name))
    rejects_body = parquet_body(rejects)
    write_bytes(rejects_body, layout.rejects_uri(name))
    data_body = parquet_body(data)
    write_bytes(data_body, layout.data_uri(name))
    return data_body.size, rejects_body.size

