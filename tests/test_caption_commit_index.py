"""The caption job's commit index (alip/captioning/commit_index.py): a resume trusts a committed
unit's indexed row counts only while its data file is listed at the indexed size, and reads the
footers of everything else. No Ray: units are committed with the job's own write_unit."""
from __future__ import annotations

import time

import pyarrow as pa
import pytest

import alip.captioning.commit_index as commit_index
import alip.captioning.output as output
from alip.captioning.commit_index import CommitIndexWriter, compact, read_index, trusted_units
from alip.captioning.output import OutputLayout
from alip.captioning.plan import WorkUnit
from alip.captioning.unit import write_unit
from alip.data.dataset import file_version, write_bytes
from alip.data.storage import join
from alip.data.schema import REJECTS_SCHEMA


def _tables(captioned: int, rejected: int) -> tuple[pa.Table, pa.Table]:
    data = pa.table({"key": [f"k{i}" for i in range(captioned)], "image": [b"x"] * captioned,
                     "raw_text": ["t"] * captioned, "caption": ["c"] * captioned, "captioner": ["cap"] * captioned})
    rejects = pa.table({"key": [f"r{i}" for i in range(rejected)], "reason": ["corrupt"] * rejected},
                       schema=REJECTS_SCHEMA)
    return data, rejects


def _commit(layout: OutputLayout, name: str, captioned: int, rejected: int) -> dict:
    """Commit a unit as finish_unit does; returns the report the driver gets (what the index keeps)."""
    data_bytes, rejects_bytes = write_unit(layout, name, *_tables(captioned, rejected))
    return dict(unit=name, captioned=captioned, rejected=rejected, data_bytes=data_bytes, rejects_bytes=rejects_bytes)


@pytest.fixture
def footer_reads(monkeypatch):
    """Counts the footers the resume reads (alip.captioning.output._footer_rows)."""
    calls: list[str] = []
    real = output._footer_rows

    def counting(uri, *args, **kwargs):
        calls.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(output, "_footer_rows", counting)
    return calls


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_unit_reports_the_sizes_a_listing_gives(tmp_path, where, request):
    root = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    layout = OutputLayout(root)
    report = _commit(layout, "u0", 9, 1)
    assert layout._parquet_sizes(layout.root) == {"u0": report["data_bytes"]}
    assert layout._parquet_sizes(layout.rejects) == {"u0": report["rejects_bytes"]}


