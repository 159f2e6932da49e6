"""Connections to one node: opening them (TCP, TLS, AUTH) and running one pipeline on one,
with what can go wrong turned into RemoteErrors and the node's backoff. Used by client.py.

Which error:

- RemoteUnavailable: refused, reset or closed connections, a connect that got no answer
  within connect_timeout_s (the node then backs off).
- RemoteTimeout: the call's deadline passed (the node is only suspect: no backoff).
- RemoteAuthError: an AUTH refused, a TLS handshake that failed, and, on a node that never
  answered, the signs of TLS on one side only: a plain connection closed before any reply
  (a TLS port drops what is not TLS), a TLS handshake with no answer (a plain port waits for
  a command line).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

from kvdepot.server.tiers.resp.settings import (
    RemoteAuthError, RemoteError, RemoteSettings, RemoteTimeout, RemoteUnavailable,
)
from kvdepot.server.tiers.resp.nodes import Node
from kvdepot.server.tiers.resp.wire import (
    Call, Connection, PeerClosed, Reply, RespErrorReply, RespProtocolError, TlsHandshakeFailed,
)

AUTH_CODES = ("NOAUTH", "WRONGPASS", "NOPERM")


class NodeIO:
    """Runs pipelines on nodes for the client. ``on_trouble``: called when a node fails or
    times out (the client then re-reads the topology). Raises ValueError for a TLS file
    that cannot be read."""

    def __init__(self, settings: RemoteSettings, *, on_trouble: Callable[[], None]):
        self._settings = settings
        self._ssl = settings.ssl_context()
        self._username, self._password = settings.credentials()
        self._on_trouble = on_trouble

    def exchange(self, node: Node, calls: list[Call], deadline: float) -> list[Reply]:
        """Send ``calls`` to ``node`` on a pooled (or new) connection and read the replies.
        A pooled connection found dead before any reply byte is replaced once (the server
        restarted or closed it while idle: nothing was run); any other failure is raised."""
        for attempt in (0, 1):
            conn = node.acquire(deadline)
            fresh = conn is None
            if fresh:
                conn = self._open(node, deadline)
            sent, received = conn.bytes_sent, conn.bytes_received
            try:
                replies = conn.execute(calls, deadline)
            except BaseException as exc:
                node.discard(conn)
                node.tally(conn.bytes_sent - sent, conn.bytes_received - received, 0)
                stale = not fresh and conn.bytes_received == received and isinstance(exc, ConnectionError)
                if stale and attempt == 0:
                    node.drop_idle()
                    continue
                error = self._failure(node, exc, fresh)
                if error is None:
                    raise  # not the network's doing (a bug, KeyboardInterrupt): as itself
                if isinstance(error, RemoteTimeout):
                    node.timed_out(str(error))
                else:
                    node.failed(str(error))
                self._on_trouble()
                raise error from exc
            node.tally(conn.bytes_sent - sent, conn.bytes_received - received, len(calls))
            node.release(conn)
            return replies
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _open(self, node: Node, deadline: float) -> Connection:
        """A new connection to ``node`` (acquire() reserved its place), authenticated."""
        limit = min(self._settings.connect_timeout_s, deadline - time.monotonic())
        try:
            if limit <= 0:
                raise TimeoutError("the deadline passed")
            conn = Connection.open(node.endpoint.host, node.endpoint.port, limit, ssl_context=self._ssl)
        except Exception as exc:
            error = self._connect_failure(node, exc, limit)
            self._open_failed(node, error)
            raise error from exc
        if self._password is not None:
            auth = (b"AUTH", self._password.encode())
            if self._username is not None:
                auth = (b"AUTH", self._username.encode(), self._password.encode())
            try:
                reply = conn.execute([Call(auth)], min(deadline, time.monotonic() + limit))[0]
            except BaseException as exc:
                conn.close()
                error = self._failure(node, exc, fresh=True)
                if error is None:
                    node.open_failed(None)
                    raise
                self._open_failed(node, error)
                raise error from exc
            if isinstance(reply, RespErrorReply):
                conn.close()
                who = f"user {self._username!r}" if self._username else "the password"
                error = RemoteAuthError(f"{node.where}: AUTH with {who} refused: {reply.message}")
                self._open_failed(node, error)
                raise error
        node.opened()
        return conn

    def _open_failed(self, node: Node, error: RemoteError) -> None:
        if isinstance(error, RemoteTimeout):
            node.open_failed(None)
        else:
            node.open_failed(str(error))
            self._on_trouble()

    def _connect_failure(self, node: Node, exc: Exception, limit: float) -> RemoteError:
        where, timeout = node.where, self._settings.connect_timeout_s
        if isinstance(exc, TlsHandshakeFailed):
            if exc.timed_out and limit < timeout:
                return RemoteTimeout(f"{where}: the deadline passed during the TLS handshake")
            if exc.timed_out and node.answered:
                return RemoteUnavailable(f"{where}: {exc} (the server is stalled)")
            hint = (" (a plain port never answers a TLS handshake: use redis://?)" if exc.timed_out
                    else " (certificates, ca_file, or a plain port: use redis://?)")
            return RemoteAuthError(f"{where}: {exc}{hint}")
        if isinstance(exc, TimeoutError):
            if limit < timeout:
                return RemoteTimeout(f"{where}: the deadline passed while connecting")
            return RemoteUnavailable(f"{where}: no TCP connection within {timeout:g} s")
        return RemoteUnavailable(f"{where}: connect failed: {exc}")

    def _failure(self, node: Node, exc: BaseException, fresh: bool) -> RemoteError | None:
        """The RemoteError for an exchange (on a ``fresh`` connection or not) that raised
        ``exc``; None for what is not the network's doing."""
        where = node.where
        if isinstance(exc, TimeoutError):
            return RemoteTimeout(f"{where}: no reply before the deadline; connection closed")
        tls_likely = fresh and not node.answered and self._ssl is None
        if isinstance(exc, RespProtocolError):
            error = RemoteError(f"{where}: {exc}")
            if tls_likely:
                error = RemoteAuthError(f"{where}: {exc} (the port likely speaks TLS: use rediss://)")
        elif isinstance(exc, ssl.SSLError):  # TLS 1.3 reports a refused client cert here
            error = RemoteAuthError(f"{where}: TLS: {exc}")
        elif isinstance(exc, (PeerClosed, ConnectionResetError)) and tls_likely:
            error = RemoteAuthError(f"{where}: the server closed the connection without a reply: "
                                    "the port likely expects TLS (use rediss://)")
        elif isinstance(exc, OSError):
            error = RemoteUnavailable(f"{where}: connection failed: {exc}")
        else:
            return None
        return error
