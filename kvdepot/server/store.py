"""The store path of the core: two-phase stores (Reserve, Commit or Abort).

A rank's slot is reserved WRITING, the engine writes it, and Commit makes it READY; nothing
half-written is ever readable. Reservations expire (leases.py). CacheCore (cache.py) is the
one class; this module holds its store half.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvdepot.protocol import KEY_BYTES, ErrorCode, SlotStatus
from kvdepot.server.errors import CacheError
from kvdepot.server.index import ChunkEntry
from kvdepot.server.leases import Reservation
from kvdepot.server.locations import ARENA, Location, State

if TYPE_CHECKING:
    from kvdepot.server.cache import CacheCore

MAX_RESERVATIONS_PER_SESSION = 65536


class StorePath:
    def reserve(
        self: CacheCore, session: bytes, ns_id: int, rank: int, blob: bytes, ttl_ms: int,
        now: float, parent: bytes = b"",
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
        places, eviction = self.places, self.places.eviction
        status: list[int] = []
        offsets: list[int] = []
        items: list[tuple[bytes, int]] = []
        # The parent and earlier chunks of this request must survive our evictions.
        pinned: list[ChunkEntry] = []
        if before is not None:
            before.pins += 1
            pinned.append(before)
            eviction.refresh(before)
        full = False
        for key in keys:
            entry = entries.get(key)
            if full:
                status.append(SlotStatus.NO_SPACE)
                offsets.append(-1)
                continue
            place = None if entry is None else entry.arena[rank]
            if place is not None:
                # Readable: nothing to write. Being written or loaded: someone else's.
                readable = place.state is State.READY or place.state is State.COPYING_OUT
                status.append(SlotStatus.PRESENT if readable else SlotStatus.BUSY)
                offsets.append(-1)
            else:
                if entry is not None:
                    entry.pins += 1  # do not evict the chunk we are adding a rank to
                    eviction.refresh(entry)
                slot = places.allocate(ns.slot_bytes)
                if entry is not None:
                    entry.pins -= 1
                if slot is None:
                    full = True
                    if entry is not None:
                        eviction.refresh(entry)
                    status.append(SlotStatus.NO_SPACE)
                    offsets.append(-1)
                    continue
                if entry is None:
                    entry = self.index.create(key, ns, parent=before)
                places.place(entry, rank, Location(ARENA, slot, State.WRITING))
                items.append((key, slot.offset))
                status.append(SlotStatus.RESERVED)
                offsets.append(slot.offset)
            if before is not None:
                self.index.link(entry, before)  # a no-op unless it lacks a resident parent
            before = entry
            entry.pins += 1
            pinned.append(entry)
            eviction.refresh(entry)
        for entry in pinned:
            entry.pins -= 1
        eviction.refresh_prefix(pinned)
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

    def _owned_reservation(self: CacheCore, session: bytes, reservation_id: int) -> Reservation:
        reservation = self.reservations.items.get(reservation_id)
        if reservation is None or reservation.session != session:
            raise CacheError(
                ErrorCode.UNKNOWN_RESERVATION,
                f"reservation {reservation_id} is unknown, expired or not this engine's",
            )
        return reservation

    def commit(self: CacheCore, session: bytes, reservation_id: int, now: float) -> int:
        reservation = self._owned_reservation(session, reservation_id)
        self.reservations.pop(reservation_id)
        rank, places = reservation.rank, self.places
        committed: list[ChunkEntry] = []
        for key, _ in reservation.items:
            entry = self.index.entries[key]
            places.place(entry, rank, entry.arena[rank].moved(State.READY))  # type: ignore[union-attr]
            committed.append(entry)
        places.eviction.refresh_prefix(committed)
        if places.lower is not None:
            places.lower.committed(committed)
        n = len(committed)
        ns = self.index.namespaces[reservation.namespace]
        nbytes = n * ns.slot_bytes
        c = self.counters
        c.stored_chunks += n
        c.stored_tokens += n * self.chunk_tokens
        c.stored_bytes += nbytes
        self.observer.on_store(now - reservation.started_at, n, n * self.chunk_tokens, nbytes)
        return n

    def abort(self: CacheCore, session: bytes, reservation_id: int) -> None:
        self._drop_reservation(self._owned_reservation(session, reservation_id))

    def _drop_reservation(self: CacheCore, reservation: Reservation) -> None:
        self.reservations.pop(reservation.id)
        rank, places = reservation.rank, self.places
        for key, _ in reservation.items:
            entry = self.index.entries[key]
            places.free(entry, rank)
            # Chunks stored after it by later requests stay, unreachable until it is stored
            # again: the engine that aborted re-plans its stores from the start.
            places.remove_if_placeless(entry)
            if entry.key in self.index.entries:
                places.eviction.refresh(entry)
