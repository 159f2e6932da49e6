"""The real server process, driven by real clients over TCP loopback."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import msgspec
import numpy as np
import pytest
import zmq
from conftest import small_geometry
from server_process import ServerProcess
from test_protocol import OldLookupReply, OldRelease

from kvdepot import protocol as p
from kvdepot.client import KVDepotClient, KVDepotError, ServerRestarted, ServerUnavailable
from kvdepot.protocol import SlotStatus


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100_000) for _ in range(n)]


def store_pattern(client: KVDepotClient, ns, rank: int, keys: list[bytes], seed: int) -> list[bytes]:
    """Reserve, fill each reserved slot with seeded random bytes, commit; the bytes written."""
    res = client.reserve(ns, rank, keys)
    arena = client.arena_array()
    written = []
    for i, (status, off) in enumerate(zip(res.status, res.offsets)):
        assert status == SlotStatus.RESERVED
        data = np.random.default_rng(seed * 1000 + i).integers(0, 256, ns.slot_bytes, dtype=np.uint8)
        arena[off : off + ns.slot_bytes] = data
        written.append(data.tobytes())
    assert client.commit(res.id) == len(keys)
    return written


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def test_second_client_reads_exactly_what_the_first_stored(make_client, server):
    a, b, c = make_client(), make_client(), make_client()
    geo = small_geometry()
    ns_a, ns_b = a.register("llama", geo), b.register("llama", geo)
    assert ns_a.digest == ns_b.digest
    keys = a.chunk_keys(ns_a, tokens(1, 256 * 5 + 100))
    assert len(keys) == 5 and keys == b.chunk_keys(ns_b, tokens(1, 256 * 5 + 100))
    written = store_pattern(a, ns_a, 0, keys, seed=1)

    hit = b.lookup(ns_b, keys, lease_ms=5000)
    assert hit.hit_chunks == 5 and hit.lease
    got = b.acquire(ns_b, 0, keys)
    arena_b = b.arena_array()
    assert [arena_b[o : o + ns_b.slot_bytes].tobytes() for o in got.offsets] == written
    b.release([hit.lease, got.lease])

    # Another model, another salt: nothing is visible, not even by key.
    ns_other = c.register("mistral", geo)
    ns_salted = c.register("llama", geo, salt="tenant-7")
    for ns in (ns_other, ns_salted):
        assert c.lookup(ns, c.chunk_keys(ns, tokens(1, 256 * 5))).hit_chunks == 0
        assert c.lookup(ns, keys).hit_chunks == 0
        assert c.acquire(ns, 0, keys).offsets == []
    assert "Registered KV cache for engine" in server.log()
    assert "Stored 1280 tokens in" in server.log()
    assert "Retrieved 1280 tokens in" in server.log()


def test_tp2_chunk_hits_only_after_every_rank_commits(make_client):
    rank0, rank1, scheduler = make_client(), make_client(), make_client()
    geo = small_geometry()
    ns0, ns1, nss = (c.register("m", geo, world_size=2) for c in (rank0, rank1, scheduler))
    keys = scheduler.chunk_keys(nss, tokens(2, 256 * 3))
    store_pattern(rank0, ns0, 0, keys, seed=2)
    assert scheduler.lookup(nss, keys).hit_chunks == 0
    store_pattern(rank1, ns1, 1, keys[:2], seed=3)
    assert scheduler.lookup(nss, keys).hit_chunks == 2
    store_pattern(rank1, ns1, 1, keys[2:], seed=4)
    assert scheduler.lookup(nss, keys).hit_chunks == 3
    # Each rank reads its own shard.
    assert rank0.acquire(ns0, 0, keys).offsets != rank1.acquire(ns1, 1, keys).offsets


def test_leased_lookup_offsets_let_every_rank_load_without_acquire(make_client, server):
    rank0, rank1, scheduler = make_client(), make_client(), make_client()
    geo = small_geometry()
    ns0, ns1, nss = (c.register("m", geo, world_size=2) for c in (rank0, rank1, scheduler))
    keys = scheduler.chunk_keys(nss, tokens(5, 256 * 3))
    written = [store_pattern(rank0, ns0, 0, keys, seed=50), store_pattern(rank1, ns1, 1, keys, seed=51)]

    plain = scheduler.lookup(nss, keys)
    assert plain.hit_chunks == 3 and plain.offsets == [] and plain.rank_offsets(1) == []
    hit = scheduler.lookup(nss, keys, lease_ms=5000)
    assert hit.hit_chunks == 3 and hit.lease and len(hit.offsets) == 2 * 3
    with pytest.raises(ValueError):
        hit.rank_offsets(2)
    # Each rank's worker reads its own shard straight from the offsets: no Acquire.
    for worker, rank in ((rank0, 0), (rank1, 1)):
        arena = worker.arena_array()
        got = [arena[o : o + nss.slot_bytes].tobytes() for o in hit.rank_offsets(rank)]
        assert got == written[rank]
    assert scheduler.stats().retrieved_chunks == 0

    scheduler.release([hit.lease], retrieved=[hit.lease])
    stats = scheduler.stats()
    assert stats.leases_held == 0
    assert (stats.retrieved_chunks, stats.retrieved_tokens, stats.retrieved_bytes) == (
        3, 3 * 256, 3 * nss.slot_bytes * 2,
    )
    wait_for(lambda: "Retrieved 768 tokens in" in server.log())


def test_release_with_garbage_retrieved_ids_is_refused_and_the_server_stays_up(make_client, server):
    client = make_client()
    ns = client.register("m", small_geometry())
    keys = client.chunk_keys(ns, tokens(6, 256 * 2))
    store_pattern(client, ns, 0, keys, seed=60)
    hit = client.lookup(ns, keys, lease_ms=60_000)
    for stray in ([hit.lease + 1000], [-1], [2**63], [2**64 - 1]):
        with pytest.raises(KVDepotError) as err:
            client.release([hit.lease], retrieved=stray)
        assert err.value.code == p.ErrorCode.BAD_REQUEST
    with pytest.raises(KVDepotError) as err:
        client.release([], retrieved=[hit.lease])  # read, but not ended
    assert err.value.code == p.ErrorCode.BAD_REQUEST
    with pytest.raises(KVDepotError) as err:
        client.release([-5, hit.lease], retrieved=[-5])
    assert err.value.code == p.ErrorCode.UNKNOWN_LEASE
    with pytest.raises(KVDepotError) as err:
        client.release([hit.lease], retrieved=[hit.lease] * (p.MAX_KEYS_PER_REQUEST + 1))
    assert err.value.code == p.ErrorCode.TOO_LARGE
    replies = client.batch([
        p.Release(req_id=1, leases=[hit.lease], retrieved=[0]),
        p.Heartbeat(req_id=2),
    ])
    assert [type(r).__name__ for r in replies] == ["ErrorReply", "OkReply"]
    assert replies[0].code == p.ErrorCode.BAD_REQUEST

    # Wrong types on the wire: answered with BAD_FRAME.
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"tcp://127.0.0.1:{server.port}")
    raw.send(p.encode(p.Hello(req_id=1, protocol_version=p.PROTOCOL_VERSION, engine_id="raw")))
    assert raw.poll(5000) and isinstance(p.decode_reply(raw.recv()), p.HelloReply)
    for retrieved in (["x"], [1.5], "nope", [[1]]):
        raw.send(msgspec.msgpack.encode(["Release", 3, [1], retrieved]))
        assert raw.poll(5000)
        reply = p.decode_reply(raw.recv())
        assert isinstance(reply, p.ErrorReply) and reply.code == p.ErrorCode.BAD_FRAME
    raw.close()
    ctx.term()

    assert server.alive
    stats = client.stats()
    assert stats.leases_held == 1 and stats.retrieved_chunks == 0  # every refusal changed nothing
    client.release([hit.lease], retrieved=[hit.lease])
    stats = client.stats()
    assert stats.leases_held == 0 and stats.retrieved_chunks == 2


def test_a_client_without_the_new_fields_still_works(make_client, server):
    """An engine built before LookupReply.offsets and Release.retrieved: its Release decodes
    (nothing read), and it decodes the LookupReply it gets while ignoring the offsets."""

    owner = make_client()
    ns = owner.register("m", small_geometry())
    keys = owner.chunk_keys(ns, tokens(7, 256 * 2))
    store_pattern(owner, ns, 0, keys, seed=70)
    ctx = zmq.Context()
    old = ctx.socket(zmq.DEALER)
    old.setsockopt(zmq.LINGER, 0)
    old.connect(f"tcp://127.0.0.1:{server.port}")
    old.send(p.encode(p.Hello(req_id=1, protocol_version=p.PROTOCOL_VERSION, engine_id="old")))
    assert old.poll(5000) and isinstance(p.decode_reply(old.recv()), p.HelloReply)
    old.send(p.encode(p.Lookup(req_id=2, namespace=ns.id, keys=b"".join(keys), lease_ms=5000)))
    assert old.poll(5000)
    reply = msgspec.msgpack.decode(old.recv(), type=OldLookupReply)
    assert reply.req_id == 2 and reply.hit_chunks == 2 and reply.lease
    old.send(msgspec.msgpack.encode(OldRelease(req_id=3, leases=[reply.lease])))
    assert old.poll(5000)
    assert isinstance(p.decode_reply(old.recv()), p.OkReply)
    old.close()
    ctx.term()
    stats = owner.stats()
    assert stats.leases_held == 0 and stats.retrieved_chunks == 0


def test_filling_the_arena_three_times_over(make_client, server):
    writer, holder = make_client(), make_client()
    geo = small_geometry(layers=16)  # 512 KiB per chunk
    ns = writer.register("m", geo)
    ns_h = holder.register("m", geo)
    capacity = writer.stats().arena_bytes
    per_prompt = 4
    prompts = [writer.chunk_keys(ns, tokens(100 + i, 256 * per_prompt)) for i in range(3 * capacity // ns.slot_bytes // per_prompt)]

    held_keys = prompts[0]
    held_bytes = store_pattern(writer, ns, 0, held_keys, seed=100)
    held = holder.acquire(ns_h, 0, held_keys, lease_ms=120_000)
    assert len(held.offsets) == per_prompt

    for i, keys in enumerate(prompts[1:], start=1):
        res = writer.reserve(ns, 0, keys)
        assert all(s == SlotStatus.RESERVED for s in res.status), res.status
        writer.commit(res.id)
        stats = writer.stats()
        assert stats.used_bytes <= stats.arena_bytes
        # The most recently used prefix still hits in full.
        assert writer.lookup(ns, keys).hit_chunks == per_prompt
    stats = writer.stats()
    assert stats.evicted_chunks > capacity // ns.slot_bytes
    # The leased prefix survived every eviction, byte for byte.
    assert writer.lookup(ns, held_keys).hit_chunks == per_prompt
    arena = holder.arena_array()
    assert [arena[o : o + ns.slot_bytes].tobytes() for o in held.offsets] == held_bytes
    holder.release([held.lease])


CRASHING_CLIENT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import small_geometry
    from kvdepot.client import KVDepotClient
    c = KVDepotClient("127.0.0.1", {port}, timeout_ms=2000)
    assert c.connect()
    ns = c.register("m", small_geometry())
    keys = c.chunk_keys(ns, list(range(256 * 8)))
    res = c.reserve(ns, 0, keys[4:])                      # reservations, never committed
    lease = c.acquire(ns, 0, keys[:4], lease_ms=600_000)  # a lease it never releases
    assert res.id and lease.lease
    print("holding", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("session_timeout", [None, "2"])
def test_sigkilled_client_frees_its_memory(tmp_path, session_timeout):
    extra = ["--lease-ttl", "60", "--reservation-ttl", "60"]
    if session_timeout:
        extra += ["--session-timeout", session_timeout]
    with ServerProcess(log_path=tmp_path / "server.log", extra=extra) as server:
        other = KVDepotClient("127.0.0.1", server.port, timeout_ms=2000)
        assert other.connect()
        ns = other.register("m", small_geometry())
        keys = other.chunk_keys(ns, list(range(256 * 8)))
        written = store_pattern(other, ns, 0, keys[:4], seed=5)
        baseline = other.stats().used_bytes

        script = CRASHING_CLIENT.format(tests=os.path.dirname(__file__), port=server.port)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"holding"
        stats = other.stats()
        assert stats.leases_held == 1 and stats.reservations_open == 1
        assert stats.used_bytes > baseline
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Freed well within the 60 s TTLs: on disconnect (or after the 2 s session timeout).
        wait_for(lambda: (s := other.stats()).leases_held == 0 and s.reservations_open == 0)
        assert time.monotonic() - killed_at < 8
        assert other.stats().used_bytes == baseline
        got = other.acquire(ns, 0, keys)
        arena = other.arena_array()
        assert [arena[o : o + ns.slot_bytes].tobytes() for o in got.offsets] == written
        other.close()


def test_server_restart_is_noticed_and_old_slots_never_used(tmp_path):
    srv = ServerProcess(log_path=tmp_path / "server.log")
    srv.start()
    try:
        client = KVDepotClient("127.0.0.1", srv.port, timeout_ms=1000)
        assert client.connect()
        ns = client.register("m", small_geometry())
        keys = client.chunk_keys(ns, tokens(9, 256 * 3))
        store_pattern(client, ns, 0, keys, seed=9)
        old = client.acquire(ns, 0, keys)
        old_boot, old_epoch = client.boot_id, client.epoch

        srv.stop()
        with pytest.raises(ServerUnavailable):
            client.lookup(ns, keys)  # down: a fast, clean miss
        srv.start()

        def reconnected():
            try:
                client.lookup(ns, keys)
            except ServerRestarted:
                return True
            except ServerUnavailable:
                return False
            return client.epoch != old_epoch

        wait_for(reconnected, timeout=15)
        assert client.boot_id != old_boot and client.epoch == old_epoch + 1
        # Nothing from the old boot is usable, and the new server has nothing.
        with pytest.raises(ServerRestarted):
            client.arena(epoch=old.epoch)
        assert client.lookup(ns, keys).hit_chunks == 0
        # The namespace was registered again by itself: storing works at once.
        store_pattern(client, ns, 0, keys, seed=10)
        assert client.lookup(ns, keys).hit_chunks == 3
        client.close()
    finally:
        srv.stop()


def _valid_frames(ns_id: int, keys: bytes) -> list[bytes]:
    return [
        p.encode(p.Hello(req_id=1, protocol_version=p.PROTOCOL_VERSION, engine_id="fuzz")),
        p.encode(p.Lookup(req_id=2, namespace=ns_id, keys=keys, lease_ms=10)),
        p.encode(p.Reserve(req_id=3, namespace=ns_id, rank=0, keys=keys)),
        p.encode(p.Acquire(req_id=4, namespace=ns_id, rank=0, keys=keys)),
        p.encode(p.Release(req_id=5, leases=[1, 2, 3], retrieved=[2])),
        p.encode(p.Commit(req_id=6, reservation=1)),
        p.encode(p.Batch(req_id=7, ops=[p.Heartbeat(req_id=8), p.Abort(req_id=9, reservation=2)])),
        p.encode(p.Register(req_id=10, model="m", geometry=small_geometry())),
    ]


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.6:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif choice < 0.8 and data:
            del data[rng.randrange(len(data)) :]
        else:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(data)


def test_ten_thousand_malformed_frames_change_nothing(make_client, server):
    owner = make_client()
    ns = owner.register("m", small_geometry())
    keys = owner.chunk_keys(ns, tokens(11, 256 * 4))
    written = store_pattern(owner, ns, 0, keys, seed=11)
    digest_before = hashlib.sha256(b"".join(written)).hexdigest()

    rng = random.Random(20261128)
    valid = _valid_frames(ns.id, b"".join(keys))
    ctx = zmq.Context()
    sockets = []
    for _ in range(4):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{server.port}")
        sockets.append(s)
    sent = received = 0
    kinds = 0
    for i in range(10_000):
        s = sockets[i % 4]
        r = rng.random()
        if r < 0.15:
            frame = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
            s.send(frame)
        elif r < 0.2:
            s.send_multipart([b"x", b"y"][: rng.randint(1, 2)] + [b""])  # wrong frame count
        elif r < 0.25:
            s.send(msgspec.msgpack.encode({"type": "Lookup", "anything": [1, 2, 3]}))
        elif r < 0.3:
            s.send(msgspec.msgpack.encode(["Reserve", 1, ns.id, rng.randint(-5, 5), b"\0" * 33]))
        else:
            s.send(_mutate(rng, rng.choice(valid)))
        sent += 1
        kinds += 1
        if i % 50 == 49:  # keep the queues short; drain what has come back
            for sock in sockets:
                while sock.poll(0):
                    sock.recv_multipart()
                    received += 1
    deadline = time.monotonic() + 30
    while received < sent and time.monotonic() < deadline:
        for sock in sockets:
            while sock.poll(20):
                reply = p.decode_reply(sock.recv())  # every reply is itself well-formed
                assert reply is not None
                received += 1
    assert received == sent  # every frame was answered
    for s in sockets:
        s.close()
    ctx.term()

    assert server.alive
    assert owner.lookup(ns, keys).hit_chunks == 4
    got = owner.acquire(ns, 0, keys)
    arena = owner.arena_array()
    after = b"".join(arena[o : o + ns.slot_bytes].tobytes() for o in got.offsets)
    assert hashlib.sha256(after).hexdigest() == digest_before
    # One complaint line per offending client per minute, not one per frame.
    assert server.count("Bad request from client") <= 8


def test_protocol_version_and_unknown_session_get_clear_errors(server):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{server.port}")
    s.send(p.encode(p.Lookup(req_id=5, namespace=1, keys=b"")))
    assert s.poll(5000)
    reply = p.decode_reply(s.recv())
    assert isinstance(reply, p.ErrorReply) and reply.code == p.ErrorCode.NO_SESSION and reply.req_id == 5
    s.send(p.encode(p.Hello(req_id=6, protocol_version=999, engine_id="old")))
    assert s.poll(5000)
    reply = p.decode_reply(s.recv())
    assert isinstance(reply, p.ErrorReply) and reply.code == p.ErrorCode.BAD_VERSION
    assert "999" in reply.message
    s.send(b"\x00" * (p.MAX_FRAME_BYTES + 1))
    assert s.poll(5000)
    reply = p.decode_reply(s.recv())
    assert isinstance(reply, p.ErrorReply) and reply.code == p.ErrorCode.TOO_LARGE
    s.close()
    ctx.term()


def test_geometry_that_does_not_fit_is_refused(make_client):
    client = make_client()
    with pytest.raises(Exception) as err:
        client.register("huge", small_geometry(layers=4000, heads=64, head_dim=128))
    assert "GEOMETRY_MISMATCH" in str(err.value)
    with pytest.raises(Exception) as err:
        client.register("odd", small_geometry(block=100))
    assert "divide" in str(err.value)


def test_sigterm_removes_the_segment(tmp_path):
    srv = ServerProcess(log_path=tmp_path / "server.log").start()
    path = f"/dev/shm/{srv.shm_name}"
    assert os.path.exists(path) and os.stat(path).st_mode & 0o777 == 0o600
    assert srv.stop() == 0
    assert not os.path.exists(path)
    assert "removed" in srv.log()


def test_stale_segment_is_replaced(tmp_path):
    name = f"kvdepot-test-stale-{os.getpid()}"
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(b"old")
    with ServerProcess(log_path=tmp_path / "server.log", shm_name=name) as srv:
        assert os.path.getsize(f"/dev/shm/{name}") > 3
        assert "Replaced a stale shared-memory segment" in srv.log()


def test_buffer_larger_than_dev_shm_is_refused_cleanly(monkeypatch):
    from kvdepot.server import arena

    monkeypatch.setattr(arena, "_free_bytes", lambda directory: 1 << 20)
    with pytest.raises(OSError, match="lower --cpu-buffer-size or grow /dev/shm"):
        arena.SharedArena(f"kvdepot-test-toolarge-{os.getpid()}", 2 << 20)
    assert not os.path.exists(f"/dev/shm/kvdepot-test-toolarge-{os.getpid()}")


def test_reused_socket_fd_never_ends_a_new_session(server):
    """The OS hands a closed connection's fd to the next one; its late disconnect event must
    not end the new engine's session."""
    for i in range(40):
        gone = KVDepotClient("127.0.0.1", server.port, engine_id=f"gone-{i}")
        assert gone.connect()
        gone.close()
        fresh = KVDepotClient("127.0.0.1", server.port, engine_id=f"fresh-{i}")
        assert fresh.connect()
        fresh.register("m", small_geometry())  # NO_SESSION here was the bug
        fresh.close()


