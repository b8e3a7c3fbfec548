"""A small bounded LRU cache with a TTL, for model lookups on the chat path."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most `size` entries; an entry older than `ttl` seconds is a miss (the safety net
    behind explicit invalidation, for writes made by another process)."""

    __slots__ = ("_clock", "_data", "_size", "_ttl")

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._size = size
        self._ttl = ttl
        self._clock = clock

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] < self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V) -> None:
        self._data[key] = (self._clock() + self._ttl, value)
        self._data.move_to_end(key)
        if len(self._data) > self._size:
            self._data.popitem(last=False)

    def discard(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
