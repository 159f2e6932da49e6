"""CURVE on the client's side: its keys, and what each connection handshake came to.

A CURVE handshake that fails is silent on the socket: the connection never comes up, and a
call would only time out. The socket's monitor tells why (HandshakeWatch), so a refused client
gets an AuthenticationFailed that says what to fix within one round trip, not a timeout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvdepot.client.errors import AuthenticationFailed
from kvdepot.server.auth import load_secret_certificate, read_certificate

_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_NOBLOCK = int(zmq.NOBLOCK)


@dataclass(frozen=True)
class ClientCurve:
    """The keys of a CURVE client (Z85, 40 characters each): the server's public key, and
    this client's key pair (its public key goes into the server's allowed keys)."""

    server_key: bytes
    public_key: bytes
    secret_key: bytes = field(repr=False)  # never in a log line

    @classmethod
    def from_files(
        cls, server_key: str | os.PathLike, client_key: str | os.PathLike
    ) -> "ClientCurve":
        """From the server's public certificate (NAME.key) and this client's secret one
        (NAME.key_secret), as `kvdepot keys generate` writes them. Raises ValueError naming
        the file and the reason (no such file, malformed, the wrong kind of certificate)."""
        server_public, server_secret = read_certificate(server_key)
        if server_secret is not None:
            raise ValueError(f"{server_key} holds the server's secret key: clients need only its "
                             "public certificate (NAME.key); keep the secret one on the server")
        public, secret = load_secret_certificate(client_key)
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the server (before it connects)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)


class HandshakeWatch:
    """The outcome of a socket's latest connection handshake, from its monitor.

    ``failure``: an AuthenticationFailed saying why the latest handshake failed, None once one
    succeeds (or before any ended). ``drain`` reads what the monitor holds; ``socket`` is the
    monitor's, to poll with the data socket.
    """

    def __init__(self, sock: zmq.Socket, endpoint: str, curve: ClientCurve | None):
        self._data = sock
        self._endpoint = endpoint
        self._curve = curve
        self.socket = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.failure: AuthenticationFailed | None = None

    def drain(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.socket, _NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failure = None
            else:
                self.failure = AuthenticationFailed(0, self._why(event["event"], event["value"]))

    def _why(self, event: int, value: int) -> str:
        at, curve = f"the cache server at {self._endpoint}", self._curve
        mismatch = value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and curve is not None:  # value: ZAP status
            return (f"{at} refused this client's CURVE key {curve.public_key.decode()} (status "
                    f"{value}): add its public certificate (NAME.key) to the server's "
                    "--curve-allowed-keys directory")
        if curve is None and (mismatch or event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            # Without a mechanism error the server only hung up (error 0x20: a broken pipe).
            requires = "requires" if mismatch else "refused the handshake: it probably requires"
            return (f"{at} {requires} CURVE authentication: give this client the server's "
                    "public certificate and a secret certificate of its own (connector: "
                    "kvdepot.curve_server_key and kvdepot.curve_client_key, or env "
                    "KVDEPOT_CURVE_SERVER_KEY and KVDEPOT_CURVE_CLIENT_KEY)")
        if mismatch:
            return (f"{at} does not use CURVE (started without --curve-secret-key), but this "
                    "client is given keys for it")
        if curve is not None and event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            return (f"the CURVE handshake with {at} failed: the server public key this client "
                    f"has ({curve.server_key.decode()}) is probably not that server's")
        return f"the handshake with {at} failed (event {event:#x}, error {value:#x})"

    def close(self) -> None:
        try:
            self._data.disable_monitor()
        except zmq.ZMQError:
            pass
        self.socket.close(linger=0)

