"""The bounded LRU cache with a TTL behind the chat path's model lookups."""

from __future__ import annotations

from chatgate.cache import LRUCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bounded_least_recently_used_goes_first() -> None:
    cache: LRUCache[str, int] = LRUCache(2, 60)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None
    assert cache.get("a") == 1
    assert cache.get("c") == 3
    assert len(cache) == 2


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    cache: LRUCache[str, int] = LRUCache(10, 5, clock=clock)
    cache.put("a", 1)
    clock.now = 4.9
    assert cache.get("a") == 1
    clock.now = 5.1
    assert cache.get("a") is None
    assert len(cache) == 0


def test_discard_and_clear() -> None:
    cache: LRUCache[str, int] = LRUCache(10, 60)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.discard("a")
    cache.discard("missing")
    assert cache.get("a") is None
    cache.clear()
    assert cache.get("b") is None
