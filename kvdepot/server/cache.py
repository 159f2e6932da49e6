"""CacheCore: the cache's state machine, with no sockets, no threads and no clock of its own.

Every public method takes the current time, validates everything before changing anything,
and raises CacheError (with a protocol ErrorCode) for bad requests, so the RPC layer only
translates. One owner (the RPC thread) calls it; see allocator.py for why that is the design.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from itertools import takewhile

import numpy as np

from kvdepot.keys import namespace_digest
from kvdepot.protocol import KEY_BYTES, MAX_KEYS_PER_REQUEST, ErrorCode, KVGeometry, SlotStatus, split_keys
from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.eviction import ChainEvictor, EvictionPolicy, LRUPolicy
from kvdepot.server.index import ChunkEntry, ChunkIndex, NamespaceInfo
from kvdepot.server.leases import ExpiringTable, Lease, Reservation

log = logging.getLogger("kvdepot.server")

_KEY_DTYPE = np.dtype(f"V{KEY_BYTES}")  # raw 16-byte keys; tolist() gives bytes
MAX_LEASES_PER_SESSION = 65536
MAX_RESERVATIONS_PER_SESSION = 65536
MAX_NAMESPACES = 4096


class CacheError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class CacheObserver:
    """Hooks for metrics and logs; the default does nothing."""

    def on_store(self, seconds: float, chunks: int, tokens: int, nbytes: int) -> None: ...

    def on_retrieve(self, seconds: float, chunks: int, tokens: int, nbytes: int) -> None: ...

    def on_evict(self, chunks: int) -> None: ...


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
    evicted_chunks: int = 0
    expired_leases: int = 0
    expired_reservations: int = 0


class CacheCore:
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
    ):
        self.allocator = allocator
        self.chunk_tokens = chunk_tokens
        self.lease_ttl_s = lease_ttl_s
        self.reservation_ttl_s = reservation_ttl_s
        self.max_ttl_s = max_ttl_s
        self.index = ChunkIndex()
        self.leases: ExpiringTable[Lease] = ExpiringTable()
        self.reservations: ExpiringTable[Reservation] = ExpiringTable()
        self.eviction = ChainEvictor(self.index, allocator.size_class, policy_factory)
        self.counters = CacheCounters()
        self.observer = observer or CacheObserver()

    # --- namespaces -------------------------------------------------------------------------

    def register(
        self, model: str, geometry: KVGeometry, world_size: int, salt: str
    ) -> NamespaceInfo:
        _validate_geometry(geometry, self.chunk_tokens)
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
            salt_set=bool(salt),
            slot_bytes=slot_bytes,
            chunk_tokens=self.chunk_tokens,
        )
        self.index.add_namespace(info)
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

    def _entry_in(self, key: bytes, ns: NamespaceInfo) -> ChunkEntry | None:
        entry = self.index.get(key)
        if entry is not None and entry.namespace != ns.id:
            return None  # a key of another namespace is invisible (and never collides by design)
        return entry

    def _check_rank(self, ns: NamespaceInfo, rank: int) -> None:
        if not 0 <= rank < ns.world_size:
            raise CacheError(
                ErrorCode.BAD_REQUEST, f"rank {rank} is outside world size {ns.world_size}"
            )

    def _ttl(self, requested_ms: int, default_s: float) -> float:
        if requested_ms < 0:
            raise CacheError(ErrorCode.BAD_REQUEST, "a TTL cannot be negative")
        return min(requested_ms / 1000.0, self.max_ttl_s) if requested_ms else default_s

    # --- eviction bookkeeping ---------------------------------------------------------------

    def _remove(self, entry: ChunkEntry) -> None:
        """Take an entry out of the index and the eviction order (its slots are the caller's)."""
        self.eviction.forget(entry)
        childless = self.index.remove(entry.key)
        if childless is not None:
            self.eviction.childless(childless)

    def _evict(self, entry: ChunkEntry) -> None:
        self._remove(entry)
        for offset in entry.committed:
            if offset is not None:
                self.allocator.free(offset)
        self.counters.evicted_chunks += 1
        self.observer.on_evict(1)

    def _evict_one(self, policy: EvictionPolicy) -> bool:
        victim = self.eviction.victim(policy)
        if victim is None:
            return False
        self._evict(victim)
        return True

    def _allocate(self, slot_bytes: int) -> int | None:
        """A slot, evicting least recently used chain tails (same size first) if the arena is
        full; None when nothing may be evicted."""
        offset = self.allocator.allocate(slot_bytes)
        if offset is not None:
            return offset
        own = self.eviction.policy(slot_bytes)
        while offset is None and self._evict_one(own):
            offset = self.allocator.allocate(slot_bytes)
        # Other sizes free memory only when one of their slabs empties completely: take from
        # the size class with the most evictable chunks until a slab (or span) comes free.
        while offset is None:
            others = [p for p in self.eviction.policies.values() if p is not own and len(p)]
            if not others:
                return None
            if self._evict_one(max(others, key=len)):  # else it parked chunks: fewer left
                offset = self.allocator.allocate(slot_bytes)
        return offset

    # --- operations -------------------------------------------------------------------------

    def lookup(
        self, session: bytes, ns_id: int, blob: bytes, lease_ms: int, now: float
    ) -> tuple[int, int, list[int]]:
        """(hit chunks, lease id or 0, offsets). With a lease and a hit, offsets holds every
        rank's committed slot of every hit chunk, rank-major (``offsets[r * hits + i]``), so
        the workers can load without an Acquire; otherwise it is empty."""
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
            # Every rank has committed every hit chunk (that is what a hit is), so no None here;
            # the lease keeps these slots in place until the workers have read them.
            offsets = [  # type: ignore[misc]
                e.committed[rank] for rank in range(ns.world_size) for e in hit_entries
            ]
            lease_id = self._new_lease(
                session, hit_entries, now, ttl, rank=None,
                nbytes=len(hits) * ns.slot_bytes * ns.world_size,
            )
        else:
            self.eviction.touch(ns.slot_bytes, hits)
        n_keys = len(blob) // KEY_BYTES
        n_hit, n_miss = len(hits), n_keys - len(hits)
        c = self.counters
        c.lookups += 1
        c.hit_chunks += n_hit
        c.miss_chunks += n_miss
        c.hit_tokens += n_hit * self.chunk_tokens
        c.miss_tokens += n_miss * self.chunk_tokens
        return n_hit, lease_id, offsets

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
        for entry in entries:
            entry.leases += 1
            self.eviction.refresh(entry)
        self.leases.add(lease)
        return lease.id

    def reserve(
        self, session: bytes, ns_id: int, rank: int, blob: bytes, ttl_ms: int, now: float,
        parent: bytes = b"",
    ) -> tuple[int, list[int], list[int]]:
        """Slots for ``rank``'s shard of consecutive chunks of one chain: (reservation id or 0,
        SlotStatus per key, offset per key or -1). ``parent`` is the key of the chunk before
        ``keys[0]`` (b"": a head); when it is not in the cache, nothing is stored (NO_PARENT),
        since nothing could reach these chunks."""
        ns = self._namespace(ns_id)
        self._check_rank(ns, rank)
        keys = self._keys(blob)
        ttl = self._ttl(ttl_ms, self.reservation_ttl_s)
        if self.reservations.count_of_session(session) >= MAX_RESERVATIONS_PER_SESSION:
            raise CacheError(ErrorCode.TOO_LARGE, "too many open reservations for this engine")
        if parent and len(parent) != KEY_BYTES:
            raise CacheError(
                ErrorCode.BAD_REQUEST, f"a parent is one {KEY_BYTES}-byte key (or empty for a head)"
            )
        entries = self.index.entries
        if any(key in entries and entries[key].namespace != ns.id for key in (*keys, parent)):
            # Checked before anything is allocated: a refused request changes nothing.
            raise CacheError(ErrorCode.BAD_REQUEST, "a key belongs to another namespace")
        before = entries.get(parent) if parent else None  # the entry each key links after
        if parent and before is None:
            return 0, [SlotStatus.NO_PARENT] * len(keys), [-1] * len(keys)
        status: list[int] = []
        offsets: list[int] = []
        items: list[tuple[bytes, int]] = []
        # The parent and earlier chunks of this request must survive our evictions.
        pinned: list[ChunkEntry] = []
        if before is not None:
            before.pins += 1
            pinned.append(before)
            self.eviction.refresh(before)
        full = False
        for key in keys:
            entry = entries.get(key)
            if full:
                status.append(SlotStatus.NO_SPACE)
                offsets.append(-1)
                continue
            if entry is not None and entry.committed[rank] is not None:
                status.append(SlotStatus.PRESENT)
                offsets.append(-1)
            elif entry is not None and entry.pending[rank] is not None:
                status.append(SlotStatus.BUSY)
                offsets.append(-1)
            else:
                if entry is not None:
                    entry.pins += 1  # do not evict the chunk we are adding a rank to
                    self.eviction.refresh(entry)
                offset = self._allocate(ns.slot_bytes)
                if entry is not None:
                    entry.pins -= 1
                if offset is None:
                    full = True
                    if entry is not None:
                        self.eviction.refresh(entry)
                    status.append(SlotStatus.NO_SPACE)
                    offsets.append(-1)
                    continue
                if entry is None:
                    entry = self.index.create(key, ns, parent=before)
                entry.pending[rank] = offset
                entry.pending_ranks += 1
                items.append((key, offset))
                status.append(SlotStatus.RESERVED)
                offsets.append(offset)
            if before is not None:
                self.index.link(entry, before)  # a no-op unless it lacks a resident parent
            before = entry
            entry.pins += 1
            pinned.append(entry)
            self.eviction.refresh(entry)
        for entry in pinned:
            entry.pins -= 1
        self.eviction.refresh_prefix(pinned)
        if not items:
            return 0, status, offsets
        reservation = Reservation(
            id=self.reservations.new_id(),
            session=session,
            namespace=ns.id,
            rank=rank,
            items=items,
            expires_at=now + ttl,
            started_at=now,
        )
        self.reservations.add(reservation)
        return reservation.id, status, offsets

    def _owned_reservation(self, session: bytes, reservation_id: int) -> Reservation:
        reservation = self.reservations.items.get(reservation_id)
        if reservation is None or reservation.session != session:
            raise CacheError(
                ErrorCode.UNKNOWN_RESERVATION,
                f"reservation {reservation_id} is unknown, expired or not this engine's",
            )
        return reservation

    def commit(self, session: bytes, reservation_id: int, now: float) -> int:
        reservation = self._owned_reservation(session, reservation_id)
        self.reservations.pop(reservation_id)
        rank = reservation.rank
        committed: list[ChunkEntry] = []
        for key, offset in reservation.items:
            entry = self.index.entries[key]
            entry.pending[rank] = None
            entry.pending_ranks -= 1
            entry.committed[rank] = offset
            entry.committed_ranks += 1
            if entry.complete:
                self.index.mark_complete(entry)
            committed.append(entry)
        self.eviction.refresh_prefix(committed)
        n = len(committed)
        ns = self.index.namespaces[reservation.namespace]
        nbytes = n * ns.slot_bytes
        c = self.counters
        c.stored_chunks += n
        c.stored_tokens += n * self.chunk_tokens
        c.stored_bytes += nbytes
        self.observer.on_store(now - reservation.started_at, n, n * self.chunk_tokens, nbytes)
        return n

    def abort(self, session: bytes, reservation_id: int) -> None:
        self._drop_reservation(self._owned_reservation(session, reservation_id))

    def _drop_reservation(self, reservation: Reservation) -> None:
        self.reservations.pop(reservation.id)
        rank = reservation.rank
        for key, offset in reservation.items:
            entry = self.index.entries[key]
            entry.pending[rank] = None
            entry.pending_ranks -= 1
            self.allocator.free(offset)
            if entry.committed_ranks == 0 and entry.pending_ranks == 0:
                # Chunks stored after it by later requests stay, unreachable until it is
                # stored again: the engine that aborted re-plans its stores from the start.
                self._remove(entry)
            else:
                self.eviction.refresh(entry)

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
            entry = self._entry_in(key, ns)
            offset = None if entry is None else entry.committed[rank]
            if offset is None:
                break
            entries.append(entry)  # type: ignore[arg-type]
            offsets.append(offset)
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
        self.eviction.refresh_prefix(entries)
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
        """Evict every chunk that nobody holds, and that no held chunk's chain needs
        (operator's request); returns how many went."""
        evicted = 0
        for policy in list(self.eviction.policies.values()):
            while self._evict_one(policy):
                evicted += 1
        return evicted

    def check_invariants(self) -> None:
        """Expensive consistency check, for tests."""
        used = 0
        for entry in self.index.entries.values():
            assert entry.committed_ranks == sum(o is not None for o in entry.committed)
            assert entry.pending_ranks == sum(o is not None for o in entry.pending)
            assert entry.committed_ranks + entry.pending_ranks > 0
            assert entry.pins == 0
            used += len(entry.offsets()) * self.allocator.size_class(entry.slot_bytes)
            in_order = entry.key in self.eviction.policy(entry.slot_bytes)  # type: ignore[operator]
            parked = entry.key in self.eviction.parked
            assert in_order + parked == entry.evictable, entry  # one of them, iff evictable
            assert not parked or entry.children > 0, entry  # a parked chunk waits for a child
        self.index.check_links()
        assert self.eviction.parked <= self.index.entries.keys()
        assert used == self.allocator.used_bytes, (used, self.allocator.used_bytes)
        for ns_id, keys in self.index.complete.items():
            assert keys == {
                k for k, e in self.index.entries.items() if e.namespace == ns_id and e.complete
            }
        assert sum(len(lease.keys) for lease in self.leases.items.values()) == sum(
            e.leases for e in self.index.entries.values()
        )


def _validate_geometry(g: KVGeometry, chunk_tokens: int) -> None:
    problems = []
    if not 1 <= g.num_layers <= 4096:
        problems.append("num_layers")
    if not 1 <= g.num_kv_heads <= 4096 or g.head_size_k < 1 or g.head_size_v < 0:
        problems.append("heads")
    if g.block_size < 1 or chunk_tokens % g.block_size:
        problems.append(f"block_size {g.block_size} must divide the chunk size {chunk_tokens}")
    if not 1 <= g.num_planes <= 1 << 16 or not 1 <= g.piece_bytes <= 1 << 34:
        problems.append("planes/piece_bytes")
    if not g.dtype or len(g.dtype) > 64 or len(g.layout) > 256:
        problems.append("dtype/layout")
    if problems:
        raise CacheError(ErrorCode.GEOMETRY_MISMATCH, "invalid KV geometry: " + ", ".join(problems))
