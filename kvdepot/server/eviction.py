"""Eviction policies: small interchangeable classes over the keys that *may* be evicted.

The cache only ever inserts keys that are evictable (committed, not leased, not being
written) and removes them the moment that stops being true, so ``victim()`` never has to
skip anything and stays O(1).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable
from typing import Protocol


class EvictionPolicy(Protocol):
    def insert(self, key: Hashable) -> None:
        """Add an evictable key as most recently used (or refresh it)."""

    def remove(self, key: Hashable) -> None:
        """Forget a key (no longer evictable); absent keys are ignored."""

    def touch_all(self, keys: Iterable[Hashable]) -> None:
        """Mark keys as just used, in order, where tracked; others are ignored (hot path)."""

    def victim(self) -> Hashable | None:
        """The key to evict next, without removing it; None when empty."""

    def __len__(self) -> int: ...


class LRUPolicy:
    """Least recently used first. Callers touch a prefix's chunks from last to first, so the
    tail of a prefix is older than its head and goes first: what remains stays reachable."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def touch_all(self, keys: Iterable[Hashable]) -> None:
        # The loop runs in C (deque drains map): a lookup touches up to hundreds of keys. A key
        # not tracked (leased, being written) stops the map after map has consumed it, so the
        # next round goes on with the key after it.
        rest = map(self._order.move_to_end, keys)
        while True:
            try:
                deque(rest, maxlen=0)
                return
            except KeyError:
                continue

    def victim(self) -> Hashable | None:
        return next(iter(self._order), None)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order


POLICIES = {"lru": LRUPolicy}
