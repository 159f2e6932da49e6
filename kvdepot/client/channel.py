"""The client's connection to the server: one DEALER socket in a ZMQ context of its own."""

from __future__ import annotations

import time

import zmq

from kvdepot.client.curve import ClientCurve, HandshakeWatch
from kvdepot.client.errors import ServerUnavailable


class Channel:
    """The DEALER socket to ``endpoint`` (CURVE with ``curve``) and the outcome of its
    handshakes. ``socket`` and ``poller`` (POLLIN on it) are for the client's request path;
    not thread-safe: the client holds its lock around every use."""

    def __init__(self, endpoint: str, curve: ClientCurve | None):
        self.endpoint = endpoint
        self._ctx = zmq.Context()
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        # Never queue requests for a server that is not there: they would arrive late.
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if curve is not None:
            curve.apply(s)
        self._watch = HandshakeWatch(s, endpoint, curve)  # before connecting: sees the first
        s.connect(endpoint)
        self.socket = s
        # One long-lived poller: Socket.poll() builds a new one per call, which showed up in
        # every round trip.
        self.poller = zmq.Poller()
        self.poller.register(s, zmq.POLLIN)
        self._connecting = zmq.Poller()
        self._connecting.register(s, zmq.POLLOUT)
        self._connecting.register(self._watch.socket, zmq.POLLIN)

    def wait_connected(self, timeout_s: float) -> None:
        """Return once a connection is up, its handshake done. Raises AuthenticationFailed
        as soon as a handshake fails, and ServerUnavailable when no connection comes up
        within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        self._watch.drain()
        if self._watch.failure is not None and not self.socket.poll(0, zmq.POLLOUT):
            self._reconnect()
        while True:
            self._watch.drain()
            if self.socket.poll(0, zmq.POLLOUT):  # with IMMEDIATE: a connection is up
                return
            if self._watch.failure is not None:
                raise self._watch.failure
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailable(0, f"cannot connect to the cache server at {self.endpoint}")
            self._connecting.poll(max(1, int(remaining * 1000)))

    def _reconnect(self) -> None:
        """Connect anew after a failed handshake: libzmq ends a connection's session for good
        on a protocol error (a refused key, a mechanism mismatch) and never tries it again, so
        keys fixed since would go unused."""
        try:
            self.socket.disconnect(self.endpoint)
        except zmq.ZMQError:  # already gone
            pass
        self._watch.failure = None
        self.socket.connect(self.endpoint)

    def close(self) -> None:
        if self._ctx.closed:
            return
        self._watch.close()
        self.socket.close(linger=0)
        self._ctx.term()

    def __del__(self) -> None:
        # A client dropped without close(): close here, in the order libzmq needs. Left to
        # the garbage collector, the context's finalizer may run while a socket is being
        # torn down but not yet closed, and wait for it forever.
        if hasattr(self, "_connecting"):  # __init__ completed
            self.close()
