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


# LookupReply before ``pending`` and ServerStats before ``tiers`` (issue 11: the disk tier).
class LookupReplyBeforePending(msgspec.Struct, tag="LookupReply", array_like=True):
    req_id: int
    hit_chunks: int
    lease: int = 0
    offsets: list[int] = []


def test_pending_is_zero_from_an_old_server_and_ignored_by_an_old_client():
    old = LookupReplyBeforePending(req_id=1, hit_chunks=2, lease=5, offsets=[0, 4096])
    reply = p.decode_reply(msgspec.msgpack.encode(old))
    assert isinstance(reply, p.LookupReply) and reply.pending == 0 and reply.offsets == [0, 4096]
    new = p.LookupReply(req_id=1, hit_chunks=2, lease=5, offsets=[0, 4096], pending=3)
    assert p.decode_reply(p.encode(new)) == new
    assert msgspec.msgpack.decode(p.encode(new), type=LookupReplyBeforePending) == old


def test_stats_without_tiers_decode_and_old_peers_ignore_them():
    [stats] = [m.stats for m in samples() if isinstance(m, p.StatsReply)]  # with a disk tier
    assert stats.tiers and stats.tiers[0].name == "disk"
    as_map = msgspec.structs.asdict(stats)
    as_map.pop("tiers")
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(as_map), type=p.ServerStats)
    assert old.tiers == [] and old.lookups == stats.lookups
    json_stats = msgspec.json.decode(msgspec.json.encode(stats), type=p.ServerStats)
    assert json_stats == stats


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


# --- explicit wire tags: every frame is what it was, and a class rename cannot change it ------


def samples() -> list[p.Message]:
    """One message of every type, every field set."""
    g = p.KVGeometry(num_layers=2, num_kv_heads=2, head_size_k=16, head_size_v=16, dtype="bfloat16",
                     block_size=16, num_planes=2, piece_bytes=2048, layout="layer_major:2x2048:test")
    key = bytes(range(16))
    disk = p.TierStats("disk", {"path": "/var/cache/kvdepot", "write_policy": "write-back"},
                       10**9, 8192, 1, 2, 3, 16, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
                       18, 1.5e9, "")
    stats = p.ServerStats("0.1.0", "b" * 32, 1.5, True, 1 << 30, 4096, (1 << 30) - 4096, 256, 1, 1, 1,
                          2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, {"NO_SPACE": 2},
                          [disk])
    return [
        p.Hello(req_id=1, protocol_version=1, engine_id="engine-a", pid=4242),
        p.Register(req_id=2, model="m", geometry=g, world_size=2, salt="tenant"),
        p.Lookup(req_id=3, namespace=1, keys=key * 2, lease_ms=500),
        p.Reserve(req_id=4, namespace=1, rank=1, keys=key, ttl_ms=9, parent=key[::-1]),
        p.Commit(req_id=5, reservation=7),
        p.Abort(req_id=6, reservation=8),
        p.Acquire(req_id=7, namespace=1, rank=0, keys=key, lease_ms=100),
        p.Release(req_id=8, leases=[1, 2], retrieved=[2]),
        p.Heartbeat(req_id=9),
        p.GetStats(req_id=10),
        p.Goodbye(req_id=11),
        p.Batch(req_id=12, ops=[p.Heartbeat(req_id=13), p.Commit(req_id=14, reservation=3)]),
        p.HelloReply(1, 1, "b" * 32, "0.1.0", "kvdepot", 1 << 30, 256, 1000, 10000, True),
        p.RegisterReply(req_id=2, namespace=1, namespace_digest=key, slot_bytes=65536, chunk_tokens=256),
        p.LookupReply(req_id=3, hit_chunks=2, lease=5, offsets=[0, 65536], pending=4),
        p.ReserveReply(req_id=4, reservation=6, status=[0, 1], offsets=[4096, -1]),
        p.CommitReply(req_id=5, committed=2),
        p.AcquireReply(req_id=7, lease=9, offsets=[8192]),
        p.OkReply(req_id=8),
        p.StatsReply(req_id=10, stats=stats),
        p.ErrorReply(req_id=11, code=4, message="bad"),
        p.BatchReply(req_id=12, replies=[p.OkReply(req_id=13), p.ErrorReply(req_id=14, code=10, message="gone")]),
    ]


