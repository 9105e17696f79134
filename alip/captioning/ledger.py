"""Which captions of the prepared units are still missing, and what to do when a batch fails.

Pure bookkeeping (no Ray, no I/O): alip/captioning/pipeline.py asks it for the next batch of
rows to send to a caption actor and reports back captions or failures.

Poison rows: a batch whose captioner crashed (segfault, OOM kill, ``os._exit``) or raised is
split into single rows, each retried alone, so one bad image costs its own row and nothing
else. Only a failure of a row *alone* counts against it: a failed batch says that some row in it
is at fault, not which, so its rows are only marked suspect (they run alone from then on). A row
that has failed ``max_attempts`` times alone is given up on and becomes a reject with the reason.
Why not count the batch too (as this did until 2026-12-07): with ``max_attempts=2``, an innocent
row that shared a batch with a poison image then needed just one more crash to be rejected, and a
worker killed from outside (a SIGKILL, the OOM killer) during its solo retry rejected a good image
(chaos seed 145). A batch lost with its node (spot loss, drain) is not the rows' fault: it is
retried as it was, without counting.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of a unit's good (decoded) rows: one captioner call."""

    unit: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class _Unit:
    captions: list[str | None]
    attempts: list[int]  # failures of each row alone
    failures: dict[int, str] = field(default_factory=dict)
    suspects: set[int] = field(default_factory=set)  # rows of a failed batch: they run alone
    open_chunks: int = 0  # queued or in flight

    def complete(self) -> bool:
        return self.open_chunks == 0


class CaptionLedger:
    """Captions per unit; chunks to run; attempts per row (see module doc)."""

    def __init__(self, chunk_rows: int, max_attempts: int, stage: str = "captioner"):
        # ``stage`` names what failed in a give-up reason (the pipeline also isolates decode crashes).
        if chunk_rows < 1 or max_attempts < 1:
            raise ValueError(f"chunk_rows and max_attempts must be >= 1, got {chunk_rows}, {max_attempts}")
        self.chunk_rows = chunk_rows
        self.max_attempts = max_attempts
        self.stage = stage
        self._units: dict[str, _Unit] = {}
        self._queue: deque[Chunk] = deque()

    def add_unit(self, name: str, good_rows: int) -> None:
        """A unit whose ``good_rows`` decoded rows are ready to caption (0 is fine: nothing to do)."""
        if name in self._units:
            raise ValueError(f"unit {name!r} added twice")
        unit = _Unit(captions=[None] * good_rows, attempts=[0] * good_rows)
        self._units[name] = unit
        for start in range(0, good_rows, self.chunk_rows):
            self._queue.append(Chunk(name, start, min(start + self.chunk_rows, good_rows)))
            unit.open_chunks += 1

    def next_chunk(self) -> Chunk | None:
        """The next chunk to run (units in the order they were added, retries first)."""
        return self._queue.popleft() if self._queue else None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def succeeded(self, chunk: Chunk, captions: list[str]) -> None:
        unit = self._units[chunk.unit]
        if len(captions) != chunk.rows:
            raise RuntimeError(f"captioner returned {len(captions)} captions for {chunk.rows} images")
        unit.captions[chunk.start:chunk.stop] = captions
        unit.open_chunks -= 1

    def lost(self, chunk: Chunk) -> None:
        """The chunk's worker went away for a reason that is not the rows' fault: run it again."""
        self._queue.appendleft(chunk)

    def failed(self, chunk: Chunk, reason: str) -> str:
        """The captioner crashed or raised on ``chunk``. Returns what happens next:
        ``"split"`` (retried row by row), ``"retry"`` (a single row, tried again) or
        ``"rejected"`` (a single row out of attempts: recorded as a failure with ``reason``)."""
        unit = self._units[chunk.unit]
        unit.open_chunks -= 1
        if chunk.rows > 1:  # some row in it is at fault, not known which: no row is charged
            unit.suspects.update(range(chunk.start, chunk.stop))
            singles = [Chunk(chunk.unit, i, i + 1) for i in range(chunk.start, chunk.stop)]
            self._queue.extendleft(reversed(singles))
            unit.open_chunks += len(singles)
            return "split"
        row = chunk.start
        unit.attempts[row] += 1
        if unit.attempts[row] >= self.max_attempts:
            unit.failures[row] = f"{self.stage} failed {unit.attempts[row]} time(s) on this image: {reason}"
            return "rejected"
        self._queue.appendleft(chunk)
        unit.open_chunks += 1
        return "retry"

    def is_complete(self, name: str) -> bool:
        return self._units[name].complete()

    def pop_unit(self, name: str) -> tuple[list[str | None], dict[int, str]]:
        """A complete unit's ``(captions, failures)``; it is forgotten afterwards."""
        unit = self._units[name]
        if not unit.complete():
            raise RuntimeError(f"unit {name!r} still has {unit.open_chunks} chunk(s) open")
        del self._units[name]
        return unit.captions, unit.failures

    def attempts(self, name: str) -> list[int]:
        """Failures of each row of unit ``name`` alone."""
        return list(self._units[name].attempts)

    def on_probation(self, chunk: Chunk) -> bool:
        """A single row that failed in a batch or alone: it must run alone on its actor, so that a
        crash is surely its own (alip/captioning/faults.py)."""
        unit = self._units[chunk.unit]
        return chunk.rows == 1 and (chunk.start in unit.suspects or unit.attempts[chunk.start] > 0)
