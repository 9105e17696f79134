import pyarrow as pa
import pytest

from alip.data.schema import DatasetSchemaError, canonicalize, validate_table


def _table(**overrides):
    cols = {"key": ["a", "b"], "image": [b"x", b"y"], "raw_text": ["one", "two"]}
    cols.update(overrides)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def test_valid_table_passes_and_extra_columns_are_allowed():
    t = _table(url=["u1", "u2"])
    assert validate_table(t) is t


def test_missing_column_names_it_and_lists_found_columns():
    with pytest.raises(DatasetSchemaError, match=r"missing column\(s\) \['raw_text'\].*found \['image', 'key'\]"):
        validate_table(_table(raw_text=None), where="shard-0.parquet")
    with pytest.raises(DatasetSchemaError, match=r"^shard-0.parquet: "):
        validate_table(_table(raw_text=None), where="shard-0.parquet")


def test_missing_caption_only_when_required_points_to_caption_stage():
    validate_table(_table())
    with pytest.raises(DatasetSchemaError, match=r"\['caption', 'captioner'\].*alip caption"):
        validate_table(_table(), require_caption=True)


def test_wrong_type_is_reported_with_expected_type():
    t = _table(image=pa.array([1, 2]))
    with pytest.raises(DatasetSchemaError, match=r"column 'image' has type int64, expected binary"):
        validate_table(t)
    t = _table(raw_text=pa.array([b"a", b"b"]))
    with pytest.raises(DatasetSchemaError, match=r"column 'raw_text' has type binary, expected string"):
        validate_table(t)
    t = _table(caption=pa.array([1.0, 2.0]), captioner=["m", "m"])
    with pytest.raises(DatasetSchemaError, match=r"column 'caption' has type double"):
        validate_table(t)  # present caption columns are type-checked even when not required


def test_duplicate_null_and_empty_keys():
    with pytest.raises(DatasetSchemaError, match=r"1 duplicate key\(s\), e.g. \['a'\]"):
        validate_table(_table(key=["a", "a"]))
    with pytest.raises(DatasetSchemaError, match=r"1 row\(s\) have a null key"):
        validate_table(_table(key=["a", None]))
    with pytest.raises(DatasetSchemaError, match=r"1 row\(s\) have an empty key"):
        validate_table(_table(key=["a", ""]))
    with pytest.raises(DatasetSchemaError, match=r"'raw_text' has 1 null value"):
        validate_table(_table(raw_text=["x", None]))


def test_large_types_are_accepted_and_canonicalized():
    t = _table(key=pa.array(["a", "b"], pa.large_string()), image=pa.array([b"x", b"y"], pa.large_binary()))
    validate_table(t)
    c = canonicalize(t)
    assert c.schema.field("key").type == pa.string() and c.schema.field("image").type == pa.binary()
    assert c.column("key").to_pylist() == ["a", "b"]


def test_schema_error_is_a_value_error():
    assert issubclass(DatasetSchemaError, ValueError)
    with pytest.raises(DatasetSchemaError, match="expected a pyarrow.Table"):
        validate_table({"key": ["a"]})
