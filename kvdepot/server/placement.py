"""Placement: which slots of the arena chunks hold, and what leaves it when room is needed.

The arena is the tier engines read and write; every place in it is a slot of the allocator.
When a store needs a slot and none is free, chain tails go, least valuable first by the
eviction policy (eviction.py). With lower tiers configured (tiering.py), a chunk that goes
is first written down when it is not there yet; with none, it is simply dropped.

Pure: no I/O, no threads. What the edges must do is appended to ``effects``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING

from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.effects import Effect, Evicted
from kvdepot.server.eviction import ChainEvictor
from kvdepot.server.index import ChunkEntry, ChunkIndex
from kvdepot.server.locations import ARENA, MAIN_ARENA, ArenaSlot, Location
from kvdepot.server.policies import EvictionPolicy, LRUPolicy
from kvdepot.server.prefetching import PrefetchSettings
from kvdepot.server.tiering import LowerTiers

if TYPE_CHECKING:
    from kvdepot.server.cache import CacheCounters
    from kvdepot.server.tiers import TierSpec


class Placement:
    def __init__(
        self,
        index: ChunkIndex,
        allocator: SlabAllocator,
        counters: CacheCounters,
        policy_factory: Callable[[], EvictionPolicy] = LRUPolicy,
        tiers: Sequence[TierSpec] = (),
        prefetch: PrefetchSettings = PrefetchSettings(),
    ):
        self.index = index
        self.allocator = allocator  # the arena's (id MAIN_ARENA)
        self.counters = counters
        self.effects: list[Effect] = []
        self.eviction = ChainEvictor(
            index.entries, allocator.size_class, policy_factory,
            evictable=attrgetter("evictable"), blocked=attrgetter("arena_children"),
        )
        self._refused: set[bytes] = set()  # victims kept during one allocation
        self.lower = LowerTiers(self, tiers, policy_factory, prefetch) if tiers else None

    # --- places -----------------------------------------------------------------------------

    def place(self, entry: ChunkEntry, rank: int, place: Location | None) -> None:
        """Set or clear ``rank``'s arena place (the slot is the caller's)."""
        parent = self.index.place_arena(entry, rank, place)
        if parent is not None:
            self.eviction.childless(parent)

    def free(self, entry: ChunkEntry, rank: int) -> None:
        """Give ``rank``'s arena slot back and clear its place."""
        place = entry.arena[rank]
        if place is not None:
            self.allocator.free(place.where.offset)  # type: ignore[union-attr]
            self.place(entry, rank, None)

    def remove(self, entry: ChunkEntry) -> None:
        """Take an entry that has no place left out of the index."""
        self.eviction.forget(entry)
        self._unindex(entry)

    def _unindex(self, entry: ChunkEntry) -> None:
        parent = self.index.remove(entry.key)
        if self.lower is not None:
            self.lower.forget(entry)
            if parent is not None:
                self.lower.childless(parent)

    def remove_if_placeless(self, entry: ChunkEntry) -> None:
        """Take the entry out of the index if it has no place left and no lease (a lease on
        a chunk whose load failed keeps the entry until it ends)."""
        if not entry.in_arena and not entry.lower and not entry.leases:
            self.remove(entry)

    def drop_arena(self, entry: ChunkEntry) -> None:
        """Every arena place of the entry goes; the entry stays while a lower tier holds it."""
        self.eviction.forget(entry)
        index, free = self.index, self.allocator.free
        for rank, place in enumerate(entry.arena):
            if place is not None:
                free(place.where.offset)  # type: ignore[union-attr]
                parent = index.place_arena(entry, rank, None)
                if parent is not None:
                    self.eviction.childless(parent)
        self.counters.evicted_chunks += 1
        self.effects.append(Evicted(ARENA, entry.key))
        if not entry.lower:
            self._unindex(entry)

    # --- allocation -------------------------------------------------------------------------

    def allocate(self, slot_bytes: int) -> ArenaSlot | None:
        """A free slot, evicting chain tails (same size first) if the arena is full; None
        when nothing may go."""
        offset = self.allocator.allocate(slot_bytes)
        if offset is None:
            offset = self._allocate_evicting(slot_bytes)
        return None if offset is None else ArenaSlot(MAIN_ARENA, offset)

    def _allocate_evicting(self, slot_bytes: int) -> int | None:
        offset = None
        self._refused.clear()
        own = self.eviction.policy(slot_bytes)
        while offset is None and self._evict_one(own):
            offset = self.allocator.allocate(slot_bytes)
        # Other sizes free memory only when one of their slabs empties completely: take from
        # the size class with the most evictable chunks until a slab (or span) comes free.
        spent = [own]  # classes with nothing more to give to this allocation
        while offset is None:
            others = [p for p in self.eviction.policies.values() if p not in spent and len(p)]
            if not others:
                return None
            policy = max(others, key=len)
            if self._evict_one(policy):
                offset = self.allocator.allocate(slot_bytes)
            else:
                spent.append(policy)
        return offset

    def _evict_one(self, policy: EvictionPolicy) -> bool:
        """Make one chunk leave this size class (or start leaving: written down first)."""
        lower = self.lower
        if lower is None:
            victim = self.eviction.victim(policy)
            if victim is None:
                return False
            self.drop_arena(victim)
            return True
        refused = self._refused
        victim = self.eviction.victim(
            policy, lambda e: e.key in refused or not lower.may_leave_arena(e)
        )
        if victim is None:
            return False
        if not lower.arena_victim(victim):
            refused.add(victim.key)  # it stays: back in the order, passed over from now on
            self.eviction.refresh(victim)
        return True

    # --- operator ---------------------------------------------------------------------------

    def clear(self) -> int:
        """Drop every chunk nobody holds, in every tier, tails first; how many left the
        arena."""
        lower = self.lower
        stays = None if lower is None else (lambda e: e.children > 0 and not lower.has_copy(e))
        evicted = 0
        while True:
            dropped = 0
            for policy in list(self.eviction.policies.values()):
                while (victim := self.eviction.victim(policy, stays)) is not None:
                    self.drop_arena(victim)
                    dropped += 1
            evicted += dropped
            if lower is None:
                return evicted
            # A lower tier's tails may let arena chunks whose children it held go next round.
            if not lower.clear() and not dropped:
                return evicted
