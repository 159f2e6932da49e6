"""The books of the tiers below the arena: what each holds, what is being copied, what goes.

Pure, like the rest of the core: a copy between tiers is started by appending an effect
(``Demote``, ``Prefetch``, ``Delete``) and ends when its completion comes back
(``complete``). Until then both places stay put: the source is COPYING_OUT (readable, kept),
the target LOADING_IN (unreadable, kept).

- Write-back: a chunk chosen to leave the arena that no lower tier holds yet is demoted to the
  first tier with room and a free queue slot; its arena slots go when the copy is done (if
  nobody holds them then). Meanwhile the eviction goes on to the next victim, and a store
  that finds nothing else to evict gets NO_SPACE: it never waits for a copy. When no tier can
  take a victim (queues full), it is dropped as before and counted (``unwritten``), unless
  chunks after it in its chain live only in a lower tier (then it stays: they need it).
- Prefetch: a leased lookup whose hit prefix continues in a lower tier starts copies of those
  chunks into fresh arena slots; a later lookup hits them once they landed.
- Each tier has a byte cap and its own eviction (tails first, by the same policy as the
  arena): a chunk leaves the index only when it has no place left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvdepot.server.effects import Delete, Demote, DemotionDone, Evicted, Prefetch, PrefetchDone
from kvdepot.server.eviction import ChainEvictor
from kvdepot.server.index import ChunkEntry, NamespaceInfo
from kvdepot.server.locations import ARENA, ArenaSlot, Location, State
from kvdepot.server.policies import EvictionPolicy

if TYPE_CHECKING:
    from kvdepot.server.placement import Placement
    from kvdepot.server.tiers import TierSpec

MAX_PREFETCH_CHUNKS = 64  # per lookup


@dataclass
class TierBooks:
    spec: TierSpec
    evictor: ChainEvictor
    used_bytes: int = 0
    in_flight: int = 0  # copies to or from it


@dataclass(frozen=True, slots=True)
class _Job:
    demote: bool
    tier: str
    key: bytes
    rank: int


class LowerTiers:
    def __init__(
        self, placement: Placement, specs: Sequence[TierSpec],
        policy_factory: Callable[[], EvictionPolicy],
    ):
        names = [s.name for s in specs]
        if ARENA in names or len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique and not {ARENA!r}: {names}")
        self.placement = placement
        self.index = placement.index
        self.books: dict[str, TierBooks] = {}
        for spec in specs:
            name = spec.name
            self.books[name] = TierBooks(spec, ChainEvictor(
                self.index.entries, lambda _: 0, policy_factory,
                evictable=lambda e, name=name: _all_ready(e.places_in(name)),
                # Its last place: a chunk after it in its chain, anywhere, needs it.
                blocked=lambda e: e.children > 0 and not e.in_arena and len(e.lower or ()) <= 1,
            ))
        self.jobs: dict[int, _Job] = {}
        self._next_job = 1
        self.demoting: dict[bytes, int] = {}  # key -> its demotion jobs in flight
        # Chunks that left the arena unwritten: no tier could take them then (queues full).
        self.unwritten = 0

    # --- arena evictions --------------------------------------------------------------------

    def has_copy(self, entry: ChunkEntry) -> bool:
        """Does a lower tier hold every rank the arena holds, ready?"""
        return all(
            self._ready_below(entry, rank) for rank, p in enumerate(entry.arena) if p is not None
        )

    def may_leave_arena(self, entry: ChunkEntry) -> bool:
        """Could the entry leave the arena now without stranding chunks after it?"""
        return entry.children == 0 or self.has_copy(entry) or self._target(entry) is not None

    def arena_victim(self, entry: ChunkEntry) -> bool:
        """The entry was chosen to leave the arena (it is evictable). True when its arena
        places are gone now; False when they stay: being written down, or kept."""
        placement = self.placement
        if self.has_copy(entry):
            placement.drop_arena(entry)
            return True
        books = self._target(entry)
        if books is not None and self._make_room(books, self._missing_bytes(entry, books), entry):
            self._demote(entry, books)
            return False
        if entry.children == 0:
            self.unwritten += 1
            placement.drop_arena(entry)
            return True
        return False

    def _target(self, entry: ChunkEntry) -> TierBooks | None:
        """The first tier that may take the entry's missing ranks now (queue and cap)."""
        for books in self.books.values():
            ranks = len(self._missing_ranks(entry, books))
            if (
                books.in_flight + ranks <= books.spec.queue_depth
                and ranks * entry.slot_bytes <= books.spec.capacity_bytes
            ):
                return books
        return None

    def _missing_ranks(self, entry: ChunkEntry, books: TierBooks) -> list[int]:
        below = entry.places_in(books.spec.name)
        return [r for r, p in enumerate(entry.arena) if p is not None and below[r] is None]

    def _missing_bytes(self, entry: ChunkEntry, books: TierBooks) -> int:
        return len(self._missing_ranks(entry, books)) * entry.slot_bytes

    def _demote(self, entry: ChunkEntry, books: TierBooks) -> None:
        ns = self.index.namespaces[entry.namespace]
        name = books.spec.name
        for rank in self._missing_ranks(entry, books):
            source = entry.arena[rank]
            target = books.spec.locate(ns.digest, entry.key, rank)
            self.placement.place(entry, rank, _moved(source, State.COPYING_OUT))
            self.index.place_lower(entry, name, rank, Location(name, target, State.LOADING_IN))
            books.used_bytes += entry.slot_bytes
            job = self._start(_Job(True, name, entry.key, rank), books)
            self.placement.effects.append(Demote(
                job, name, ns.digest, entry.key, rank, _moved(source, State.COPYING_OUT).where,
                entry.slot_bytes, target,
            ))
            self.demoting[entry.key] = self.demoting.get(entry.key, 0) + 1
        books.evictor.refresh(entry)

    # --- prefetch ---------------------------------------------------------------------------

    def prefetch(self, ns: NamespaceInfo, keys: list[bytes]) -> int:
        """Start copies into the arena of the chunks after a lookup's hits (``keys``, in
        prefix order) that lower tiers hold, up to the first that none does; how many
        chunks are on their way."""
        placement, entries = self.placement, self.index.entries
        started = 0
        for key in keys[:MAX_PREFETCH_CHUNKS]:
            entry = entries.get(key)
            if entry is None or entry.namespace != ns.id:
                break
            sources = []
            for rank, place in enumerate(entry.arena):
                if place is None:
                    books = self._source(entry, rank)
                    if books is None:
                        return started
                    sources.append((rank, books))
            if not sources:
                continue  # in the arena already, or on its way
            if any(
                b.in_flight + sum(x is b for _, x in sources) > b.spec.queue_depth
                for _, b in sources
            ):
                break
            # Our allocations may evict: not the ranks it has in the arena (pinned), nor the
            # copies we read (COPYING_OUT from here on).
            entry.pins += 1
            placement.eviction.refresh(entry)
            for rank, books in sources:
                self._mark_source(entry, rank, books, State.COPYING_OUT)
            slots = []
            for _ in sources:
                slot = placement.allocate(entry.slot_bytes)
                if slot is None:
                    break
                slots.append(slot)
            entry.pins -= 1
            over = any(  # demotions our evictions started took the queue slots
                b.in_flight + sum(x is b for _, x in sources) > b.spec.queue_depth
                for _, b in sources
            )
            if len(slots) < len(sources) or over:
                for slot in slots:
                    placement.allocator.free(slot.offset)
                for rank, books in sources:
                    self._mark_source(entry, rank, books, State.READY)
                placement.eviction.refresh(entry)
                break
            for (rank, books), slot in zip(sources, slots):
                self._prefetch(ns, entry, rank, books, slot)
            placement.eviction.refresh(entry)
            started += 1
        return started

    def _mark_source(self, entry: ChunkEntry, rank: int, books: TierBooks, state: State) -> None:
        name = books.spec.name
        self.index.place_lower(entry, name, rank, _moved(entry.places_in(name)[rank], state))
        books.evictor.refresh(entry)

    def _source(self, entry: ChunkEntry, rank: int) -> TierBooks | None:
        for books in self.books.values():
            place = entry.places_in(books.spec.name)[rank]
            if place is not None and place.state is State.READY:
                return books
        return None

    def _prefetch(
        self, ns: NamespaceInfo, entry: ChunkEntry, rank: int, books: TierBooks, slot: ArenaSlot
    ) -> None:
        name = books.spec.name
        source = _moved(entry.places_in(name)[rank], State.COPYING_OUT)  # it is already
        self.placement.place(entry, rank, Location(ARENA, slot, State.LOADING_IN))
        job = self._start(_Job(False, name, entry.key, rank), books)
        self.placement.effects.append(Prefetch(
            job, name, ns.digest, entry.key, rank, source.where, slot, entry.slot_bytes,
        ))
        books.evictor.refresh(entry)

    # --- completions ------------------------------------------------------------------------

    def _start(self, job: _Job, books: TierBooks) -> int:
        job_id = self._next_job
        self._next_job += 1
        self.jobs[job_id] = job
        books.in_flight += 1
        return job_id

    def complete(self, done: DemotionDone | PrefetchDone) -> bool:
        """Apply a copy's end; False for a job this core does not know (already applied)."""
        job = self.jobs.pop(done.job, None)
        if job is None or job.demote != isinstance(done, DemotionDone):
            if job is not None:
                self.jobs[done.job] = job
            return False
        books = self.books[job.tier]
        books.in_flight -= 1
        entry = self.index.entries[job.key]  # places in a copy never leave
        if job.demote:
            self._demotion_done(entry, job, books, done.ok)
        else:
            self._prefetch_done(entry, job, books, done.ok)
        return True

    def _demotion_done(self, entry: ChunkEntry, job: _Job, books: TierBooks, ok: bool) -> None:
        placement, rank = self.placement, job.rank
        placement.place(entry, rank, _moved(entry.arena[rank], State.READY))
        target = entry.places_in(job.tier)[rank]
        if ok:
            self.index.place_lower(entry, job.tier, rank, _moved(target, State.READY))
        else:
            self.index.place_lower(entry, job.tier, rank, None)
            books.used_bytes -= entry.slot_bytes
        self._refresh_below(books, entry)
        left = self.demoting[entry.key] - 1
        if left:
            self.demoting[entry.key] = left
            return
        del self.demoting[entry.key]
        # The eviction that started it goes through unless the arena has needed it since
        # (leased, or a chunk after it stored there), or the copy failed and chunks after it
        # live only below.
        may_go = entry.children == 0 or self.has_copy(entry)
        if entry.evictable and not entry.arena_children and may_go:
            placement.drop_arena(entry)
        else:
            placement.eviction.refresh(entry)

    def _prefetch_done(self, entry: ChunkEntry, job: _Job, books: TierBooks, ok: bool) -> None:
        placement, rank = self.placement, job.rank
        source = entry.places_in(job.tier)[rank]
        if ok:
            placement.place(entry, rank, _moved(entry.arena[rank], State.READY))
            self.index.place_lower(entry, job.tier, rank, _moved(source, State.READY))
        else:
            # The tier found its copy unreadable and dropped it; the slot's bytes are junk.
            placement.free(entry, rank)
            self.index.place_lower(entry, job.tier, rank, None)
            books.used_bytes -= entry.slot_bytes
        self._refresh_below(books, entry)
        placement.eviction.refresh(entry)
        placement.remove_if_placeless(entry)

    def _refresh_below(self, books: TierBooks, entry: ChunkEntry) -> None:
        if entry.lower and books.spec.name in entry.lower:
            books.evictor.refresh(entry)
        else:
            books.evictor.forget(entry)

    # --- the tiers' own evictions -----------------------------------------------------------

    def _make_room(self, books: TierBooks, nbytes: int, keep: ChunkEntry) -> bool:
        """Evict from the tier until ``nbytes`` more fit (never ``keep``)."""
        while books.used_bytes + nbytes > books.spec.capacity_bytes:
            victim = None
            for policy in books.evictor.policies.values():
                victim = books.evictor.victim(policy, lambda e: e is keep)
                if victim is not None:
                    break
            if victim is None:
                return False
            self._drop(books, victim)
        return True

    def _drop(self, books: TierBooks, entry: ChunkEntry) -> None:
        name = books.spec.name
        digest = self.index.namespaces[entry.namespace].digest
        books.evictor.forget(entry)
        for rank, place in enumerate(entry.places_in(name)):
            if place is not None:
                self.placement.effects.append(Delete(name, digest, entry.key, rank, place.where))
                self.index.place_lower(entry, name, rank, None)
                books.used_bytes -= entry.slot_bytes
        self.placement.effects.append(Evicted(name, entry.key))
        self.placement.remove_if_placeless(entry)

    def childless(self, entry: ChunkEntry) -> None:
        """The entry's last child left the index."""
        for books in self.books.values():
            books.evictor.childless(entry)

    def forget(self, entry: ChunkEntry) -> None:
        """The entry left the index."""
        for books in self.books.values():
            books.evictor.forget(entry)

    def clear(self) -> int:
        """Drop every chunk nobody holds from every tier; how many places went."""
        dropped = 0
        for books in self.books.values():
            for policy in list(books.evictor.policies.values()):
                while (victim := books.evictor.victim(policy)) is not None:
                    self._drop(books, victim)
                    dropped += 1
        return dropped

    def _ready_below(self, entry: ChunkEntry, rank: int) -> bool:
        return self._source(entry, rank) is not None


def _moved(place: Location | None, state: State) -> Location:
    """The same place in another state (a place in a copy or being moved always exists)."""
    assert place is not None
    return place.moved(state)


def _all_ready(places: list[Location | None]) -> bool:
    return any(places) and all(p is None or p.state is State.READY for p in places)
