"""CacheCore: the cache's state machine, with no sockets, no threads and no clock of its own.

Every public method takes the current time, validates everything before changing anything,
and raises CacheError (with a protocol ErrorCode) for bad requests, so the RPC layer only
translates. One owner (the RPC thread) calls it; see allocator.py for why that is the design.

The core never acts outside itself: what needs I/O or another thread (a chunk to write to a
lower tier, one to load from it, a file to delete) it returns as effects (effects.py), taken
with ``take_effects``; what those report back comes in through ``complete``. The store path
lives in store.py, where chunks' bytes are and what leaves the arena in placement.py, lower
tiers' books in tiering.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import takewhile

import numpy as np

from kvdepot.keys import namespace_digest
from kvdepot.protocol import KEY_BYTES, MAX_KEYS_PER_REQUEST, ErrorCode, KVGeometry, split_keys
from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.effects import Completion, Effect
from kvdepot.server.errors import CacheError
from kvdepot.server.index import ChunkEntry, ChunkIndex, NamespaceInfo, validate_geometry
from kvdepot.server.leases import ExpiringTable, Lease, Reservation
from kvdepot.server.locations import READABLE
from kvdepot.server.placement import Placement
from kvdepot.server.policies import EvictionPolicy, LRUPolicy
from kvdepot.server.prefetching import PrefetchSettings
from kvdepot.server.store import StorePath
from kvdepot.server.tiers import StoredChunk, TierSpec

log = logging.getLogger("kvdepot.server")

_KEY_DTYPE = np.dtype(f"V{KEY_BYTES}")  # raw 16-byte keys; tolist() gives bytes
MAX_LEASES_PER_SESSION = 65536
MAX_NAMESPACES = 4096

__all__ = ["CacheCore", "CacheCounters", "CacheError", "CacheObserver"]


class CacheObserver:
    """Hooks for metrics and logs; the default does nothing."""

    def on_store(self, seconds: float, chunks: int, tokens: int, nbytes: int) -> None: ...

    def on_retrieve(self, seconds: float, chunks: int, tokens: int, nbytes: int) -> None: ...


@dataclass
class CacheCounters:
    lookups: int = 0
    hit_chunks: int = 0
    miss_chunks: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0
    stored_chunks: int = 0
    stored_tokens: int = 0
    stored_bytes: int = 0
    retrieved_chunks: int = 0
    retrieved_tokens: int = 0
    retrieved_bytes: int = 0
    evicted_chunks: int = 0  # chunks that left the arena
    expired_leases: int = 0
    expired_reservations: int = 0


class CacheCore(StorePath):
    def __init__(
        self,
        allocator: SlabAllocator,
        chunk_tokens: int,
        *,
        lease_ttl_s: float = 30.0,
        reservation_ttl_s: float = 30.0,
        max_ttl_s: float = 600.0,
        policy_factory: Callable[[], EvictionPolicy] = LRUPolicy,
        observer: CacheObserver | None = None,
        tiers: Sequence[TierSpec] = (),
        prefetch: PrefetchSettings = PrefetchSettings(),
    ):
        """``tiers``: the books of the lower tiers, first to be written first; none: chunks
        that leave the arena are gone. ``prefetch``: deadlines and the recompute estimate
        of loads from them."""
        self.allocator = allocator
        self.chunk_tokens = chunk_tokens
        self.lease_ttl_s = lease_ttl_s
        self.reservation_ttl_s = reservation_ttl_s
        self.max_ttl_s = max_ttl_s
        self.index = ChunkIndex()
        self.leases: ExpiringTable[Lease] = ExpiringTable()
        self.reservations: ExpiringTable[Reservation] = ExpiringTable()
        self.counters = CacheCounters()
        self.observer = observer or CacheObserver()
        self.places = Placement(
            self.index, allocator, self.counters, policy_factory, tiers, prefetch
        )

    # --- effects and completions ------------------------------------------------------------

    def take_effects(self) -> list[Effect]:
        """What the edges must do since the last call, in order (and forget it here)."""
        effects = self.places.effects
        if not effects:
            return effects
        self.places.effects = []
        return effects

    def complete(self, done: Completion, now: float = 0.0) -> bool:
        """A tier copy or probe ended (from a worker, on the RPC thread); False when its job
        is not known (applied already). ``now``: the clock lookups are given (the loads a
        probe starts get their deadline from it)."""
        lower = self.places.lower
        return lower is not None and lower.complete(done, now)

    def adopt(self, tier: str, found: Sequence[StoredChunk]) -> None:
        """What tier ``tier`` found at start (its scan): chunks of a registered namespace
        join the index now, the others when an engine registers theirs."""
        lower = self.places.lower
        if lower is None or tier not in lower.books:
            raise ValueError(f"no lower tier {tier!r} to adopt chunks into")
        lower.adopt(tier, found)

    # --- namespaces -------------------------------------------------------------------------

    def register(
        self, model: str, geometry: KVGeometry, world_size: int, salt: str
    ) -> NamespaceInfo:
        validate_geometry(geometry, self.chunk_tokens)
        if not model or len(model) > 512:
            raise CacheError(ErrorCode.BAD_REQUEST, "model name must be 1..512 characters")
        if not 1 <= world_size <= 1024:
            raise CacheError(ErrorCode.BAD_REQUEST, f"world_size {world_size} is out of range")
        if len(salt) > 1024:
            raise CacheError(ErrorCode.BAD_REQUEST, "salt longer than 1024 characters")
        slot_bytes = geometry.slot_bytes(self.chunk_tokens)
        if not self.allocator.fits(slot_bytes):
            raise CacheError(
                ErrorCode.GEOMETRY_MISMATCH,
                f"a chunk of this geometry needs {slot_bytes} bytes per rank, more than the "
                f"whole buffer ({self.allocator.capacity} bytes)",
            )
        digest = namespace_digest(model, geometry, world_size, salt)
        existing = self.index.namespace_for_digest(digest)
        if existing is not None:
            return existing
        if len(self.index.namespaces) >= MAX_NAMESPACES:
            raise CacheError(ErrorCode.TOO_LARGE, "too many namespaces registered")
        info = NamespaceInfo(
            id=len(self.index.namespaces) + 1,
            digest=digest,
            model=model,
            geometry=geometry,
            world_size=world_size,
            slot_bytes=slot_bytes,
            chunk_tokens=self.chunk_tokens,
        )
        self.index.add_namespace(info)
        if self.places.lower is not None:
            self.places.lower.adopt_namespace(info)  # what a restarted tier found of it
        return info

    def _namespace(self, ns_id: int) -> NamespaceInfo:
        info = self.index.namespaces.get(ns_id)
        if info is None:
            raise CacheError(ErrorCode.UNKNOWN_NAMESPACE, f"namespace {ns_id} is not registered")
        return info

    def _keys(self, blob: bytes) -> list[bytes]:
        if len(blob) > MAX_KEYS_PER_REQUEST * KEY_BYTES:
            raise CacheError(ErrorCode.TOO_LARGE, f"more than {MAX_KEYS_PER_REQUEST} keys in one request")
        try:
            return split_keys(blob)
        except ValueError as exc:
            raise CacheError(ErrorCode.BAD_REQUEST, str(exc)) from None

    def _check_rank(self, ns: NamespaceInfo, rank: int) -> None:
        if not 0 <= rank < ns.world_size:
            raise CacheError(
                ErrorCode.BAD_REQUEST, f"rank {rank} is outside world size {ns.world_size}"
            )

    def _ttl(self, requested_ms: int, default_s: float) -> float:
        if requested_ms < 0:
            raise CacheError(ErrorCode.BAD_REQUEST, "a TTL cannot be negative")
        return min(requested_ms / 1000.0, self.max_ttl_s) if requested_ms else default_s

    # --- reads ------------------------------------------------------------------------------

    def lookup(
        self, session: bytes, ns_id: int, blob: bytes, lease_ms: int, now: float
    ) -> tuple[int, int, list[int]]:
        """(hit chunks, lease id or 0, offsets): ``lookup_and_prefetch`` without the
        pending count."""
        return self.lookup_and_prefetch(session, ns_id, blob, lease_ms, now)[:3]  # type: ignore[return-value]

    def lookup_and_prefetch(
        self, session: bytes, ns_id: int, blob: bytes, lease_ms: int, now: float
    ) -> tuple[int, int, list[int], int]:
        """(hit chunks, lease id or 0, offsets, pending chunks). With a lease and a hit,
        offsets holds every rank's readable arena slot of every hit chunk, rank-major
        (``offsets[r * hits + i]``), so the workers can load without an Acquire; otherwise it
        is empty. With a lease and lower tiers, the chunks after the hits that a lower tier
        holds start loading into the arena: pending counts those after the hits on their
        way (see prefetching.py), which the lease covers too (a lease is made for them when
        nothing hit); a later lookup hits them once they landed."""
        # The hottest path (every scheduled request): no per-key allocations beyond the
        # 16-byte slice, no helper calls per key.
        ns = self._namespace(ns_id)
        if len(blob) % KEY_BYTES or len(blob) > MAX_KEYS_PER_REQUEST * KEY_BYTES:
            self._keys(blob)  # raises the precise error
        ttl = self._ttl(lease_ms, self.lease_ttl_s) if lease_ms else 0.0
        # One C call splits the blob into keys; takewhile stops at the first miss.
        keys = np.frombuffer(blob, dtype=_KEY_DTYPE).tolist()
        hits: list[bytes] = list(takewhile(self.index.complete[ns.id].__contains__, keys))
        lease_id = 0
        offsets: list[int] = []
        if lease_ms and hits:
            entries = self.index.entries
            hit_entries = [entries[k] for k in hits]
            # Every rank has a readable place of every hit chunk (that is what a hit is); the
            # lease keeps these slots in place until the workers have read them.
            offsets = [
                e.arena[rank].where.offset  # type: ignore[union-attr]
                for rank in range(ns.world_size) for e in hit_entries
            ]
            lease_id = self._new_lease(
                session, hit_entries, now, ttl, rank=None,
                nbytes=len(hits) * ns.slot_bytes * ns.world_size,
            )
        else:
            self.places.eviction.touch(ns.slot_bytes, hits)
        lower = self.places.lower
        pending = 0
        if lower is not None:
            if lower.counts_hits and hits:
                lower.count_hits(hits)
            # A lease for the pending chunks must be possible before any load starts.
            may_hold = lease_id or self.leases.count_of_session(session) < MAX_LEASES_PER_SESSION
            if lease_ms and len(hits) < len(keys) and may_hold:
                before = hits[-1] if hits else b""
                waiting, probing = lower.prefetch(ns, before, keys[len(hits):], now)
                pending = len(waiting) + probing
                if waiting:
                    lease_id = self._hold_pending(session, lease_id, waiting, now, ttl)
        n_keys = len(keys)
        n_hit, n_miss = len(hits), n_keys - len(hits)
        c = self.counters
        c.lookups += 1
        c.hit_chunks += n_hit
        c.miss_chunks += n_miss
        c.hit_tokens += n_hit * self.chunk_tokens
        c.miss_tokens += n_miss * self.chunk_tokens
        return n_hit, lease_id, offsets, pending

    def _hold_pending(
        self, session: bytes, lease_id: int, entries: list[ChunkEntry], now: float, ttl: float
    ) -> int:
        """Add a lookup's pending chunks to its lease (a new one when nothing hit)."""
        if not lease_id:
            lease_id = self._new_lease(session, [], now, ttl, rank=None, nbytes=0)
        lease = self.leases.items[lease_id]
        lease.loading = [e.key for e in entries]
        for entry in entries:
            entry.leases += 1
        self.places.eviction.refresh_prefix(entries)
        return lease_id

    def _new_lease(
        self, session: bytes, entries: list[ChunkEntry], now: float, ttl: float,
        rank: int | None, nbytes: int,
    ) -> int:
        if self.leases.count_of_session(session) >= MAX_LEASES_PER_SESSION:
            raise CacheError(ErrorCode.TOO_LARGE, "too many leases held by this engine")
        lease = Lease(
            id=self.leases.new_id(),
            session=session,
            keys=[e.key for e in entries],
            expires_at=now + ttl,
            started_at=now,
            rank=rank,
            nbytes=nbytes,
        )
        refresh = self.places.eviction.refresh
        for entry in entries:
            entry.leases += 1
            refresh(entry)
        self.leases.add(lease)
        return lease.id

    def acquire(
        self, session: bytes, ns_id: int, rank: int, blob: bytes, lease_ms: int, now: float
    ) -> tuple[int, list[int]]:
        ns = self._namespace(ns_id)
        self._check_rank(ns, rank)
        keys = self._keys(blob)
        ttl = self._ttl(lease_ms, self.lease_ttl_s)
        entries: list[ChunkEntry] = []
        offsets: list[int] = []
        for key in keys:
            entry = self.index.get(key)
            if entry is None or entry.namespace != ns.id:
                break  # a key of another namespace is invisible (and never collides by design)
            place = entry.arena[rank]
            if place is None or place.state not in READABLE:
                break
            entries.append(entry)
            offsets.append(place.where.offset)  # type: ignore[union-attr]
        if not entries:
            return 0, []
        lease_id = self._new_lease(
            session, entries, now, ttl, rank=rank, nbytes=len(entries) * ns.slot_bytes
        )
        return lease_id, offsets

    def release(
        self, session: bytes, lease_ids: list[int], now: float, retrieved: Collection[int] = ()
    ) -> None:
        """End leases. A lease counts as a retrieval when it is a rank's Acquire lease (the
        rank asked for slots only to read them) or is named in ``retrieved`` (a Lookup lease
        whose offsets the workers read); an unread Lookup lease ends without counting."""
        read = set(retrieved)
        if not read.issubset(lease_ids):
            stray = sorted(read.difference(lease_ids))[:8]
            raise CacheError(
                ErrorCode.BAD_REQUEST, f"retrieved leases {stray} are not among the released ones"
            )
        leases = []
        for lease_id in dict.fromkeys(lease_ids):  # a lease named twice ends once
            lease = self.leases.items.get(lease_id)
            if lease is None or lease.session != session:
                raise CacheError(
                    ErrorCode.UNKNOWN_LEASE, f"lease {lease_id} is unknown, expired or not yours"
                )
            leases.append(lease)
        for lease in leases:
            self._end_lease(lease, now, retrieved=lease.rank is not None or lease.id in read)

    def _end_lease(self, lease: Lease, now: float, retrieved: bool) -> None:
        self.leases.pop(lease.id)
        entries = [self.index.entries[k] for k in lease.keys]
        for entry in entries:
            entry.leases -= 1
        self.places.eviction.refresh_prefix(entries)
        if lease.loading:
            loading = [self.index.entries[k] for k in lease.loading]
            for entry in loading:
                entry.leases -= 1
            self.places.eviction.refresh_prefix(loading)
            for entry in loading:
                self.places.remove_if_placeless(entry)  # its load failed while held
        if retrieved:
            # One chunk per key; nbytes covers what the lease handed out: one rank's slots for
            # an Acquire lease, every rank's for a Lookup lease.
            n = len(entries)
            c = self.counters
            c.retrieved_chunks += n
            c.retrieved_tokens += n * self.chunk_tokens
            c.retrieved_bytes += lease.nbytes
            self.observer.on_retrieve(
                now - lease.started_at, n, n * self.chunk_tokens, lease.nbytes
            )

    # --- housekeeping -----------------------------------------------------------------------

    def expire(self, now: float) -> tuple[int, int]:
        """End leases and reservations past their deadline; (leases, reservations) ended."""
        leases = self.leases.pop_expired(now)
        for lease in leases:
            self._end_lease(lease, now, retrieved=False)
        reservations = self.reservations.pop_expired(now)
        for reservation in reservations:
            self._drop_reservation(reservation)
        self.counters.expired_leases += len(leases)
        self.counters.expired_reservations += len(reservations)
        return len(leases), len(reservations)

    def drop_session(self, session: bytes, now: float) -> tuple[int, int]:
        """An engine went away: its leases and reservations end now."""
        lease_ids = self.leases.ids_of_session(session)
        for lease_id in lease_ids:
            self._end_lease(self.leases.items[lease_id], now, retrieved=False)
        reservation_ids = self.reservations.ids_of_session(session)
        for reservation_id in reservation_ids:
            self._drop_reservation(self.reservations.items[reservation_id])
        return len(lease_ids), len(reservation_ids)

    def clear(self) -> int:
        """Evict every chunk that nobody holds, and that no held chunk's chain needs, from
        every tier (operator's request); returns how many left the arena."""
        return self.places.clear()

    def check_invariants(self) -> None:
        """Expensive consistency check, for tests."""
        from kvdepot.server.invariants import check_core

        check_core(self)
