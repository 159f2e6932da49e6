"""Eviction over chains: which chunk leaves a tier next.

A policy (policies/) orders the keys that may go. ChainEvictor puts one policy per size class
of a tier under the rule that keeps what stays reachable: a chunk leaves a tier only after
every chunk stored after it in its chain has left it (``blocked``), since a lookup walks a
chain from its head. That also keeps every chunk before a leased or half-written one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from kvdepot.server.index import ChunkEntry
from kvdepot.server.policies import EvictionPolicy, LRUPolicy


class _Passed:
    """What ChainEvictor hands a policy as ``protected``: keys whose chain still needs them
    (noted, to be parked) and keys the caller keeps for now (``stays``)."""

    __slots__ = ("entries", "blocked", "stays", "met")

    def __init__(self, entries, blocked) -> None:
        self.entries = entries
        self.blocked = blocked
        self.stays: Callable[[ChunkEntry], bool] | None = None
        self.met: dict[bytes, None] = {}

    def __contains__(self, key: bytes) -> bool:
        entry = self.entries[key]
        if self.blocked(entry):
            self.met[key] = None
            return True
        return self.stays is not None and self.stays(entry)


class ChainEvictor:
    """Eviction over every size class of one tier, for chunks linked into chains (index.py).

    Among the chunks that may go, the policy's order decides. A chunk the policy offers while
    a child stays in the tier is *parked* (held, out of the policy's choice); when its last
    child leaves, it comes back as the next to go: its standing is its chain's, and that child
    was the one going. A parked chunk that is used again comes back by the policy's rule. A
    chunk is parked at most once per use, so choosing a victim stays O(1) amortised, with no
    walk along a chain.

    ``evictable(entry)``: nothing holds the entry's places in this tier. ``blocked(entry)``:
    a chunk after it in its chain keeps it in this tier.
    """

    def __init__(
        self,
        entries: dict[bytes, ChunkEntry],
        size_class: Callable[[int], int],
        policy_factory: Callable[[], EvictionPolicy] = LRUPolicy,
        *,
        evictable: Callable[[ChunkEntry], bool],
        blocked: Callable[[ChunkEntry], bool],
    ):
        self._entries = entries
        self._size_class = size_class
        self._factory = policy_factory
        self._evictable = evictable
        self._blocked = blocked
        self.policies: dict[int, EvictionPolicy] = {}  # size class -> order of evictable keys
        self._of_slot: dict[int, EvictionPolicy] = {}  # slot bytes -> its class's policy
        self.parked: set[bytes] = set()  # evictable, but a child stays: held
        self._passed = _Passed(entries, blocked)  # one per evictor: victims are chosen often

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
        """The entry's state changed: tell the policy whether it may go now. An entry's first
        evictable moment in the tier is its insertion; a parked entry is in use again."""
        key = entry.key
        self.parked.discard(key)
        policy = self._of_slot.get(entry.slot_bytes)
        if policy is None:
            policy = self.policy(entry.slot_bytes)
        if not self._evictable(entry):
            policy.hold(key)
        elif not policy.release(key):
            policy.insert(key)

    def refresh_prefix(self, entries: Sequence[ChunkEntry]) -> None:
        # Last chunk first: the head of a prefix comes last (for LRU: most recent).
        for entry in reversed(entries):
            self.refresh(entry)

    def touch(self, slot_bytes: int, keys: list[bytes]) -> None:
        """Hit chunks of one prefix (in prefix order) were just used."""
        policy = self.policy(slot_bytes)
        parked = self.parked

        def used_again(key: Hashable) -> None:  # parked: back by the policy's rule, at its turn
            if key in parked:
                parked.remove(key)  # type: ignore[arg-type]
                policy.release(key)

        policy.touch(reversed(keys), used_again if parked else None)

    def victim(
        self, policy: EvictionPolicy, stays: Callable[[ChunkEntry], bool] | None = None
    ) -> ChunkEntry | None:
        """The entry to go next from this size class, no longer in the policy (its places
        are the caller's to take), or None. ``stays(entry)``: the caller keeps it for now."""
        passed = self._passed
        passed.stays = stays
        chosen = policy.evict(1, passed)
        if passed.met:
            for key in passed.met:
                policy.hold(key)
                self.parked.add(key)
            passed.met.clear()
        return self._entries[chosen[0]] if chosen else None  # type: ignore[index]

    def forget(self, entry: ChunkEntry) -> None:
        """The entry left the tier."""
        self.parked.discard(entry.key)
        self.policy(entry.slot_bytes).remove(entry.key)

    def childless(self, entry: ChunkEntry) -> None:
        """The entry's last child left the tier."""
        if entry.key in self.parked:
            self.parked.remove(entry.key)
            self.policy(entry.slot_bytes).release(entry.key, first=True)
