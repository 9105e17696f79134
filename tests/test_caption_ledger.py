"""The caption job's poison-row bookkeeping (alip/captioning/ledger.py), without Ray."""

from __future__ import annotations

import pytest

from alip.captioning.ledger import CaptionLedger, Chunk


def drain(ledger: CaptionLedger, poison: set[tuple[str, int]], lost_once: set[Chunk] = frozenset()):
    """Run the ledger to the end with a captioner that fails on ``poison`` rows; returns the
    number of captioner calls made and the calls that failed."""
    calls = failures = 0
    lost = set(lost_once)
    while (chunk := ledger.next_chunk()) is not None:
        calls += 1
        if chunk in lost:
            lost.discard(chunk)
            ledger.lost(chunk)
            continue
        rows = {(chunk.unit, i) for i in range(chunk.start, chunk.stop)}
        if rows & poison:
            failures += 1
            ledger.failed(chunk, "worker crashed")
        else:
            ledger.succeeded(chunk, [f"{chunk.unit}:{i}" for i in range(chunk.start, chunk.stop)])
    return calls, failures


def test_units_are_cut_into_batches_in_order():
    ledger = CaptionLedger(chunk_rows=4, max_attempts=3)
    ledger.add_unit("a", 10)
    ledger.add_unit("empty", 0)
    assert ledger.is_complete("empty") and ledger.pop_unit("empty") == ([], {})
    chunks = [ledger.next_chunk() for _ in range(3)]
    assert [(c.start, c.stop) for c in chunks] == [(0, 4), (4, 8), (8, 10)] and ledger.next_chunk() is None
    for c in chunks:
        assert not ledger.is_complete("a")
        ledger.succeeded(c, ["x"] * c.rows)
    assert ledger.pop_unit("a") == (["x"] * 10, {})
    with pytest.raises(RuntimeError, match="2 captions for 4"):
        ledger.add_unit("b", 4)
        ledger.succeeded(ledger.next_chunk(), ["x", "y"])


def test_a_poison_row_is_isolated_and_rejected_after_max_attempts_the_rest_captioned():
    ledger = CaptionLedger(chunk_rows=8, max_attempts=3)
    ledger.add_unit("u", 20)
    calls, failures = drain(ledger, poison={("u", 9)})
    captions, failed = ledger.pop_unit("u")
    # Row 9 failed in its batch (charged to no row), then 3 times alone; its 7 batch-mates were
    # retried alone.
    assert failures == 1 + 3 and set(failed) == {9} and "failed 3 time(s)" in failed[9]
    assert "worker crashed" in failed[9]
    assert captions[:9] == [f"u:{i}" for i in range(9)] and captions[10:] == [f"u:{i}" for i in range(10, 20)]
    assert calls == 3 + 7 + 3  # 3 batches, 7 single retries of innocent rows, 3 tries of row 9 alone


def test_several_poison_rows_and_attempt_limits():
    for max_attempts, expected_failures in ((1, 1 + 2), (2, 1 + 2 * 2), (5, 1 + 2 * 5)):
        ledger = CaptionLedger(chunk_rows=8, max_attempts=max_attempts)
        ledger.add_unit("u", 8)
        _, failures = drain(ledger, poison={("u", 2), ("u", 5)})
        captions, failed = ledger.pop_unit("u")
        assert set(failed) == {2, 5}
        assert [c for i, c in enumerate(captions) if i not in failed] == [f"u:{i}" for i in (0, 1, 3, 4, 6, 7)]
        # The batch is charged to no row; each poison row fails max_attempts times alone.
        assert failures == expected_failures


def test_lost_chunks_are_retried_whole_without_counting():
    ledger = CaptionLedger(chunk_rows=5, max_attempts=1)
    ledger.add_unit("u", 10)
    first = Chunk("u", 0, 5)
    calls, failures = drain(ledger, poison=set(), lost_once={first})
    assert (calls, failures) == (3, 0)
    assert ledger.attempts("u") == [0] * 10
    assert ledger.pop_unit("u") == ([f"u:{i}" for i in range(10)], {})


def test_incomplete_unit_cannot_be_popped():
    ledger = CaptionLedger(chunk_rows=5, max_attempts=3)
    ledger.add_unit("u", 3)
    with pytest.raises(RuntimeError, match="still has 1 chunk"):
        ledger.pop_unit("u")
    with pytest.raises(ValueError, match="added twice"):
        ledger.add_unit("u", 3)


def test_an_outside_kill_during_a_solo_retry_does_not_reject_a_good_row():
    """Chaos seed 145: a batch with a poison image crashed, then a SIGKILL from outside hit an
    innocent row's solo retry. With max_attempts=2 that row used to be rejected (the batch counted
    as its first attempt); now only failures alone count, and it is captioned on its next try."""
    ledger = CaptionLedger(chunk_rows=4, max_attempts=2)
    ledger.add_unit("u", 4)
    batch = ledger.next_chunk()
    assert ledger.failed(batch, "worker crashed") == "split"  # row 2 is the poison
    assert ledger.attempts("u") == [0, 0, 0, 0]
    first = ledger.next_chunk()
    assert first == Chunk("u", 0, 1) and ledger.on_probation(first)  # runs alone
    assert ledger.failed(first, "worker crashed (SIGKILL from outside)") == "retry"
    outcomes = {}
    while (chunk := ledger.next_chunk()) is not None:
        if chunk.start == 2:
            outcomes.setdefault(2, []).append(ledger.failed(chunk, "worker crashed"))
        else:
            ledger.succeeded(chunk, [f"u:{chunk.start}"])
    captions, failed = ledger.pop_unit("u")
    assert outcomes[2] == ["retry", "rejected"] and set(failed) == {2}
    assert captions[0] == "u:0" and captions[1] == "u:1" and captions[3] == "u:3"
