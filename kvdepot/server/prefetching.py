"""Prefetch: loading the chunks after a lookup's hits from a lower tier into the arena.

A leased lookup whose hit prefix continues in a lower tier starts copies of those chunks into
fresh arena slots (at most ``MAX_PREFETCH_CHUNKS`` per lookup, within the tier's queue) and
answers them as *pending*: the engine asks again, and they are hits once they landed. Each
lookup's loads share a deadline, a base plus a cost per token; a lookup after it counts the
chunks still loading as misses (the copy itself goes on: a later request may hit them).

A load is not started when the tier is expected to be slower than recomputing the tokens:
the expected load time is the chunk's bytes over the tier's read speed (first the tier's own
estimate, then a running average of its measured reads), the recompute time is the chunk's
tokens over ``PrefetchSettings.recompute_tokens_per_s``. One lookup in ``_SAMPLE_EVERY`` that
would be skipped loads all the same, so the estimate follows a disk that got faster.

Part of LowerTiers (tiering.py): pure, on the RPC thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvdepot.server.effects import Prefetch
from kvdepot.server.locations import ARENA, ArenaSlot, Location, State

if TYPE_CHECKING:
    from kvdepot.server.index import ChunkEntry, NamespaceInfo
    from kvdepot.server.tiering import LowerTiers, TierBooks

MAX_PREFETCH_CHUNKS = 64  # per lookup
_SAMPLE_EVERY = 32


@dataclass(frozen=True)
class PrefetchSettings:
    # Defaults from this project's machines: a virtio disk read 1.0-1.2 GB/s cold (O_DIRECT,
    # 1-16 MiB files); a Qwen3-14B token is 160 KiB of KV, 0.16 ms at 1 GB/s. The deadline
    # allows ~0.6 GB/s for that model, plus a second for the queue ahead and first seeks
    # (SGLang waits 2 s + 0.1 ms per token).
    deadline_base_s: float = 1.0
    deadline_per_token_s: float = 0.25e-3
    # Recompute speed an engine reaches at least. An H200 prefills a 14B model at 15-20k
    # tokens/s (8k tokens in ~0.4 s, 32k in ~2.1 s): 10k errs towards loading. At 10k, a
    # 160 KiB/token model loads from disk only above 1.6 GB/s; a small model's chunks always.
    recompute_tokens_per_s: float = 10_000.0

    def __post_init__(self) -> None:
        if self.deadline_base_s < 0 or self.deadline_per_token_s < 0:
            raise ValueError("a prefetch deadline cannot be negative")
        if self.recompute_tokens_per_s <= 0:
            raise ValueError("the recompute speed must be positive")


class PrefetchPath:
    def prefetch(
        self: LowerTiers, ns: NamespaceInfo, before: bytes, keys: list[bytes], now: float
    ) -> tuple[list[ChunkEntry], int]:
        """Start copies into the arena of the chunks after a lookup's hits (``keys``, in
        prefix order; ``before``: the last hit's key, b"" for none) that lower tiers hold, up
        to the first that none does. Returns the lookup's pending chunks: the leading ones on
        their way now (started by this lookup or an earlier one) before their deadline, or
        landed behind one that is; and how many chunks after those a shared tier is being
        asked about (probing.py), which the lookup waits for too."""
        self._start_loads(ns, keys, now)
        pending = self._pending(ns, keys, now)
        rest = keys[len(pending):]
        probing = 0
        if rest and self._shared:
            parent = pending[-1].key if pending else before
            probing = self.probe(ns, parent, rest, now)
        return pending, probing

    def _start_loads(self: LowerTiers, ns: NamespaceInfo, keys: list[bytes], now: float) -> None:
        placement, entries = self.placement, self.index.entries
        if not self._worth_loading(ns, keys):
            return
        started: list[tuple[ChunkEntry, TierBooks]] = []
        for key in keys[:MAX_PREFETCH_CHUNKS]:
            entry = entries.get(key)
            if entry is None or entry.namespace != ns.id:
                break
            sources = self._sources(entry)
            if sources is None:
                break  # a rank no tier holds: the prefix ends here
            if not sources:
                continue  # in the arena already, or on its way
            if _over_queue(sources):
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
            # Demotions our evictions started may have taken the queue slots.
            if len(slots) < len(sources) or _over_queue(sources):
                for slot in slots:
                    placement.allocator.free(slot.offset)
                for rank, books in sources:
                    self._mark_source(entry, rank, books, State.READY)
                placement.eviction.refresh(entry)
                break
            for (rank, books), slot in zip(sources, slots):
                self._load(ns, entry, rank, books, slot)
            placement.eviction.refresh(entry)
            started.append((entry, sources[0][1]))
        self._set_deadline(ns, started, now)

    def _set_deadline(
        self: LowerTiers, ns: NamespaceInfo, started: list[tuple[ChunkEntry, TierBooks]], now: float
    ) -> None:
        if not started:
            return
        s = self.settings
        deadline = now + s.deadline_base_s + s.deadline_per_token_s * len(started) * ns.chunk_tokens
        for entry, books in started:
            self.deadlines[entry.key] = deadline
            books.counters.prefetch_started += 1

    def _worth_loading(self: LowerTiers, ns: NamespaceInfo, keys: list[bytes]) -> bool:
        """Is loading the next chunk expected to be faster than recomputing its tokens?"""
        entry = self.index.entries.get(keys[0])
        if entry is None or entry.namespace != ns.id or entry.arena[0] is not None:
            return True  # nothing to load here (or on its way): nothing to decide
        books = self._source(entry, 0)
        if books is None:
            return True
        load_s = ns.world_size * entry.slot_bytes / max(books.read_bytes_per_s, 1.0)
        if load_s <= ns.chunk_tokens / self.settings.recompute_tokens_per_s:
            return True
        books.skipped_since_sample += 1
        if books.skipped_since_sample >= _SAMPLE_EVERY:
            books.skipped_since_sample = 0
            return True  # measure the tier again
        entries, skipped = self.index.entries, 0
        for key in keys[:MAX_PREFETCH_CHUNKS]:
            entry = entries.get(key)
            if entry is None or entry.namespace != ns.id or entry.in_arena or not entry.lower:
                break
            skipped += 1
        books.counters.prefetch_skipped += skipped
        return False

    def _pending(self: LowerTiers, ns: NamespaceInfo, keys: list[bytes], now: float) -> list[ChunkEntry]:
        entries, deadlines = self.index.entries, self.deadlines
        pending: list[ChunkEntry] = []
        for key in keys[:MAX_PREFETCH_CHUNKS]:
            entry = entries.get(key)
            if entry is None or entry.namespace != ns.id:
                break
            if entry.complete:
                pending.append(entry)  # landed behind one still loading: a hit with it
                continue
            if not entry.loading_ranks or entry.loading_ranks + entry.committed_ranks < entry.world_size:
                break
            deadline = deadlines.get(key)
            if deadline is None:
                break  # missed its deadline: counted once, a miss from then on
            if deadline < now:
                del deadlines[key]
                self._counters_of(entry).prefetch_timeouts += 1
                break
            pending.append(entry)
        return pending

    def _counters_of(self: LowerTiers, entry: ChunkEntry):
        """The counters of the tier a loading entry comes from."""
        for books in self.books.values():
            places = entry.places_in(books.spec.name)
            if any(p is not None and p.state is State.COPYING_OUT for p in places):
                return books.counters
        return next(iter(self.books.values())).counters

    def _mark_source(self: LowerTiers, entry: ChunkEntry, rank: int, books: TierBooks, state: State) -> None:
        name = books.spec.name
        place = entry.places_in(name)[rank]
        assert place is not None
        self.index.place_lower(entry, name, rank, place.moved(state))
        books.evictor.refresh(entry)

    def _sources(self: LowerTiers, entry: ChunkEntry) -> list[tuple[int, TierBooks]] | None:
        """(rank, tier to load it from) for each rank the arena lacks; None when a tier
        holds none of one of them."""
        sources = []
        for rank, place in enumerate(entry.arena):
            if place is None:
                books = self._source(entry, rank)
                if books is None:
                    return None
                sources.append((rank, books))
        return sources

    def _source(self: LowerTiers, entry: ChunkEntry, rank: int) -> TierBooks | None:
        for books in self.books.values():
            place = entry.places_in(books.spec.name)[rank]
            if place is not None and place.state is State.READY:
                return books
        return None

    def _load(
        self: LowerTiers, ns: NamespaceInfo, entry: ChunkEntry, rank: int, books: TierBooks,
        slot: ArenaSlot,
    ) -> None:
        name = books.spec.name
        source = entry.places_in(name)[rank]  # COPYING_OUT already
        assert source is not None
        self.placement.place(entry, rank, Location(ARENA, slot, State.LOADING_IN))
        job = self._start_load(books, entry.key, rank)
        self.placement.effects.append(Prefetch(
            job, name, ns.digest, entry.key, rank, source.where, slot, entry.slot_bytes,
        ))
        books.evictor.refresh(entry)


def _over_queue(sources: list[tuple[int, TierBooks]]) -> bool:
    return any(
        b.in_flight + sum(x is b for _, x in sources) > b.spec.queue_depth for _, b in sources
    )