# Hex of each sample's frame, from the protocol before explicit tags (commit e0a4daa); the
# frames of LookupReply and StatsReply grew by the trailing fields of issue 11 (``pending``,
# ``tiers``), and a tier's stats by the remote tier's of issue 12 (``probes`` ... ``nodes``):
# every byte before them is what it was.
PINNED = {
    "Hello": "95a548656c6c6f0101a8656e67696e652d61cd1092",
    "Register": (
        "96a8526567697374657202a16d89aa6e756d5f6c617965727302ac6e756d5f6b765f686561647302ab686561"
        "645f73697a655f6b10ab686561645f73697a655f7610a56474797065a862666c6f61743136aa626c6f636b5f"
        "73697a6510aa6e756d5f706c616e657302ab70696563655f6279746573cd0800a66c61796f7574b76c617965"
        "725f6d616a6f723a3278323034383a7465737402a674656e616e74"
    ),
    "Lookup": (
        "95a64c6f6f6b75700301c420000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f"
        "cd01f4"
    ),
    "Reserve": (
        "97a752657365727665040101c410000102030405060708090a0b0c0d0e0f09c4100f0e0d0c0b0a0908070605"
        "0403020100"
    ),
    "Commit": "93a6436f6d6d69740507",
    "Abort": "93a541626f72740608",
    "Acquire": "96a741637175697265070100c410000102030405060708090a0b0c0d0e0f64",
    "Release": "94a752656c65617365089201029102",
    "Heartbeat": "92a948656172746265617409",
    "GetStats": "92a847657453746174730a",
    "Goodbye": "92a7476f6f646279650b",
    "Batch": "93a542617463680c9292a94865617274626561740d93a6436f6d6d69740e03",
    "HelloReply": (
        "9baa48656c6c6f5265706c790101d92062626262626262626262626262626262626262626262626262626262"
        "62626262a5302e312e30a76b766465706f74ce40000000cd0100cd03e8cd2710c3"
    ),
    "RegisterReply": "96ad52656769737465725265706c790201c410000102030405060708090a0b0c0d0e0fce00010000cd0100",
    # One more array item (0x95 -> 0x96): pending, 4.
    "LookupReply": "96ab4c6f6f6b75705265706c790302059200ce00010000" "04",
    "ReserveReply": "95ac526573657276655265706c79040692000192cd1000ff",
    "CommitReply": "93ab436f6d6d69745265706c790502",
    "AcquireReply": "94ac416371756972655265706c79070991cd2000",
    "OkReply": "92a74f6b5265706c7908",
    # ServerStats grew by "tenants" (an empty list): 0xde001d -> 0xde001e, its key at the end.
    "StatsReply": (
        "93aa53746174735265706c790ade001ea776657273696f6ea5302e312e30a7626f6f745f6964d9206262626262"
        "626262626262626262626262626262626262626262626262626262a8757074696d655f73cb3ff8000000000000"
        "a57265616479c3ab6172656e615f6279746573ce40000000aa757365645f6279746573cd1000aa667265655f62"
        "79746573ce3ffff000ac6368756e6b5f746f6b656e73cd0100a66368756e6b7301aa6e616d6573706163657301"
        "b1656e67696e65735f636f6e6e656374656401ab6c65617365735f68656c6402b17265736572766174696f6e73"
        "5f6f70656e03a76c6f6f6b75707304aa6869745f6368756e6b7305ab6d6973735f6368756e6b7306aa6869745f"
        "746f6b656e7307ab6d6973735f746f6b656e7308ad73746f7265645f6368756e6b7309ad73746f7265645f746f"
        "6b656e730aac73746f7265645f62797465730bb07265747269657665645f6368756e6b730cb072657472696576"
        "65645f746f6b656e730daf7265747269657665645f62797465730eae657669637465645f6368756e6b730fae65"
        "7870697265645f6c656173657310b4657870697265645f7265736572766174696f6e7311a66572726f727381a8"
        "4e4f5f535041434502a5746965727391de001ea46e616d65a46469736ba873657474696e677382a470617468b2"
        "2f7661722f63616368652f6b766465706f74ac77726974655f706f6c696379aa77726974652d6261636bae6361"
        "7061636974795f6279746573ce3b9aca00aa757365645f6279746573cd2000a566696c657301ad77616974696e"
        "675f66696c657302b0636f706965735f696e5f666c6967687403ab71756575655f646570746810a67772697465"
        "7304ad7772697474656e5f627974657305a5726561647306aa726561645f627974657307b1636865636b73756d"
        "5f6661696c7572657308a96261645f66696c657309b274656d705f66696c65735f72656d6f7665640aac777269"
        "74655f6572726f72730bab726561645f6572726f72730cae64726f707065645f7772697465730dac6e6f745f61"
        "646d69747465640eb070726566657463685f737461727465640faf70726566657463685f6c616e64656410b170"
        "726566657463685f74696d656f75747311b070726566657463685f736b697070656412b0726561645f62797465"
        "735f7065725f73cb41d65a0bc0000000aa6c6173745f6572726f72a0a670726f62657300ab70726f62655f666f"
        "756e6400ac70726f62655f6572726f727300ae616c72656164795f73746f72656400a56e6f64657390a774656e"
        "616e747390"
    ),
    "ErrorReply": "94aa4572726f725265706c790b04a3626164",
    "BatchReply": "93aa42617463685265706c790c9292a74f6b5265706c790d94aa4572726f725265706c790e0aa4676f6e65",
}


def test_every_message_encodes_to_its_pinned_frame_and_the_hand_built_array():
    messages = samples()
    assert {type(m) for m in messages} == set(p.SingleRequest.__args__) | {p.Batch} | set(p.Reply.__args__)
    for message in messages:
        tag = type(message).__name__
        frame = p.encode(message)
        assert frame.hex() == PINNED[tag], tag
        # array_like and tagged: [tag, field, field, ...] in declaration order.
        assert frame == msgspec.msgpack.encode([tag, *msgspec.structs.astuple(message)]), tag
        decode = p.decode_reply if tag.endswith("Reply") else p.decode_request
        assert decode(frame) == message


def test_every_message_names_its_wire_tag_explicitly():
    for cls in (*p.SingleRequest.__args__, p.Batch, *p.Reply.__args__):
        assert issubclass(cls, p.Message) and cls.__struct_config__.array_like
        assert p.wire_tag(cls) == cls.__name__  # today's tags: the names the classes had
    # A subclass inherits an explicit tag (a rename keeps the wire); tag=True would not.
    Renamed = type("RenamedLookup", (p.Lookup,), {})
    message = Renamed(req_id=3, namespace=1, keys=bytes(16), lease_ms=5)
    assert p.wire_tag(Renamed) == "Lookup"
    assert p.encode(message) == p.encode(p.Lookup(req_id=3, namespace=1, keys=bytes(16), lease_ms=5))

    class ByName(msgspec.Struct, tag=True, array_like=True):
        req_id: int

    assert msgspec.msgpack.encode(type("Other", (ByName,), {})(1)) != msgspec.msgpack.encode(ByName(1))
