"""One remote node's connection pool, backoff and counters; reading the cluster's topology
(CLUSTER SLOTS) and redirections (MOVED / ASK). Used by client.py."""

from __future__ import annotations

import random
import threading
import time

from kvdepot.server.tiers.resp.settings import (
    Endpoint, NodeStats, RemoteTimeout, RemoteUnavailable,
)
from kvdepot.server.tiers.resp.wire import Connection, RespErrorReply, RespProtocolError

SLOTS = 16384


class Node:
    """A server: at most ``pool_size`` connections (idle ones pooled), its backoff after a
    failure, and counters. Thread-safe; a connection is lent to one thread at a time.

    Backoff: after ``failures`` failures in a row the node is not tried for a random time in
    [max(min_s, d / 2), d], d = min(max_s, min_s * 2 ** (failures - 1)) seconds; once that
    passes, one caller probes it with a new connection while the others fail fast.
    """

    def __init__(self, endpoint: Endpoint, role: str, *, scheme: str, pool_size: int,
                 backoff_min_s: float, backoff_max_s: float, rng: random.Random):
        self.endpoint = endpoint
        self.where = f"{scheme}://{endpoint}"
        self.role = role
        self._pool_size = pool_size
        self._backoff = (backoff_min_s, backoff_max_s)
        self._rng = rng
        self._cond = threading.Condition()
        self._idle: list[Connection] = []
        self._open = 0  # connections lent out or idle, plus connects in progress
        self._failures = 0
        self._backoff_until = 0.0
        self._probing = False
        self._closed = False
        self.answered = False  # some exchange ever succeeded (then TLS is not the problem)
        self.suspect = False  # failed or timed out since its last success
        self._sent = self._received = self._calls = self._round_trips = self._errors = 0
        self._last_error: str | None = None

    def acquire(self, deadline: float) -> Connection | None:
        """An idle connection, or None: the caller must open one and then call ``opened``
        or ``open_failed``. Raises RemoteUnavailable in backoff (or while another caller
        probes the node) and RemoteTimeout when every connection stays busy until
        ``deadline``."""
        with self._cond:
            while True:
                if self._closed:
                    raise RemoteUnavailable(f"{self.where}: the client is closed")
                now = time.monotonic()
                if now < self._backoff_until:
                    raise RemoteUnavailable(
                        f"{self.where}: in backoff for {self._backoff_until - now:.2f} s more "
                        f"after: {self._last_error}")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._pool_size:
                    if self._failures and self._probing:
                        raise RemoteUnavailable(
                            f"{self.where}: reconnecting after: {self._last_error}")
                    self._open += 1
                    self._probing = self._failures > 0
                    return None
                if now >= deadline:
                    raise RemoteTimeout(
                        f"{self.where}: all {self._pool_size} connections stayed busy until the deadline")
                self._cond.wait(deadline - now)

    def opened(self) -> None:
        """The connection ``acquire`` let the caller open is up (and authenticated)."""
        with self._cond:
            self._probing = False
            self._reset()

    def open_failed(self, error: str | None) -> None:
        """Opening failed: a node failure (backoff) when ``error`` is given, else only the
        caller's deadline ran out."""
        with self._cond:
            self._open -= 1
            self._probing = False
            self._errors += 1
            if error is not None:
                self._fail(error)
            else:
                self._last_error = "connect: the call's deadline passed"
            self._cond.notify()

    def release(self, conn: Connection) -> None:
        """Give back a connection whose exchange succeeded."""
        with self._cond:
            if self._closed:
                self._open -= 1
                conn.close()
            else:
                self._idle.append(conn)
            self._cond.notify()

    def discard(self, conn: Connection) -> None:
        """Close a connection whose state is unknown (it failed or timed out)."""
        conn.close()
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def drop_idle(self) -> None:
        """Close the pooled connections (they are likely as stale as one just found dead)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def failed(self, error: str) -> None:
        """The node failed (connection refused or broken): back off and drop the pool."""
        with self._cond:
            self._errors += 1
            self._fail(error)
        self.drop_idle()

    def timed_out(self, error: str) -> None:
        """An exchange passed its deadline: counted and suspect, but no backoff (a slow
        transfer under a tight deadline is no proof the node is down)."""
        with self._cond:
            self._errors += 1
            self._last_error = error
            self.suspect = True

    def tally(self, sent: int, received: int, calls: int) -> None:
        """Count one round trip; ``calls`` commands succeeded (0: it failed)."""
        with self._cond:
            self._sent += sent
            self._received += received
            self._round_trips += 1
            self._calls += calls
            if calls:
                self.answered = True
                self._reset()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.drop_idle()

    def stats(self) -> NodeStats:
        with self._cond:
            now = time.monotonic()
            backoff = self._backoff_until if now < self._backoff_until else None
            return NodeStats(
                address=str(self.endpoint), role=self.role,
                connected=self._open > 0 or backoff is None,
                open_connections=self._open, bytes_sent=self._sent,
                bytes_received=self._received, calls=self._calls,
                round_trips=self._round_trips, errors=self._errors,
                last_error=self._last_error, backoff_until=backoff,
            )

    def _fail(self, error: str) -> None:
        self._failures += 1
        low, high = self._backoff
        ceiling = min(high, low * 2 ** min(self._failures - 1, 60))
        self._backoff_until = time.monotonic() + self._rng.uniform(max(low, ceiling / 2), ceiling)
        self._last_error = error
        self.suspect = True
        self._cond.notify_all()  # waiters for a connection now fail fast

    def _reset(self) -> None:
        self._failures = 0
        self._backoff_until = 0.0
        self.suspect = False


def parse_cluster_slots(reply, asked: Endpoint) -> list[tuple[int, int, Endpoint, list[Endpoint]]]:
    """(first slot, last slot, master, replicas) per range of a CLUSTER SLOTS reply. A node
    with no address given ("" or "?") is at the host the question went to. Raises
    RespProtocolError for a reply of another shape."""
    if not isinstance(reply, list):
        raise RespProtocolError(f"CLUSTER SLOTS answered {reply!r:.80}")
    ranges = []
    for entry in reply:
        if (not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[0], int)
                or not isinstance(entry[1], int) or not 0 <= entry[0] <= entry[1] < SLOTS):
            raise RespProtocolError(f"CLUSTER SLOTS entry {entry!r:.80} is not a slot range")
        nodes = [_endpoint(node, asked) for node in entry[2:]]
        ranges.append((entry[0], entry[1], nodes[0], nodes[1:]))
    return ranges


def _endpoint(node, asked: Endpoint) -> Endpoint:
    if not isinstance(node, list) or len(node) < 2 or not isinstance(node[1], int):
        raise RespProtocolError(f"CLUSTER SLOTS node {node!r:.80} has no host and port")
    try:
        host = node[0].decode() if isinstance(node[0], bytes) else ""
    except UnicodeDecodeError:
        raise RespProtocolError(f"CLUSTER SLOTS node host {node[0]!r:.80} is not text") from None
    return Endpoint(host if host not in ("", "?") else asked.host, node[1])


def parse_redirect(reply: RespErrorReply, asked: Endpoint) -> tuple[str, int, Endpoint]:
    """("MOVED" or "ASK", slot, where to go) of ``-MOVED 3999 127.0.0.1:6381``. Raises
    RespProtocolError when malformed."""
    try:
        kind, slot, address = reply.message.split(" ")
        host, _, port = address.rpartition(":")
        return kind, int(slot), Endpoint(host.strip("[]") or asked.host, int(port))
    except ValueError:
        raise RespProtocolError(f"malformed redirection {reply.message!r:.80}") from None
