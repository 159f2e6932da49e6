"""What the client's calls return: namespaces, lookups, reservations, leases, and a reply
still in flight."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvdepot import protocol as p

if TYPE_CHECKING:
    from kvdepot.client.engine_client import KVDepotClient


@dataclass
class Namespace:
    """A registered (model, geometry, world size, salt). ``id`` may change after a restart;
    ``digest`` (and so every key) never does."""

    id: int
    digest: bytes
    slot_bytes: int
    chunk_tokens: int
    model: str
    geometry: p.KVGeometry
    world_size: int
    salt: str


@dataclass(frozen=True)
class LookupResult:
    hit_chunks: int
    lease: int
    epoch: int
    # With a lease and a hit: every rank's slot offset of every hit chunk, rank-major (see
    # protocol.LookupReply); empty without a lease or from a server that predates the field.
    offsets: list[int] = field(default_factory=list)
    # Chunks after the hits the server is loading from a lower tier (disk) for this lookup,
    # held by its lease: ask again for them; 0 from a server that predates the field.
    pending: int = 0

    def rank_offsets(self, rank: int) -> list[int]:
        """Rank ``rank``'s slot offsets of the hit chunks, in prefix order; empty when the
        reply carried no offsets (then the rank needs an Acquire to load)."""
        if not self.offsets or not self.hit_chunks:
            return []
        world_size = len(self.offsets) // self.hit_chunks
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        return self.offsets[rank * self.hit_chunks : (rank + 1) * self.hit_chunks]


@dataclass(frozen=True)
class Reservation:
    id: int
    status: list[int]
    offsets: list[int]
    epoch: int


@dataclass(frozen=True)
class Acquired:
    lease: int
    offsets: list[int]
    epoch: int


class PendingReply:
    """A request in flight; poll with ready(), collect with result()."""

    def __init__(self, client: "KVDepotClient", req_id: int, deadline: float, convert):
        self._client = client
        self._req_id = req_id
        self._deadline = deadline
        self._convert = convert
        self._reply: p.Reply | None = None

    def ready(self) -> bool:
        if self._reply is None:
            self._reply = self._client._collect(self._req_id, 0.0)
        return self._reply is not None or time.monotonic() >= self._deadline

    def abandon(self) -> None:
        """Nobody will take the result: whatever it grants (a lease, a reservation) is given
        back to the server, now if it has arrived, else when it does."""
        with self._client._lock:
            if self._reply is not None:
                self._client._strays.reclaim(self._reply)
                self._reply = None
            else:
                self._client._forget(self._req_id)

    def result(self):
        if self._reply is None:
            self._reply = self._client._collect(self._req_id, self._deadline)
        if self._reply is None:
            with self._client._lock:
                raise self._client._timed_out(self._req_id)
        return self._convert(self._client._check(self._reply))
