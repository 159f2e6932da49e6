"""Least recently used first (the default policy)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Container, Hashable, Iterable


class LRUPolicy:
    """Least recently used first. A held key has no standing: released, it is as recent as
    the end of its hold (a lease ends when its reader is done with it). Callers touch a prefix's
    chunks from last to first, so the tail of a prefix is older than its head and goes first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # evictable, oldest first
        self._held: set[Hashable] = set()

    def insert(self, key: Hashable) -> None:
        self._held.discard(key)
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(
        self, keys: Iterable[Hashable], on_held: Callable[[Hashable], None] | None = None
    ) -> None:
        # The loop runs in C (deque drains map): a lookup touches up to hundreds of keys. A key
        # not in the order (held or untracked) stops the map after map has consumed it, so
        # the next round goes on with the key after it.
        rest = map(self._order.move_to_end, keys)
        while True:
            try:
                deque(rest, maxlen=0)
                return
            except KeyError as missing:
                if on_held is not None:
                    on_held(missing.args[0])

    def hold(self, key: Hashable) -> None:
        if key in self._order:
            del self._order[key]
            self._held.add(key)

    def release(self, key: Hashable, first: bool = False) -> bool:
        order = self._order
        if key in self._held:
            self._held.remove(key)
            order[key] = None
        elif key not in order:
            return False
        if first:
            order.move_to_end(key, False)
        else:
            order.move_to_end(key)
        return True

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)
        self._held.discard(key)

    def evict(self, n: int, protected: Container[Hashable] = frozenset()) -> list[Hashable] | None:
        chosen: list[Hashable] = []
        if n > 0:
            for key in self._order:
                if key not in protected:
                    chosen.append(key)
                    if len(chosen) == n:
                        break
        if len(chosen) < n:
            return None
        for key in chosen:
            del self._order[key]
        return chosen

    def tracks(self, key: Hashable) -> bool:
        return key in self._order or key in self._held

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