def test_batch_answers_every_op_in_one_round_trip(make_client):
    client = make_client()
    geo = small_geometry()
    ns = client.register("m", geo)
    keys = [client.chunk_keys(ns, tokens(30 + i, 256 * 2)) for i in range(3)]
    store_pattern(client, ns, 0, keys[0], seed=30)
    replies = client.batch([
        p.Lookup(req_id=1, namespace=ns.id, keys=b"".join(keys[0]), lease_ms=1000),
        p.Lookup(req_id=2, namespace=ns.id, keys=b"".join(keys[1])),
        p.Reserve(req_id=3, namespace=ns.id, rank=0, keys=b"".join(keys[2])),
        p.Release(req_id=4, leases=[987654]),  # fails alone; the others still succeed
        p.Lookup(req_id=5, namespace=999, keys=b""),
    ])
    assert [type(r).__name__ for r in replies] == [
        "LookupReply", "LookupReply", "ReserveReply", "ErrorReply", "ErrorReply",
    ]
    assert [r.req_id for r in replies] == [1, 2, 3, 4, 5]
    assert replies[0].hit_chunks == 2 and replies[0].lease and len(replies[0].offsets) == 2
    assert replies[1].hit_chunks == 0 and replies[1].offsets == []
    assert replies[2].status == [SlotStatus.RESERVED] * 2
    assert replies[3].code == p.ErrorCode.UNKNOWN_LEASE
    assert replies[4].code == p.ErrorCode.UNKNOWN_NAMESPACE
    assert client.commit(replies[2].reservation) == 2
    assert client.lookup(ns, keys[2]).hit_chunks == 2
    released = client.batch([
        p.Release(req_id=6, leases=[replies[0].lease], retrieved=[replies[0].lease]),
    ])
    assert [type(r).__name__ for r in released] == ["OkReply"]
    stats = client.stats()
    assert stats.leases_held == 0 and stats.retrieved_chunks == 2


