"""The CPU stages of captioning one work unit (no Ray here; alip/captioning/pipeline.py runs them).

    prepare_unit  (CPU task)   read the unit's rows, decode every image, resize it to the
                               captioner's input size and run the processor (normalise,
                               prompt tokens): returns the unit's rows without pixels plus
                               the model-ready arrays of its good rows
    <GPU actor>                generate_prepared on slices of those arrays (pipeline.py)
    finish_unit   (CPU task)   build the data + rejects tables and commit them (unit.write_unit)

So a (GPU) caption actor never decodes, resizes, encodes or uploads, and what travels to it is
the model's input (e.g. 384x384 fp16), not full-resolution RGB.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow as pa
from PIL import Image

from alip.captioners import CaptionerConfig, CaptionerError, Preparer, load_preparer
from alip.captioning.output import OutputLayout
from alip.captioning.plan import WorkUnit, read_unit
from alip.captioning.unit import REJECT, UNIT, UNIT_ROWS, output_tables, write_unit
from alip.data.images import ImageDecodeError, decode_image
from alip.data.schema import IMAGE, KEY

_PREPARERS: dict[str, Preparer] = {}
_PREPARERS_LOCK = threading.Lock()


def cached_preparer(config: CaptionerConfig) -> Preparer:
    """One preparer per config per process: Ray reuses worker processes across tasks, so the
    processor (tokenizer files, possibly downloaded from S3) loads once per worker, not per unit."""
    key = repr(config)  # the config holds a dict (``extra``): not hashable, but its repr is exact
    with _PREPARERS_LOCK:
        if key not in _PREPARERS:
            _PREPARERS[key] = load_preparer(config)
        return _PREPARERS[key]


def _input_size(preparer: Preparer) -> int | None:
    return getattr(preparer, "input_size", None)


def _prepare_rows(preparer: Preparer, images: list[Image.Image]) -> tuple[list[dict | None], list[str | None]]:
    """Prepare ``images`` as one batch; if the processor refuses the batch, image by image so only
    the images it cannot handle are rejected (with the processor's error as the reason)."""
    try:
        batch = preparer.prepare(images)
        return [batch], [None] * len(images)
    except CaptionerError:
        raise  # a wrong setup, not a bad image
    except Exception:  # noqa: BLE001 - find the image(s) at fault below
        pass
    parts, reasons = [], []
    for img in images:
        try:
            parts.append(preparer.prepare([img]))
            reasons.append(None)
        except CaptionerError:
            raise
        except Exception as exc:  # noqa: BLE001
            parts.append(None)
            reasons.append(f"cannot prepare image for the captioner: {type(exc).__name__}: {exc}")
    return parts, reasons


def prepare_unit(unit: WorkUnit, captioner: CaptionerConfig, max_pixels: int,
                 batch_size: int = 64, skip: dict[int, str] | None = None,
                 crash_on_keys: frozenset[str] = frozenset()) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """``(rows, inputs)`` for one unit.

    ``rows``: the unit's input rows (all columns) plus ``_unit``, ``_unit_rows`` and ``_reject``
    (null for a good row, else why it is rejected). ``inputs``: the captioner's prepared arrays
    for the good rows, in row order (first axis = good row). No image of any kind fails this:
    every exception while decoding or preparing one image rejects that image. An image that
    takes the whole process down (a native decoder's segfault, an OOM kill) cannot be caught
    here: the scheduler isolates it (pipeline.py) and passes it in ``skip`` (row -> reason),
    rows that are rejected without being decoded again.
    """
    return prepare_table(read_unit(unit), unit.name, captioner, max_pixels, batch_size, skip, crash_on_keys)


def prepare_table(table: pa.Table, name: str, captioner: CaptionerConfig, max_pixels: int,
                  batch_size: int = 64, skip: dict[int, str] | None = None,
                  crash_on_keys: frozenset[str] = frozenset()) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """:func:`prepare_unit` on rows already read (also one row alone: the scheduler's crash probe).

    ``crash_on_keys`` is a test hook (empty unless $ALIP_DECODE_CRASH_ON_KEYS is set for the
    job): decoding a row with one of these keys kills the process (``os._exit``), standing in
    for a corrupt image that segfaults a native decoder."""
    preparer = cached_preparer(captioner)
    side = _input_size(preparer)
    reasons: list[str | None] = []
    good_images: list[Image.Image] = []
    good_rows: list[int] = []
    keys = table.column(KEY).to_pylist()
    for i, blob in enumerate(table.column(IMAGE).to_pylist()):
        if skip and i in skip:
            reasons.append(skip[i])
            continue
        if keys[i] in crash_on_keys:
            os._exit(3)  # test hook (see above): a decoder that takes its process down
        try:
            img = decode_image(blob, max_pixels=max_pixels)
            if side and img.size != (side, side):
                # The processor resizes to this square too; doing it right after decoding keeps
                # only small images in memory (a unit can hold hundreds of multi-megapixel ones).
                img = img.resize((side, side), Image.Resampling.BICUBIC)
            good_images.append(img)
            good_rows.append(i)
            reasons.append(None)
        except ImageDecodeError as exc:
            reasons.append(exc.reason)
        except Exception as exc:  # noqa: BLE001 - e.g. a resize of a pathological image
            reasons.append(f"undecodable image: {type(exc).__name__}: {exc}")
    parts: list[dict] = []
    for start in range(0, len(good_images), batch_size):
        chunk_parts, chunk_reasons = _prepare_rows(preparer, good_images[start:start + batch_size])
        parts += [p for p in chunk_parts if p is not None]
        for row, reason in zip(good_rows[start:start + batch_size], chunk_reasons):
            reasons[row] = reason
    inputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    n = table.num_rows
    rows = (
        table.append_column(UNIT, pa.array([name] * n, pa.string()))
        .append_column(UNIT_ROWS, pa.array([n] * n, pa.int64()))
        .append_column(REJECT, pa.array(reasons, pa.string()))
    )
    n_good = sum(r is None for r in reasons)
    if inputs and any(len(v) != n_good for v in inputs.values()):
        raise RuntimeError(f"unit {name}: prepared {[len(v) for v in inputs.values()]} rows for {n_good} images")
    return rows, inputs


def good_count(rows: pa.Table) -> int:
    """How many rows of a prepared unit go to the captioner."""
    return rows.column(REJECT).null_count


def finish_unit(layout: OutputLayout, name: str, rows: pa.Table, captions: list[str | None],
                failures: dict[int, str], captioner_name: str) -> dict:
    """Commit one unit: ``captions[i]`` belongs to the i-th good row, ``failures`` maps good-row
    indices the captioner could not handle (poison rows) to the reason. Returns counts for the
    job's summary, including rejects by reason."""
    reasons = rows.column(REJECT).to_pylist()
    good = [i for i, r in enumerate(reasons) if r is None]
    if len(captions) != len(good):
        raise RuntimeError(f"unit {name}: {len(captions)} captions for {len(good)} good rows")
    kept = []
    for j, row in enumerate(good):
        if j in failures:
            reasons[row] = failures[j]
        elif captions[j] is None:
            raise RuntimeError(f"unit {name}: good row {j} has neither a caption nor a failure")
        else:
            kept.append(captions[j])
    rows = rows.set_column(rows.column_names.index(REJECT), REJECT, pa.array(reasons, pa.string()))
    data, rejects = output_tables(rows, kept, captioner_name)
    data_bytes, rejects_bytes = write_unit(layout, name, data, rejects)
    by_reason: dict[str, int] = {}
    for reason in rejects.column("reason").to_pylist():
        kind = reject_kind(reason)
        by_reason[kind] = by_reason.get(kind, 0) + 1
    return dict(unit=name, rows=rows.num_rows, captioned=data.num_rows, rejected=rejects.num_rows,
                reject_reasons=by_reason, data_bytes=data_bytes, rejects_bytes=rejects_bytes)


def reject_kind(reason: str) -> str:
    """A short category of a reject reason for the summary (the full reason is in the rejects table)."""
    return reason.split(":", 1)[0].split(" (", 1)[0].strip()[:80]