def test_writer_flushes_every_n_units_and_every_t_seconds_and_on_demand(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    now = [0.0]
    writer = CommitIndexWriter(layout.index, flush_units=3, flush_s=60, clock=lambda: now[0])
    reports = [_commit(layout, f"u{i}", 4, 1) for i in range(8)]
    for r in reports[:3]:
        writer.add(r)
    assert writer.parts == 1                      # 3 units: a part
    writer.add(reports[3])
    now[0] = 61.0
    writer.add(reports[4])
    assert writer.parts == 2                      # 60 s since the last part: a part of 2
    writer.add(reports[5])
    assert writer.flush() is not None and writer.parts == 3
    assert writer.flush() is None                 # nothing new: no empty part
    entries, parts = read_index(layout.index)
    assert len(parts) == 3
    assert {u: e[0] for u, e in entries.items()} == {
        r["unit"]: (4, 1, r["data_bytes"], r["rejects_bytes"]) for r in reports[:6]}
    with pytest.raises(ValueError, match="lacks"):
        writer.add({"unit": "u9", "captioned": 1})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_trusts_the_index_only_for_the_listed_size(tmp_path, where, request, footer_reads):
    root = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    layout = OutputLayout(root)
    units = [WorkUnit(f"u{i}", "in.parquet", 10 * i, 10 * i + 10, 10) for i in range(6)]
    writer = CommitIndexWriter(layout.index)
    for i in range(4):
        writer.add(_commit(layout, f"u{i}", 9, 1))
    writer.flush()
    _commit(layout, "u4", 8, 2)                   # committed after the last part: not in the index
    # u1 replaced after it was indexed by a short file (another size): the index must not vouch for it.
    data, rejects = _tables(5, 1)
    write_unit(layout, "u1", data, rejects)
    # u2 garbled in place to a file of a different size.
    write_bytes(b"PAR1 not a parquet file", layout.data_uri("u2"))

    entries, _ = read_index(layout.index)
    state = layout.resume_state(units, entries)
    assert state.done == {"u0": (9, 1), "u3": (9, 1), "u4": (8, 2)}
    assert state.trusted == 2
    assert bad_reasons(state.bad) == {"u1": "5 captioned + 1 rejected rows, the unit has 10",
                                      "u2": "data file is unreadable"}
    # Footers read: only those of units the index did not vouch for (u1, u2, u4), none of u0 or u3.
    read = {uri.rsplit("/", 1)[-1] for uri in footer_reads}
    assert read == {"u1.parquet", "u2.parquet", "u4.parquet"}
    # Without an index, every committed unit's footers are read: the same answer.
    footer_reads.clear()
    plain = layout.resume_state(units)
    assert (plain.done, plain.bad, plain.trusted) == (state.done, state.bad, 0)
    assert len(footer_reads) == 2 * 5 - 1         # data + rejects of 5 units; u2's unreadable data stops it


def bad_reasons(bad: dict[str, str]) -> dict[str, str]:
    return {u: why.split(" (")[0] for u, why in bad.items()}


def test_an_entry_whose_rows_do_not_add_up_is_not_trusted():
    units = [WorkUnit("u0", "in.parquet", 0, 10, 10), WorkUnit("u1", "in.parquet", 10, 20, None)]
    entries = {"u0": [(8, 1, 100, 50)], "u1": [(3, 0, 70, 50)]}
    assert trusted_units(units, {"u0": 100, "u1": 70}, entries) == {"u1": (3, 0)}  # 8 + 1 != 10
    # Two entries for a unit redone by a later run: the one matching the listed size counts.
    entries["u0"] = [(8, 1, 100, 50), (9, 1, 120, 50)]
    assert trusted_units(units, {"u0": 120, "u1": 71}, entries) == {"u0": (9, 1)}


def test_an_unreadable_part_is_skipped_and_its_units_read_by_footer(tmp_path, footer_reads):
    layout = OutputLayout(str(tmp_path / "out"))
    units = [WorkUnit(f"u{i}", "in.parquet", 10 * i, 10 * i + 10, 10) for i in range(2)]
    writer = CommitIndexWriter(layout.index)
    writer.add(_commit(layout, "u0", 9, 1))
    writer.flush()
    writer.add(_commit(layout, "u1", 9, 1))
    broken = writer.flush()
    write_bytes(b"not parquet", broken)
    said: list[str] = []
    entries, parts = read_index(layout.index, said.append)
    assert set(entries) == {"u0"} and len(parts) == 2
    assert len(said) == 1 and "unreadable, its units are verified by their footers" in said[0]
    state = layout.resume_state(units, entries)
    assert state.done == {"u0": (9, 1), "u1": (9, 1)} and state.trusted == 1


def test_many_parts_are_compacted_into_one_after_a_resume(tmp_path, monkeypatch, footer_reads):
    monkeypatch.setattr(commit_index, "COMPACT_PARTS", 3)
    layout = OutputLayout(str(tmp_path / "out"))
    units = [WorkUnit(f"u{i}", "in.parquet", 10 * i, 10 * i + 10, 10) for i in range(5)]
    writer = CommitIndexWriter(layout.index, flush_units=1)
    for i in range(5):
        writer.add(_commit(layout, f"u{i}", 9, 1))
    entries, parts = read_index(layout.index)
    assert len(parts) == 5
    state = layout.resume_state(units, entries)
    assert state.trusted == 5 and not footer_reads
    assert compact(layout.index, parts, state.done, entries, state.data_sizes, state.rejects_sizes)
    entries2, parts2 = read_index(layout.index)
    assert len(parts2) == 1 and entries2 == entries
    assert layout.resume_state(units, entries2).trusted == 5
    # At or under the threshold nothing is rewritten.
    assert compact(layout.index, parts2, state.done, entries2, state.data_sizes, state.rejects_sizes) is None


def test_overwrite_clears_the_index(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    writer = CommitIndexWriter(layout.index)
    writer.add(_commit(layout, "u0", 9, 1))
    writer.flush()
    assert layout.clear() == 3                    # data, rejects, one index part
    assert read_index(layout.index) == ({}, [])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_file_version_tells_a_rewrite_without_reading_the_file(tmp_path, where, request):
    """What the caption job checks instead of reading its manifest (~80 MB at LAION scale) twice."""
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    uri = join(root, "manifest.json")
    assert file_version(uri) is None
    write_bytes(b'{"a": 1}', uri)
    first = file_version(uri)
    assert first["size"] == 8 and first == file_version(uri)
    time.sleep(0.05)
    write_bytes(b'{"a": 2}', uri)                 # same size, other content
    assert file_version(uri) != first


def test_a_big_s3_resume_lists_key_ranges_concurrently_with_the_same_answer(s3_bucket, monkeypatch):
    """Range listing (StartAfter, stop past the range's last key) finds exactly what one listing
    finds among the units: committed ones, not the missing ones, not other files or sub-folders."""
    layout = OutputLayout(f"{s3_bucket}/out")
    names = [f"world-{s:05d}-{u:05d}" for s in range(6) for u in range(4)]  # 24 units
    for i, name in enumerate(names):
        if i % 5 != 3:                                   # some units not committed
            write_bytes(b"x" * (i + 1), layout.data_uri(name))
    write_bytes(b"{}", f"{s3_bucket}/out/_caption_job.json")
    write_bytes(b"r", layout.rejects_uri(names[0]))      # in a sub-folder: not listed here
    write_bytes(b"other", f"{s3_bucket}/out/world-00002-00001-extra.parquet")  # not a unit
    want = {n: i + 1 for i, n in enumerate(names) if i % 5 != 3}
    assert layout._sizes_of(layout.root, names) == want  # one listing (few names)
    monkeypatch.setattr(output, "PARALLEL_LIST_FROM", 1)
    monkeypatch.setattr(output, "_KEYS_PER_RANGE", 5)
    monkeypatch.setattr(output, "_PAGE_KEYS", 2)        # ranges span pages
    assert layout._sizes_of(layout.root, names) == want  # 5 ranges
    assert layout._sizes_of(layout.root, list(reversed(names))[:7]) == {n: want[n] for n in names[-7:] if n in want}
