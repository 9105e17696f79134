"""The dataset schema: column names, types, and validation with readable errors.

A dataset is a folder of Parquet shards with at least::

    key        string  unique, non-empty sample id
    image      binary  encoded image bytes (JPEG / PNG / WebP)
    raw_text   string  the web alt-text that came with the image

Captioning adds ``caption`` (string) and ``captioner`` (string, which model wrote it).
Any other column (urls, eval-only labels, ...) passes through every stage untouched.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

KEY = "key"
IMAGE = "image"
RAW_TEXT = "raw_text"
CAPTION = "caption"
CAPTIONER = "captioner"
REASON = "reason"  # rejects tables: (key, reason)

BASE_COLUMNS = (KEY, IMAGE, RAW_TEXT)
CAPTION_COLUMNS = (CAPTION, CAPTIONER)

#: Canonical Arrow types; the large_* variants are accepted on input and cast down on read.
COLUMN_TYPES: dict[str, pa.DataType] = {
    KEY: pa.string(),
    IMAGE: pa.binary(),
    RAW_TEXT: pa.string(),
    CAPTION: pa.string(),
    CAPTIONER: pa.string(),
}

BASE_SCHEMA = pa.schema([(c, COLUMN_TYPES[c]) for c in BASE_COLUMNS])
CAPTIONED_SCHEMA = pa.schema([(c, COLUMN_TYPES[c]) for c in BASE_COLUMNS + CAPTION_COLUMNS])
REJECTS_SCHEMA = pa.schema([(KEY, pa.string()), (REASON, pa.string())])

_STRINGS = (pa.string(), pa.large_string(), pa.string_view())
_BINARIES = (pa.binary(), pa.large_binary(), pa.binary_view())


class DatasetSchemaError(ValueError):
    """A table does not follow the dataset schema; the message says what and how to fix it."""


def _accepts(expected: pa.DataType, actual: pa.DataType) -> bool:
    family = _STRINGS if expected == pa.string() else _BINARIES
    return actual in family


def canonicalize(table: pa.Table) -> pa.Table:
    """Cast known columns from large/view variants to the canonical types (others untouched)."""
    for i, field in enumerate(table.schema):
        want = COLUMN_TYPES.get(field.name)
        if want is not None and field.type != want and _accepts(want, field.type):
            table = table.set_column(i, pa.field(field.name, want), table.column(i).cast(want))
    return table


def validate_table(table: pa.Table, require_caption: bool = False, where: str = "table") -> pa.Table:
    """Check ``table`` against the schema and return it unchanged.

    Raises :class:`DatasetSchemaError` for a missing column, a column of the wrong type,
    null/empty keys, duplicate keys or null texts. ``where`` (e.g. a shard URI) is put in
    the message so the user knows which file is broken.
    """
    if not isinstance(table, pa.Table):
        raise DatasetSchemaError(f"{where}: expected a pyarrow.Table, got {type(table).__name__}")
    required = BASE_COLUMNS + (CAPTION_COLUMNS if require_caption else ())
    names = set(table.column_names)
    missing = [c for c in required if c not in names]
    if missing:
        hint = (
            " Run the caption stage (alip caption) first." if set(missing) <= set(CAPTION_COLUMNS)
            else " A dataset needs columns key (string), image (encoded bytes), raw_text (string)."
        )
        raise DatasetSchemaError(
            f"{where}: missing column(s) {missing}; found {sorted(names)}.{hint}"
        )
    for name in required + tuple(c for c in CAPTION_COLUMNS if c in names):
        actual = table.schema.field(name).type
        if not _accepts(COLUMN_TYPES[name], actual):
            raise DatasetSchemaError(
                f"{where}: column {name!r} has type {actual}, expected {COLUMN_TYPES[name]}"
                + (" (encoded image bytes, not decoded pixels or paths)" if name == IMAGE else "")
            )
    keys = table.column(KEY)
    n_null = keys.null_count
    if n_null:
        raise DatasetSchemaError(f"{where}: {n_null} row(s) have a null key; every sample needs a unique key")
    n_empty = pc.sum(pc.equal(pc.utf8_length(keys), 0)).as_py() or 0
    if n_empty:
        raise DatasetSchemaError(f"{where}: {n_empty} row(s) have an empty key; every sample needs a unique key")
    n_unique = pc.count_distinct(keys).as_py()
    if n_unique != table.num_rows:
        counts = pc.value_counts(keys)
        dup = [v["values"].as_py() for v in counts if v["counts"].as_py() > 1][:5]
        raise DatasetSchemaError(
            f"{where}: {table.num_rows - n_unique} duplicate key(s), e.g. {dup}; keys must be unique"
        )
    for name in (RAW_TEXT,) + (CAPTION_COLUMNS if require_caption else ()):
        nulls = table.column(name).null_count
        if nulls:
            raise DatasetSchemaError(
                f"{where}: column {name!r} has {nulls} null value(s); use '' for a missing text"
            )
    return table
