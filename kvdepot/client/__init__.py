"""The engine-side client of the kvdepot cache server."""

from kvdepot.client.arena import ArenaMapping
from kvdepot.client.curve import ClientCurve
from kvdepot.client.engine_client import KVDepotClient
from kvdepot.client.errors import (
    ArenaMismatch,
    AuthenticationFailed,
    KVDepotError,
    ServerRestarted,
    ServerUnavailable,
)
from kvdepot.client.results import (
    Acquired,
    LookupResult,
    Namespace,
    PendingReply,
    Reservation,
)

__all__ = [
    "Acquired",
    "ArenaMismatch",
    "ArenaMapping",
    "AuthenticationFailed",
    "ClientCurve",
    "KVDepotClient",
    "KVDepotError",
    "LookupResult",
    "Namespace",
    "PendingReply",
    "Reservation",
    "ServerRestarted",
    "ServerUnavailable",
]