def test_a_hung_server_costs_one_deadline_then_calls_fail_fast(tmp_path):
    srv = ServerProcess(log_path=tmp_path / "server.log").start()
    try:
        client = KVDepotClient("127.0.0.1", srv.port, timeout_ms=300, heartbeat=False)
        assert client.connect()
        ns = client.register("m", small_geometry())
        keys = client.chunk_keys(ns, tokens(40, 256 * 2))
        srv.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        started = time.monotonic()
        with pytest.raises(ServerUnavailable):
            client.lookup(ns, keys)
        assert time.monotonic() - started < 0.6  # the 300 ms deadline, not more
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(ServerUnavailable):
                client.lookup(ns, keys)
        assert time.monotonic() - started < 0.1  # backing off: no second deadline wasted
        srv.proc.send_signal(signal.SIGCONT)

        def answers():
            try:
                return client.lookup(ns, keys).hit_chunks == 0
            except ServerUnavailable:
                return False

        wait_for(answers, timeout=15)
        client.close()
    finally:
        srv.proc.send_signal(signal.SIGCONT)
        srv.stop()


def test_a_chain_stored_two_chunks_per_call_keeps_its_head(tmp_path):
    """Issue 10, fault 7: a buffer of 8 chunks and a 16-chunk prompt stored 2 chunks per call
    (chunked prefill). Each call names the chunk before it, so the server keeps chunks 0-7,
    refuses what it could only store by evicting the prompt's own head or what nothing could
    reach, and a replay from chunk 0 hits 8 chunks, byte for byte."""
    extra = ["--slab-size-mb", "4"]  # one 4 MiB slab: 8 slots of 512 KiB
    with ServerProcess(buffer_gb=0.0042, extra=extra, log_path=tmp_path / "server.log") as srv:
        writer = KVDepotClient("127.0.0.1", srv.port, timeout_ms=2000)
        replay = KVDepotClient("127.0.0.1", srv.port, timeout_ms=2000)
        assert writer.connect() and replay.connect()
        geo = small_geometry(layers=16)
        ns, ns_replay = writer.register("m", geo), replay.register("m", geo)
        assert writer.stats().arena_bytes // ns.slot_bytes == 8
        keys = writer.chunk_keys(ns, tokens(80, 256 * 16))
        arena = writer.arena_array()
        statuses, written = [], []
        for start in range(0, 16, 2):
            res = writer.reserve(ns, 0, keys[start : start + 2], parent=keys[start - 1] if start else b"")
            statuses += res.status
            for i, (status, off) in enumerate(zip(res.status, res.offsets)):
                if status == SlotStatus.RESERVED:
                    rng = np.random.default_rng(800 + start + i)
                    data = rng.integers(0, 256, ns.slot_bytes, dtype=np.uint8)
                    arena[off : off + ns.slot_bytes] = data
                    written.append(data.tobytes())
            if res.id:
                writer.commit(res.id)
        assert statuses == [SlotStatus.RESERVED] * 8 + [SlotStatus.NO_SPACE] * 2 + [SlotStatus.NO_PARENT] * 6
        hit = replay.lookup(ns_replay, keys, lease_ms=5000)
        assert hit.hit_chunks == 8
        got = replay.arena_array()
        assert [got[o : o + ns.slot_bytes].tobytes() for o in hit.rank_offsets(0)] == written
        replay.release([hit.lease], retrieved=[hit.lease])
        stats = replay.stats()
        assert stats.evicted_chunks == 0 and stats.leases_held == 0 and stats.reservations_open == 0
        writer.close()
        replay.close()


