"""An asyncio LRU cache for class text features, keyed by (labels, templates).

Zero-shot classification encodes labels x templates texts (10 labels x 80 ImageNet templates =
800 text forwards) but apps ask about the same label sets again and again, so the [D, C] class
matrix is cached. Concurrent misses on the same key share one computation instead of each
encoding the same 800 texts.

The computation runs as a task of its own, shared by its waiters: one waiter that goes away (its
request cancelled because the client disconnected) does not stop it for the others, but when the
last waiter has gone the computation is cancelled too, so a miss nobody waits for costs nothing
more.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class AsyncLRUCache(Generic[V]):
    def __init__(self, maxsize: int):
        if maxsize <= 0:
            raise ValueError(f"cache size must be positive, got {maxsize}")
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._pending: dict[Hashable, asyncio.Future] = {}
        self._waiters: dict[Hashable, int] = {}
        self.cancelled = 0  # computations stopped because every waiter had gone
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._data), "maxsize": self.maxsize, "hits": self.hits, "misses": self.misses,
                "cancelled": self.cancelled}

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        if key in self._data:
            self.hits += 1
            self._data.move_to_end(key)
            return self._data[key]
        task = self._pending.get(key)
        if task is not None:  # someone is already computing it: share their result
            self.hits += 1
        else:
            self.misses += 1
            # A task of its own, so a requester that disconnects (and is cancelled) does not
            # cancel the computation the other waiters share.
            task = asyncio.ensure_future(compute())
            self._pending[key] = task
            task.add_done_callback(lambda t, key=key: self._finish(key, t))
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._waiters.get(key) == 1 and not task.done():
                task.cancel()  # the last waiter went away: nobody needs the result
                self.cancelled += 1
            raise
        finally:
            self._waiters[key] -= 1
            if not self._waiters[key]:
                del self._waiters[key]

    def _finish(self, key: Hashable, task: asyncio.Future) -> None:
        self._pending.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return  # failures are not cached: the next call retries
        self._data[key] = task.result()
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
