"""The books of the tiers below the arena: what each holds, what is being copied, what goes.

Pure, like the rest of the core: a copy between tiers is started by appending an effect
(``Demote``, ``Prefetch``, ``Delete``) and ends when its completion comes back
(``complete``). Until then both places stay put: the source is COPYING_OUT (readable, kept),
the target LOADING_IN (unreadable, kept).

- Write-back: a chunk chosen to leave the arena that no lower tier holds yet is demoted to the
  first tier that admits it (``TierSpec.admit_hits``) with room and a free queue slot; its
  arena slots go when the copy is done (if nobody holds them then). Meanwhile the eviction
  goes on to the next victim, and a store that finds nothing else to evict gets NO_SPACE: it
  never waits for a copy. When no tier can take a victim (queues full), it is dropped as
  before and counted (``unwritten``, the tier's ``dropped_writes``), unless chunks after it in
  its chain live only in a lower tier (then it stays: they need it).
- Write-through (``TierSpec.write_through``): a chunk is also written as soon as it is
  complete in the arena and admitted; a full queue skips it (counted; write-back may still
  write it when it is evicted).
- Prefetch (prefetching.py): a leased lookup whose hit prefix continues in a lower tier starts
  copies of those chunks into fresh arena slots, answers them as pending until they land or
  their deadline passes, and leases them for the engine that waits.
- Probe (probing.py): where the prefix ends at a key the index has never seen, a shared tier
  (``TierSpec.shared``: other nodes write it too) is asked for the chunks from there; what it
  holds joins the index and loads as above.
- Every tier that writes (``TierSpec.writes``) and admits a chunk gets it when it leaves the
  arena, unless it holds it already: a disk and a shared store both.
- Chunks a tier found at start wait for their namespace (adoption.py).
- Each tier has a byte cap (footprints: a file's header and padding count) and its own
  eviction (tails first, by the same policy as the arena; chunks still waiting for their
  namespace, the oldest, go first): a chunk leaves the index only when it has no place left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvdepot.server.adoption import Adoption
from kvdepot.server.effects import Delete, Demote, DemotionDone, Evicted, PrefetchDone, ProbeDone
from kvdepot.server.eviction import ChainEvictor
from kvdepot.server.index import ChunkEntry
from kvdepot.server.locations import ARENA, Location, State, Where
from kvdepot.server.policies import EvictionPolicy
from kvdepot.server.prefetching import MAX_PREFETCH_CHUNKS, PrefetchPath, PrefetchSettings
from kvdepot.server.probing import ProbeJob, ProbePath

if TYPE_CHECKING:
    from kvdepot.server.placement import Placement
    from kvdepot.server.tiers import StoredChunk, TierSpec

_SPEED_WEIGHT = 0.25  # of each measured read in the running estimate of a tier's read speed


@dataclass
class TierCounters:
    dropped_writes: int = 0  # wanted, never started: the queue was full (or no room)
    not_admitted: int = 0  # left the arena unwritten: too few hits
    prefetch_started: int = 0  # chunks
    prefetch_landed: int = 0
    prefetch_timeouts: int = 0
    prefetch_skipped: int = 0
    probes: int = 0  # a shared tier asked for chunks the index did not know
    probe_found: int = 0  # chunks it held
    probe_errors: int = 0


@dataclass
class TierBooks:
    spec: TierSpec
    evictor: ChainEvictor
    used_bytes: int = 0  # footprints of its places and of the chunks waiting in it
    in_flight: int = 0  # copies to or from it
    read_bytes_per_s: float = 0.0  # the expected load speed: the spec's, then measured
    skipped_since_sample: int = 0
    # Found at start, waiting for an engine to register their namespace; oldest first.
    orphans: dict[Where, StoredChunk] = field(default_factory=dict)
    counters: TierCounters = field(default_factory=TierCounters)


@dataclass(frozen=True, slots=True)
class _Job:
    demote: bool
    tier: str
    key: bytes
    rank: int
    evicting: bool = False  # a demotion an arena eviction waits for (not write-through)


class LowerTiers(PrefetchPath, ProbePath, Adoption):
    def __init__(
        self, placement: Placement, specs: Sequence[TierSpec],
        policy_factory: Callable[[], EvictionPolicy], prefetch: PrefetchSettings,
    ):
        names = [s.name for s in specs]
        if ARENA in names or len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique and not {ARENA!r}: {names}")
        self.placement = placement
        self.index = placement.index
        self.settings = prefetch
        self.books: dict[str, TierBooks] = {}
        for spec in specs:
            name = spec.name
            self.books[name] = TierBooks(spec, ChainEvictor(
                self.index.entries, lambda _: 0, policy_factory,
                evictable=lambda e, name=name: _all_ready(e.places_in(name)),
                # Its last place: a chunk after it in its chain, anywhere, needs it.
                blocked=lambda e: e.children > 0 and not e.in_arena and len(e.lower or ()) <= 1,
            ), read_bytes_per_s=spec.read_bytes_per_s)
        self._through = [b for b in self.books.values() if b.spec.write_through and b.spec.writes]
        self._shared = [b for b in self.books.values() if b.spec.shared]
        self._max_probe = MAX_PREFETCH_CHUNKS
        self.probes: dict[int, ProbeJob] = {}  # job -> the probe in flight
        self.probed: dict[bytes, tuple[int, float]] = {}  # first key -> (probe job or 0, until)
        # Lookups count hits per chunk only when some tier admits by them.
        self.counts_hits = any(s.admit_hits for s in specs)
        self.jobs: dict[int, _Job] = {}
        self._next_job = 1
        self.demoting: dict[bytes, int] = {}  # key -> its evicting demotion jobs in flight
        # (key, rank) -> demotions reading that arena slot now (to several tiers at once): it
        # stays COPYING_OUT, never evictable, until the last one ends.
        self.reading: dict[tuple[bytes, int], int] = {}
        # Chunks that left the arena unwritten: no tier could take them then (queues full).
        self.unwritten = 0
        self.deadlines: dict[bytes, float] = {}  # loading for a lookup -> missed after this
        self.waiting: dict[bytes, dict[Where, str]] = {}  # digest -> found chunk -> its tier

    # --- arena evictions --------------------------------------------------------------------

    def has_copy(self, entry: ChunkEntry) -> bool:
        """Does a lower tier hold every rank the arena holds, ready?"""
        return all(
            self._ready_below(entry, rank) for rank, p in enumerate(entry.arena) if p is not None
        )

    def may_leave_arena(self, entry: ChunkEntry) -> bool:
        """Could the entry leave the arena now without stranding chunks after it?"""
        return entry.children == 0 or self.has_copy(entry) or any(self._targets(entry))

    def arena_victim(self, entry: ChunkEntry) -> bool:
        """The entry was chosen to leave the arena (it is evictable). True when its arena
        places are gone now; False when they stay: being written down, or kept."""
        placement = self.placement
        started = False
        for books in self._targets(entry):
            if self._make_room(books, self._missing_bytes(entry, books), entry):
                self._demote(entry, books, evicting=True)
                started = True
        if started:
            return False
        if self.has_copy(entry):
            placement.drop_arena(entry)
            return True
        if entry.children == 0:
            admitting = [b for b in self.books.values() if self._admits(b, entry)]
            if admitting:
                self.unwritten += 1
                admitting[0].counters.dropped_writes += 1
            else:
                next(iter(self.books.values())).counters.not_admitted += 1
            placement.drop_arena(entry)
            return True
        return False

    def committed(self, entries: list[ChunkEntry]) -> None:
        """Chunks were just committed in the arena: write-through tiers take the complete
        ones."""
        if self._through:
            for entry in entries:
                self.write_through(entry)

    def count_hits(self, keys: list[bytes]) -> None:
        """A lookup hit these chunks (admission by hits); a write-through tier takes a chunk
        the moment it is admitted."""
        entries = self.index.entries
        for key in keys:
            entry = entries[key]
            entry.hits += 1
            for books in self._through:
                if entry.hits == books.spec.admit_hits:
                    self.write_through(entry)

    def write_through(self, entry: ChunkEntry) -> None:
        """Write a complete chunk to every write-through tier that admits it and lacks it."""
        if not entry.complete:
            return
        for books in self._through:
            if not self._admits(books, entry):
                continue
            missing = self._missing_bytes(entry, books)
            if not missing:
                continue  # held there, or on its way already
            if not self._fits_queue(entry, books) or not self._make_room(books, missing, entry):
                books.counters.dropped_writes += 1
                continue
            self._demote(entry, books, evicting=False)

    def _admits(self, books: TierBooks, entry: ChunkEntry) -> bool:
        # Chunks after it living only below make it worth its place whatever its hits.
        return books.spec.writes and (entry.hits >= books.spec.admit_hits or entry.children > 0)

    def _fits_queue(self, entry: ChunkEntry, books: TierBooks) -> bool:
        ranks = len(self._missing_ranks(entry, books))
        return (
            books.in_flight + ranks <= books.spec.queue_depth
            and ranks * books.spec.footprint(entry.slot_bytes) <= books.spec.capacity_bytes
        )

    def _targets(self, entry: ChunkEntry):
        """The tiers that admit the entry, lack some of its ranks and may take them now."""
        for books in self.books.values():
            if (
                self._admits(books, entry) and self._missing_ranks(entry, books)
                and self._fits_queue(entry, books)
            ):
                yield books

    def _missing_ranks(self, entry: ChunkEntry, books: TierBooks) -> list[int]:
        below = entry.places_in(books.spec.name)
        return [r for r, p in enumerate(entry.arena) if p is not None and below[r] is None]

    def _missing_bytes(self, entry: ChunkEntry, books: TierBooks) -> int:
        return len(self._missing_ranks(entry, books)) * books.spec.footprint(entry.slot_bytes)

    def _demote(self, entry: ChunkEntry, books: TierBooks, evicting: bool) -> None:
        ns = self.index.namespaces[entry.namespace]
        name = books.spec.name
        parent = self.index.resident_parent(entry)
        parent_key = b"" if parent is None else parent.key
        footprint = books.spec.footprint(entry.slot_bytes)
        for rank in self._missing_ranks(entry, books):
            source = _moved(entry.arena[rank], State.COPYING_OUT)
            target = books.spec.locate(ns.digest, entry.key, rank)
            self.placement.place(entry, rank, source)
            self.index.place_lower(entry, name, rank, Location(name, target, State.LOADING_IN))
            books.used_bytes += footprint
            self.reading[(entry.key, rank)] = self.reading.get((entry.key, rank), 0) + 1
            job = self._start(_Job(True, name, entry.key, rank, evicting), books)
            self.placement.effects.append(Demote(
                job, name, ns.digest, entry.key, rank, source.where, entry.slot_bytes, target,
                parent_key,
            ))
            if evicting:
                self.demoting[entry.key] = self.demoting.get(entry.key, 0) + 1
        books.evictor.refresh(entry)
        if not evicting:
            self.placement.eviction.refresh(entry)  # being copied: it stays until done

    # --- completions ------------------------------------------------------------------------

    def _start_load(self, books: TierBooks, key: bytes, rank: int) -> int:
        return self._start(_Job(False, books.spec.name, key, rank), books)

    def _start(self, job: _Job, books: TierBooks) -> int:
        job_id = self._next_job
        self._next_job += 1
        self.jobs[job_id] = job
        books.in_flight += 1
        return job_id

    def complete(self, done: DemotionDone | PrefetchDone | ProbeDone, now: float) -> bool:
        """Apply a copy's or probe's end (``now``: the RPC thread's clock, for the deadlines
        of loads a probe starts); False for a job this core does not know (already applied)."""
        if isinstance(done, ProbeDone):
            return self.probe_done(done, now)
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
            self._prefetch_done(entry, job, books, done)  # type: ignore[arg-type]
        return True

    def _demotion_done(self, entry: ChunkEntry, job: _Job, books: TierBooks, ok: bool) -> None:
        placement, rank = self.placement, job.rank
        readers = self.reading.pop((entry.key, rank)) - 1
        if readers:
            self.reading[(entry.key, rank)] = readers  # another tier still copies the slot
        else:
            placement.place(entry, rank, _moved(entry.arena[rank], State.READY))
        target = entry.places_in(job.tier)[rank]
        if ok:
            self.index.place_lower(entry, job.tier, rank, _moved(target, State.READY))
        else:
            self.index.place_lower(entry, job.tier, rank, None)
            books.used_bytes -= books.spec.footprint(entry.slot_bytes)
        self._refresh_below(books, entry)
        if not job.evicting:
            placement.eviction.refresh(entry)  # written through: evictable again
            return
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

    def _prefetch_done(
        self, entry: ChunkEntry, job: _Job, books: TierBooks, done: PrefetchDone
    ) -> None:
        placement, rank = self.placement, job.rank
        source = entry.places_in(job.tier)[rank]
        if done.ok:
            placement.place(entry, rank, _moved(entry.arena[rank], State.READY))
            self.index.place_lower(entry, job.tier, rank, _moved(source, State.READY))
            if done.seconds > 0:
                measured = entry.slot_bytes / done.seconds
                books.read_bytes_per_s += _SPEED_WEIGHT * (measured - books.read_bytes_per_s)
        else:
            # The tier found its copy unreadable and dropped it; the slot's bytes are junk.
            placement.free(entry, rank)
            self.index.place_lower(entry, job.tier, rank, None)
            books.used_bytes -= books.spec.footprint(entry.slot_bytes)
        if not entry.loading_ranks:
            self.deadlines.pop(entry.key, None)
            if entry.complete:
                books.counters.prefetch_landed += 1
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
        """Evict from the tier until ``nbytes`` more fit (never ``keep``, nor a chunk the
        request under way has pinned: a store adding a rank to a chunk that only this tier
        holds would lose the chunk's entry under it): chunks waiting for their namespace first
        (the oldest), then chain tails by the policy."""
        while books.used_bytes + nbytes > books.spec.capacity_bytes:
            if books.orphans:
                self._drop_orphan(books, next(iter(books.orphans.values())))
                continue
            victim = None
            for policy in books.evictor.policies.values():
                victim = books.evictor.victim(policy, lambda e: e is keep or e.pins > 0)
                if victim is not None:
                    break
            if victim is None:
                return False
            self._drop(books, victim)
        return True

    def _drop(self, books: TierBooks, entry: ChunkEntry) -> None:
        name = books.spec.name
        digest = self.index.namespaces[entry.namespace].digest
        footprint = books.spec.footprint(entry.slot_bytes)
        books.evictor.forget(entry)
        for rank, place in enumerate(entry.places_in(name)):
            if place is not None:
                self.placement.effects.append(Delete(name, digest, entry.key, rank, place.where))
                self.index.place_lower(entry, name, rank, None)
                books.used_bytes -= footprint
        self.placement.effects.append(Evicted(name, entry.key))
        self.placement.remove_if_placeless(entry)

    def _drop_found(self, books: TierBooks, chunk: StoredChunk) -> None:
        """Delete a chunk's file the tier found at start that the index never took."""
        books.used_bytes -= books.spec.footprint(chunk.nbytes)
        self.placement.effects.append(
            Delete(books.spec.name, chunk.namespace, chunk.key, chunk.rank, chunk.where)
        )

    def childless(self, entry: ChunkEntry) -> None:
        """The entry's last child left the index."""
        for books in self.books.values():
            books.evictor.childless(entry)

    def forget(self, entry: ChunkEntry) -> None:
        """The entry left the index."""
        for books in self.books.values():
            books.evictor.forget(entry)

    def clear(self) -> int:
        """Drop every chunk nobody holds from every tier, and every chunk waiting for its
        namespace; how many places went."""
        dropped = 0
        for books in self.books.values():
            for chunk in list(books.orphans.values()):
                self._drop_orphan(books, chunk)
                dropped += 1
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
