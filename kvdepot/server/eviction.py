"""Eviction: which chunk goes next.

Policies are small interchangeable classes over the keys that *may* be evicted: the cache
only ever inserts keys that are evictable (committed, not leased, not being written) and
removes them the moment that stops being true, so ``victim()`` never skips such keys and stays
O(1). ChainEvictor puts one policy per size class under the rule that makes what stays
reachable: a chunk goes only after every chunk stored after it in its chain.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Protocol

from kvdepot.server.index import ChunkEntry, ChunkIndex


class EvictionPolicy(Protocol):
    def insert(self, key: Hashable) -> None:
        """Add an evictable key as most recently used (or refresh it)."""

    def insert_oldest(self, key: Hashable) -> None:
        """Add an evictable key as the next to go."""

    def remove(self, key: Hashable) -> None:
        """Forget a key (no longer evictable); absent keys are ignored."""

    def touch_all(
        self, keys: Iterable[Hashable], on_missing: Callable[[Hashable], None] | None = None
    ) -> None:
        """Mark keys as just used, in order, where tracked (hot path). A key not tracked is
        passed to ``on_missing`` at its turn (which may insert it), or ignored."""

    def victim(self) -> Hashable | None:
        """The key to evict next, without removing it; None when empty."""

    def __len__(self) -> int: ...


class LRUPolicy:
    """Least recently used first. Callers touch a prefix's chunks from last to first, so the
    tail of a prefix is older than its head and goes first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def insert_oldest(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key, last=False)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def touch_all(
        self, keys: Iterable[Hashable], on_missing: Callable[[Hashable], None] | None = None
    ) -> None:
        # The loop runs in C (deque drains map): a lookup touches up to hundreds of keys. A key
        # not tracked (leased, being written, parked) stops the map after map has consumed it,
        # so the next round goes on with the key after it.
        rest = map(self._order.move_to_end, keys)
        while True:
            try:
                deque(rest, maxlen=0)
                return
            except KeyError as missing:
                if on_missing is not None:
                    on_missing(missing.args[0])

    def victim(self) -> Hashable | None:
        return next(iter(self._order), None)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order


POLICIES = {"lru": LRUPolicy}


class ChainEvictor:
    """Eviction over every size class for chunks linked into chains (see index.py).

    A chunk is evicted only when no chunk after it in its chain is in the cache: evicting it
    earlier would leave those resident but unreachable, since a lookup walks a chain from its
    head. That also keeps every chunk before a leased or half-written one. Among the chunks
    that may go, the policy's order decides. A chunk that reaches the front of the order while
    a child stays is *parked* (taken out of the order); when its last child leaves, it comes
    back at the front: its recency is its chain's, and that child was the oldest in the order.
    A parked chunk that is used again goes back as most recent. A chunk is parked at most once
    per use, so choosing a victim stays O(1) amortised, with no walk along a chain.
    """

    def __init__(
        self,
        index: ChunkIndex,
        size_class: Callable[[int], int],
        policy_factory: Callable[[], EvictionPolicy] = LRUPolicy,
    ):
        self._entries = index.entries
        self._size_class = size_class
        self._factory = policy_factory
        self.policies: dict[int, EvictionPolicy] = {}  # size class -> order of evictable keys
        self._of_slot: dict[int, EvictionPolicy] = {}  # slot bytes -> its class's policy
        self.parked: set[bytes] = set()  # evictable, but a child stays: out of the order

    def policy(self, slot_bytes: int) -> EvictionPolicy:
        policy = self._of_slot.get(slot_bytes)  # every lookup asks: no size math
        if policy is None:
            size = self._size_class(slot_bytes)
            policy = self.policies.get(size)
            if policy is None:
                policy = self.policies[size] = self._factory()
            self._of_slot[slot_bytes] = policy
        return policy

    def refresh(self, entry: ChunkEntry) -> None:
        """Put the entry in (as most recent) or out of the order, by its state."""
        self.parked.discard(entry.key)
        policy = self.policy(entry.slot_bytes)
        if entry.evictable:
            policy.insert(entry.key)
        else:
            policy.remove(entry.key)

    def refresh_prefix(self, entries: Sequence[ChunkEntry]) -> None:
        # Last chunk first: the head of a prefix ends up most recent, the tail goes first.
        for entry in reversed(entries):
            self.refresh(entry)

    def touch(self, slot_bytes: int, keys: list[bytes]) -> None:
        """Hit chunks of one prefix (in prefix order) were just used; head most recent."""
        policy = self.policy(slot_bytes)
        parked = self.parked

        def used_again(key: Hashable) -> None:  # parked: back as most recent, at its turn
            if key in parked:
                parked.remove(key)  # type: ignore[arg-type]
                policy.insert(key)

        policy.touch_all(reversed(keys), used_again if parked else None)

    def victim(self, policy: EvictionPolicy) -> ChunkEntry | None:
        """The entry to evict next from this size class (still in place), or None."""
        while (key := policy.victim()) is not None:
            entry = self._entries[key]  # type: ignore[index]
            if not entry.children:
                return entry
            policy.remove(key)
            self.parked.add(entry.key)
        return None

    def forget(self, entry: ChunkEntry) -> None:
        """The entry is leaving the index."""
        self.parked.discard(entry.key)
        self.policy(entry.slot_bytes).remove(entry.key)

    def childless(self, entry: ChunkEntry) -> None:
        """The entry's last child left the index."""
        if entry.key in self.parked:
            self.parked.remove(entry.key)
            self.policy(entry.slot_bytes).insert_oldest(entry.key)