@pytest.mark.parametrize("policy, hot_survives", [("lru", False), ("s3fifo", True)])
def test_the_eviction_policy_flag_chooses_what_a_scan_pushes_out(tmp_path, policy, hot_survives):
    """A prompt read twice, then a scan of prompts stored once that overflows the buffer: LRU
    lets the scan push the prompt out; S3-FIFO keeps it (the scan goes first)."""
    with ServerProcess(log_path=tmp_path / "server.log", extra=["--eviction-policy", policy]) as srv:
        assert f"Eviction policy: {policy}" in srv.log()
        client = KVDepotClient("127.0.0.1", srv.port, timeout_ms=5000, prefault=False)
        assert client.connect()
        try:
            ns = client.register("m", small_geometry(layers=16))  # 512 KiB per chunk
            capacity = client.stats().arena_bytes // ns.slot_bytes
            hot = client.chunk_keys(ns, tokens(1, 256 * 4))
            client.commit(client.reserve(ns, 0, hot).id)
            for _ in range(2):
                assert client.lookup(ns, hot).hit_chunks == 4
            for i in range(2 * capacity // 4):
                scan = client.chunk_keys(ns, tokens(1000 + i, 256 * 4))
                res = client.reserve(ns, 0, scan)
                assert res.status == [SlotStatus.RESERVED] * 4
                client.commit(res.id)
            assert client.stats().evicted_chunks >= capacity
            assert (client.lookup(ns, hot).hit_chunks == 4) is hot_survives
        finally:
            client.close()
