"""The engine-side client of the kvdepot cache server."""

from kvdepot.client.arena import ArenaMapping
from kvdepot.client.engine_client import (
    Acquired,
    ArenaMismatch,
    KVDepotClient,
    KVDepotError,
    LookupResult,
    Namespace,
    PendingReply,
    Reservation,
    ServerRestarted,
    ServerUnavailable,
)

__all__ = [
    "Acquired",
    "ArenaMismatch",
    "ArenaMapping",
    "KVDepotClient",
    "KVDepotError",
    "LookupResult",
    "Namespace",
    "PendingReply",
    "Reservation",
    "ServerRestarted",
    "ServerUnavailable",
]
