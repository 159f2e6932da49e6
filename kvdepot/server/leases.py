"""Leases (read locks) and reservations (write locks) that expire on their own.

Both belong to an engine session. They end when the engine releases/commits them, when their
deadline passes, or when the session ends, so a crashed engine cannot pin memory forever.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Generic, TypeVar


@dataclass(slots=True)
class Lease:
    id: int
    session: bytes
    keys: list[bytes]
    expires_at: float
    started_at: float
    rank: int | None  # None: a whole-chunk lease from Lookup; else a rank's Acquire
    nbytes: int = 0  # bytes it covers for reading: this rank's (Acquire) or every rank's (Lookup)
    # A Lookup's pending chunks (loading from a lower tier for it): held in the arena for the
    # engine that asks again, never counted as read.
    loading: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class Reservation:
    id: int
    session: bytes
    namespace: int
    rank: int
    items: list[tuple[bytes, int]]  # (key, offset) in prefix order
    expires_at: float
    started_at: float


T = TypeVar("T", Lease, Reservation)


@dataclass
class ExpiringTable(Generic[T]):
    """id -> item, with a per-session view and a deadline heap."""

    items: dict[int, T] = field(default_factory=dict)
    by_session: dict[bytes, set[int]] = field(default_factory=dict)
    _deadlines: list[tuple[float, int]] = field(default_factory=list)
    _next_id: int = 1

    def new_id(self) -> int:
        item_id = self._next_id
        self._next_id += 1
        return item_id

    def add(self, item: T) -> None:
        self.items[item.id] = item
        self.by_session.setdefault(item.session, set()).add(item.id)
        heapq.heappush(self._deadlines, (item.expires_at, item.id))

    def pop(self, item_id: int) -> T | None:
        item = self.items.pop(item_id, None)
        if item is not None:
            owned = self.by_session.get(item.session)
            if owned is not None:
                owned.discard(item_id)
                if not owned:
                    del self.by_session[item.session]
        return item

    def pop_expired(self, now: float) -> list[T]:
        expired: list[T] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, item_id = heapq.heappop(self._deadlines)
            item = self.items.get(item_id)
            if item is not None and item.expires_at <= now:
                expired.append(item)
                self.pop(item_id)
        return expired

    def ids_of_session(self, session: bytes) -> list[int]:
        return list(self.by_session.get(session, ()))

    def count_of_session(self, session: bytes) -> int:
        return len(self.by_session.get(session, ()))

    def __len__(self) -> int:
        return len(self.items)
