"""Engine sessions as the RPC loop knows them, and its rate-limited complaints about them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvdepot.server.partition import CachePartition

log = logging.getLogger("kvdepot.server")

_COMPLAINT_WINDOW_S = 60.0


@dataclass(slots=True)
class Session:
    """One engine's session, keyed by its connection's ROUTER routing id (``identity``).

    ``client_key``: the client's CURVE public key (Z85, 40 characters) that the ZAP handler
    accepted for this connection, fixed for the session's life; "" on a server without
    authentication. Handlers read it as ``server.sessions[identity].client_key``.
    ``partition``: set at Hello, fixed for the session's life.
    """

    identity: bytes
    engine_id: str
    pid: int
    fd: int
    last_seen: float
    client_key: str = ""
    # The partition (partition.py) its requests go to: its tenant's, or the only one.
    partition: CachePartition = None  # type: ignore[assignment]


class Complaints:
    """One log line per offending client per minute, with the count of what it held back."""

    def __init__(self) -> None:
        self._windows: dict[bytes, tuple[float, int]] = {}

    def report(self, identity: bytes, now: float, what: str) -> None:
        started, suppressed = self._windows.get(identity, (0.0, 0))
        if now - started >= _COMPLAINT_WINDOW_S:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            log.warning("Bad request from client %s: %s%s", identity.hex(), what, more)
            self._windows[identity] = (now, 0)
            if len(self._windows) > 10000:  # bounded even under a flood of new identities
                self._windows.clear()
        else:
            self._windows[identity] = (started, suppressed + 1)
