"""Wire compatibility: fields added at the end of a message, with a default, keep
PROTOCOL_VERSION unchanged because peers of either age still decode each other's frames."""

from __future__ import annotations

import msgspec

from kvdepot import protocol as p


# The messages as peers built before LookupReply.offsets and Release.retrieved define them.
class OldRelease(msgspec.Struct, tag="Release", array_like=True):
    req_id: int
    leases: list[int]


class OldLookupReply(msgspec.Struct, tag="LookupReply", array_like=True):
    req_id: int
    hit_chunks: int
    lease: int = 0


def test_a_new_server_decodes_an_old_clients_release():
    release = p.decode_request(msgspec.msgpack.encode(OldRelease(req_id=3, leases=[7, 8])))
    assert release == p.Release(req_id=3, leases=[7, 8], retrieved=[])
    # A Batch frame is ["Batch", req_id, [ops...]]; an old client's ops inside it decode too.
    batch = p.decode_request(msgspec.msgpack.encode(["Batch", 4, [OldRelease(req_id=5, leases=[9])]]))
    assert isinstance(batch, p.Batch) and batch.ops == [p.Release(req_id=5, leases=[9])]


def test_a_new_client_decodes_an_old_servers_lookup_reply():
    for old in (OldLookupReply(req_id=1, hit_chunks=4, lease=12), OldLookupReply(req_id=2, hit_chunks=0)):
        reply = p.decode_reply(msgspec.msgpack.encode(old))
        assert isinstance(reply, p.LookupReply) and reply.offsets == []
        assert (reply.req_id, reply.hit_chunks, reply.lease) == (old.req_id, old.hit_chunks, old.lease)


def test_old_peers_decode_the_new_messages_and_ignore_the_new_fields():
    frame = p.encode(p.Release(req_id=3, leases=[7, 8], retrieved=[7]))
    assert msgspec.msgpack.decode(frame, type=OldRelease) == OldRelease(req_id=3, leases=[7, 8])
    frame = p.encode(p.LookupReply(req_id=1, hit_chunks=2, lease=5, offsets=[0, 4096, 8192, 12288]))
    assert msgspec.msgpack.decode(frame, type=OldLookupReply) == OldLookupReply(1, 2, 5)


def test_the_new_fields_round_trip_and_defaults_are_not_shared():
    release = p.Release(req_id=1, leases=[1, 2], retrieved=[2])
    assert p.decode_request(p.encode(release)) == release
    reply = p.LookupReply(req_id=1, hit_chunks=1, lease=3, offsets=[0, 65536])
    assert p.decode_reply(p.encode(reply)) == reply
    a, b = p.LookupReply(req_id=1, hit_chunks=0), p.LookupReply(req_id=2, hit_chunks=0)
    a.offsets.append(1)
    assert b.offsets == []


# Reserve before ``parent``, HelloReply before ``arena_identity`` (issue 10, faults 7 and 8).
class OldReserve(msgspec.Struct, tag="Reserve", array_like=True):
    req_id: int
    namespace: int
    rank: int
    keys: bytes
    ttl_ms: int = 0


class OldHelloReply(msgspec.Struct, tag="HelloReply", array_like=True):
    req_id: int
    protocol_version: int
    boot_id: str
    server_version: str
    shm_name: str
    arena_bytes: int
    chunk_tokens: int
    heartbeat_ms: int
    session_timeout_ms: int


def test_an_old_clients_reserve_is_a_chain_head_and_old_peers_ignore_parent():
    keys = b"\x01" * p.KEY_BYTES * 2
    reserve = p.decode_request(msgspec.msgpack.encode(OldReserve(req_id=1, namespace=2, rank=0, keys=keys)))
    assert reserve == p.Reserve(req_id=1, namespace=2, rank=0, keys=keys, ttl_ms=0, parent=b"")
    new = p.Reserve(req_id=1, namespace=2, rank=0, keys=keys, parent=b"\x02" * p.KEY_BYTES)
    assert p.decode_request(p.encode(new)) == new
    assert msgspec.msgpack.decode(p.encode(new), type=OldReserve) == OldReserve(1, 2, 0, keys)


def test_a_new_client_knows_whether_the_server_writes_an_arena_identity():
    old = OldHelloReply(1, p.PROTOCOL_VERSION, "b" * 32, "0.1", "kvdepot", 1 << 30, 256, 1000, 10000)
    reply = p.decode_reply(msgspec.msgpack.encode(old))
    assert isinstance(reply, p.HelloReply) and reply.arena_identity is False  # nothing to check
    new = p.HelloReply(1, p.PROTOCOL_VERSION, "b" * 32, "0.2", "kvdepot", 1 << 30, 256, 1000, 10000, True)
    assert p.decode_reply(p.encode(new)).arena_identity is True
    assert msgspec.msgpack.decode(p.encode(new), type=OldHelloReply).boot_id == old.boot_id
