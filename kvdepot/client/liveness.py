"""The client's heartbeat thread: keeps its session alive while the engine sends nothing."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import zmq

from kvdepot import protocol as p
from kvdepot.client.errors import KVDepotError

if TYPE_CHECKING:
    from kvdepot.client.engine_client import KVDepotClient


def heartbeat_loop(client: "KVDepotClient") -> None:
    """A Heartbeat whenever the client sent nothing for the server's heartbeat interval; a
    session the server dropped is opened again. Runs until the client closes."""
    while not client._closed:
        time.sleep(min(client.heartbeat_s, 1.0) / 2)
        if client._closed or client.boot_id is None:
            continue
        if time.monotonic() - client._last_send < client.heartbeat_s:
            continue
        try:
            with client._lock:
                if client._closed:
                    return
                req_id = client._send(p.Heartbeat(req_id=0))
                reply = client._collect(req_id, time.monotonic() + client.timeout_s)
                if reply is None:
                    client._timed_out(req_id)
                elif isinstance(reply, p.ErrorReply) and reply.code == p.ErrorCode.NO_SESSION:
                    client._handshake()
        except KVDepotError:
            pass  # the next real call reports it
        except zmq.ZMQError:
            return
