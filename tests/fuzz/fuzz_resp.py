"""Fuzz target ``resp``: what a Redis/Valkey node's bytes go through in the remote tier's own
RESP2 client (kvdepot.server.tiers.resp): the reply parser of a real Connection on a real
socket, then the parsers of CLUSTER SLOTS replies and MOVED/ASK redirections.

The input's first byte chooses how the replies are read (a ``Call.into`` view of 0-127
bytes, with or without a checksum, or none); the rest is what the node sends, after which
it closes the connection. Replies are read until the end.

Properties: reading raises only what wire.py documents for bytes a node sends (PeerClosed
at the end, RespProtocolError for what is not RESP2), never anything else (a RecursionError,
a MemoryError, a UnicodeDecodeError would escape the tier's handlers); a reply is bytes, an
int, None, a RespErrorReply or a list of those; a value read ``into`` a view is its length
(or a Filled with the CRC32C of exactly the view's bytes, with a checksum); the topology parsers raise only
RespProtocolError.
"""

from __future__ import annotations

import socket
import time

from fuzz_common import fuzz, instrumented

with instrumented(__name__):
    import crc32c

    from kvdepot.server.tiers.resp import wire
    from kvdepot.server.tiers.resp.nodes import parse_cluster_slots, parse_redirect
    from kvdepot.server.tiers.resp.settings import Endpoint

ASKED = Endpoint("10.0.0.1", 6379)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, sent = data[0], data[1:]
    into = memoryview(bytearray(mode >> 2)) if mode & 1 else None
    checksum = bool(mode & 2) and into is not None
    ours, node = socket.socketpair()
    try:
        node.sendall(sent)
        node.shutdown(socket.SHUT_WR)
        conn = wire.Connection(ours)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                reply = conn.read_reply(deadline, into, checksum)
            except (wire.PeerClosed, wire.RespProtocolError):
                return
            _check(reply, into, checksum)
    finally:
        ours.close()
        node.close()


def _check(reply, into, checksum: bool) -> None:
    if isinstance(reply, wire.Filled):  # a value read into the view (an int is one too, or :n)
        assert into is not None and checksum and reply.nbytes == into.nbytes, reply
        assert reply.crc32c == crc32c.crc32c(into), "the CRC of other bytes than the value's"
        return
    _check_shape(reply, 0)
    if isinstance(reply, wire.RespErrorReply):
        assert isinstance(reply.code, str)
        try:
            kind, slot, where = parse_redirect(reply, ASKED)
            assert isinstance(slot, int) and isinstance(where.port, int), (kind, slot, where)
        except wire.RespProtocolError:
            pass
    elif isinstance(reply, list):
        try:
            ranges = parse_cluster_slots(reply, ASKED)
        except wire.RespProtocolError:
            return
        for first, last, master, replicas in ranges:
            assert 0 <= first <= last < 16384 and isinstance(master.host, str), ranges


def _check_shape(reply, depth: int) -> None:
    if isinstance(reply, list):
        for item in reply:
            _check_shape(item, depth + 1)
    else:
        assert reply is None or isinstance(reply, (bytes, int, wire.RespErrorReply)), type(reply)


if __name__ == "__main__":
    fuzz(TestOneInput)
