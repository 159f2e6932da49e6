"""What the client raises: every error is a KVDepotError with the server's error code (0 when
the client found it without a reply)."""

from __future__ import annotations

from kvdepot import protocol as p


class KVDepotError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"[{_code_name(code)}] {message}")
        self.code = code
        self.message = message


class ServerUnavailable(KVDepotError):
    """No reply within the deadline, or no connection: treat as a miss."""


class ServerRestarted(KVDepotError):
    """The server's boot id changed: everything obtained before is void."""


class ArenaMismatch(ServerUnavailable):
    """The server answers, but the shared-memory segment this engine can map is not that
    server boot's (another server's under the same name, a stale one, none, or another
    /dev/shm): writing there would corrupt someone else's chunks, so the server is treated as
    unavailable. Code ARENA_MISMATCH; the message says what was found."""


class AuthenticationFailed(ServerUnavailable):
    """The server refused this client at the connection's handshake (CURVE): no key where the
    server requires one, a client key it does not allow (or no longer allows), a server
    public key that is not the server's, or CURVE asked of a server without it (code 0); or
    at the session's start, a key the server no longer allows (code BAD_REQUEST) or one that
    belongs to no tenant (code UNAUTHORIZED). The message says which and what to change. Retrying helps only once the keys are fixed."""


def _code_name(code: int) -> str:
    try:
        return p.ErrorCode(code).name
    except ValueError:
        return str(code)
