"""The core's consistency check, for tests: every count, set and order agrees with the places.

Expensive (it walks everything); tests call it through ``CacheCore.check_invariants``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvdepot.server.locations import ARENA, READABLE, ArenaSlot, State

if TYPE_CHECKING:
    from kvdepot.server.cache import CacheCore
    from kvdepot.server.eviction import ChainEvictor
    from kvdepot.server.index import ChunkEntry


def check_core(core: CacheCore) -> None:
    places = core.places
    lower = places.lower
    used = 0
    lower_used = dict.fromkeys(lower.books if lower else (), 0)
    for entry in core.index.entries.values():
        _check_counts(entry)
        # A lease keeps an entry whose load failed (no place left) until it ends.
        assert entry.in_arena or entry.lower or entry.leases, f"an entry with no place: {entry}"
        assert entry.pins == 0, entry
        used += len(entry.offsets()) * core.allocator.size_class(entry.slot_bytes)
        for name, per_rank in (entry.lower or {}).items():
            assert lower is not None and name in lower.books, entry
            for place in per_rank:
                if place is not None:
                    assert place.tier == name and place.state is not State.WRITING, entry
                    lower_used[name] += lower.books[name].spec.footprint(entry.slot_bytes)
        _check_order(places.eviction, entry, entry.evictable if entry.in_arena else None)
        if lower is not None:
            for name, books in lower.books.items():
                present = bool(entry.lower and name in entry.lower)
                evictable = present and all(
                    p is None or p.state is State.READY for p in entry.lower[name]  # type: ignore[index]
                )
                _check_order(books.evictor, entry, evictable if present else None)
    core.index.check_links()
    assert places.eviction.parked <= core.index.entries.keys()
    assert used == core.allocator.used_bytes, (used, core.allocator.used_bytes)
    for ns_id, keys in core.index.complete.items():
        assert keys == {
            k for k, e in core.index.entries.items() if e.namespace == ns_id and e.complete
        }
    assert sum(len(lease.keys) + len(lease.loading) for lease in core.leases.items.values()) == sum(
        e.leases for e in core.index.entries.values()
    )
    for reservation in core.reservations.items.values():
        for key, offset in reservation.items:
            place = core.index.entries[key].arena[reservation.rank]
            assert place is not None and place.state is State.WRITING, (key, place)
            assert place.where.offset == offset  # type: ignore[union-attr]
    if lower is None:
        assert not any(e.lower for e in core.index.entries.values())
        # Every entry is in the arena: a child with an arena place is any child.
        assert all(e.arena_children == e.children for e in core.index.entries.values())
        return
    _check_jobs(core, lower_used)


def _check_counts(entry: ChunkEntry) -> None:
    states = [p.state for p in entry.arena if p is not None]
    for place in entry.arena:
        if place is not None:
            assert place.tier == ARENA and isinstance(place.where, ArenaSlot), entry
    assert entry.committed_ranks == sum(s in READABLE for s in states), entry
    assert entry.pending_ranks == states.count(State.WRITING), entry
    assert entry.loading_ranks == states.count(State.LOADING_IN), entry
    assert entry.copying_ranks == states.count(State.COPYING_OUT), entry


def _check_order(evictor: ChainEvictor, entry: ChunkEntry, evictable: bool | None) -> None:
    """``evictable`` None: the entry has no place in the evictor's tier."""
    policy = evictor.policy(entry.slot_bytes)
    in_order = entry.key in policy
    parked = entry.key in evictor.parked
    if evictable is None:
        assert not policy.tracks(entry.key) and not parked, entry
        return
    assert in_order + parked == evictable, (entry, in_order, parked)  # one of them, iff evictable
    assert not parked or policy.tracks(entry.key), entry  # a parked chunk is held


def _check_jobs(core: CacheCore, lower_used: dict[str, int]) -> None:
    lower = core.places.lower
    assert lower is not None
    in_flight = dict.fromkeys(lower.books, 0)
    demoting: dict[bytes, int] = {}
    for job in lower.jobs.values():
        in_flight[job.tier] += 1
        entry = core.index.entries[job.key]
        arena = entry.arena[job.rank]
        below = entry.places_in(job.tier)[job.rank]
        assert arena is not None and below is not None, (job, entry)
        if job.demote:
            assert (arena.state, below.state) == (State.COPYING_OUT, State.LOADING_IN), job
            if job.evicting:
                demoting[job.key] = demoting.get(job.key, 0) + 1
        else:
            assert (arena.state, below.state) == (State.LOADING_IN, State.COPYING_OUT), job
    assert demoting == lower.demoting
    # Demotions reading one arena slot (to several tiers at once), counted per (key, rank).
    reading: dict[tuple[bytes, int], int] = {}
    for job in lower.jobs.values():
        if job.demote:
            reading[(job.key, job.rank)] = reading.get((job.key, job.rank), 0) + 1
    assert reading == lower.reading, (reading, lower.reading)
    # Deadlines only of chunks loading now.
    assert all(core.index.entries[k].loading_ranks for k in lower.deadlines), "a stale deadline"
    waiting = {(digest, where) for digest, found in lower.waiting.items() for where in found}
    for name, books in lower.books.items():
        for where, chunk in books.orphans.items():
            assert (chunk.namespace, where) in waiting and lower.waiting[chunk.namespace][where] == name
            assert core.index.namespace_for_digest(chunk.namespace) is None, "adopt at Register"
            lower_used[name] += books.spec.footprint(chunk.nbytes)
    assert len(waiting) == sum(len(b.orphans) for b in lower.books.values())
    copies = sum(
        p is not None and p.state in (State.COPYING_OUT, State.LOADING_IN)
        for e in core.index.entries.values() for p in e.arena
    )
    places_in_copy = {(j.key, j.rank) for j in lower.jobs.values()}
    assert copies == len(places_in_copy), "an arena place in a copy with no job"
    for name, books in lower.books.items():
        assert books.in_flight == in_flight[name] <= books.spec.queue_depth, name
        assert books.used_bytes == lower_used[name] <= books.spec.capacity_bytes, name
