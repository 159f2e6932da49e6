"""The remote tier (kvdepot/server/tiers/remote.py) against a real redis-server (and one case on
valkey-server), moving chunk ranks straight from and into an arena-like mapping: round trips
of one part and of several (split at 16 MiB), TTLs on every key, probes, a second write that
only renews the TTL, every way the stored keys can be damaged (each a miss that deletes the
chunk's keys, but a manifest of another format version, which is left alone), a delete that
deletes nothing, a server that is down, stalled or not there at start (fast failures, nothing
hangs), and namespaces that never share keys."""

from __future__ import annotations

import os
import struct
import time

import crc32c
import pytest
from redis_support import RedisServer, free_port, server_binary
from test_disk_tier import Arena, chunk_bytes

from kvdepot.server.effects import Delete, Demote, Prefetch, Probe
from kvdepot.server.locations import ArenaSlot
from kvdepot.server.tiers import TierError
from kvdepot.server.tiers.resp import RemoteClient, RemoteSettings
from kvdepot.server.tiers.manifest import FORMAT_VERSION, PART_BYTES, chunk_keys
from kvdepot.server.tiers.remote import RemoteTier

NS, OTHER_NS = b"N" * 16, b"T" * 16  # namespace digests (two tenants' salts)
PREFIX = "kvt"
TTL_S = 600
READ_AT = 48 << 20  # the arena's second half: reads land there, writes leave from offset 0
ARENA_BYTES = 96 << 20


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def admin(redis_server):
    client = redis_server.admin()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="module")
def arena():
    return Arena(ARENA_BYTES)


def make_tier(url: str, *, prefix: str = PREFIX, timeout_s: float = 5.0,
              probe_timeout_s: float = 1.0) -> RemoteTier:
    """A started tier on ``url`` (start() logs and goes on when nothing answers there)."""
    tier = RemoteTier(
        RemoteClient(RemoteSettings(urls=(url,))), key_prefix=prefix, ttl_s=TTL_S,
        write_policy="write-through", known_bytes=1 << 30, timeout_s=timeout_s,
        probe_timeout_s=probe_timeout_s, settings={"urls": url},
    )
    tier.start()
    return tier


@pytest.fixture
def tier(redis_server, admin):
    t = make_tier(redis_server.url)
    yield t
    t.close()


def write(tier: RemoteTier, arena: Arena, key: bytes, nbytes: int, *, rank: int = 0,
          ns: bytes = NS, content_rank: int | None = None) -> None:
    """Demote ``nbytes`` of chunk_bytes(key, rank) from the arena's offset 0."""
    content = chunk_bytes(key, rank if content_rank is None else content_rank, nbytes)
    arena.map[:nbytes] = content.tobytes()
    where = tier.spec.locate(ns, key, rank)
    tier.write(Demote(1, "remote", ns, key, rank, ArenaSlot(0, 0), nbytes, where, b""),
               arena.view(0, nbytes))


def read(tier: RemoteTier, arena: Arena, key: bytes, nbytes: int, *, rank: int = 0,
         ns: bytes = NS) -> bytes:
    """Prefetch into a zeroed slot at READ_AT; the slot's bytes (when the read did not raise)."""
    arena.map[READ_AT : READ_AT + nbytes] = bytes(nbytes)
    where = tier.spec.locate(ns, key, rank)
    tier.read(Prefetch(2, "remote", ns, key, rank, where, ArenaSlot(0, READ_AT), nbytes),
              arena.view(READ_AT, nbytes))
    return arena.map[READ_AT : READ_AT + nbytes]


def probe(tier: RemoteTier, keys: list[bytes], *, world_size: int = 1, nbytes: int = 100,
          ns: bytes = NS) -> int:
    return tier.probe(Probe(3, "remote", ns, world_size, nbytes, keys))


def keys_of(key: bytes, rank: int = 0, ns: bytes = NS, prefix: str = PREFIX):
    return chunk_keys(prefix.encode(), ns, key, rank)


def stored(admin, prefix: str = PREFIX) -> set[bytes]:
    return set(admin.scan_iter(match=f"{prefix}:*", count=1000))


@pytest.mark.parametrize("nbytes", [100, PART_BYTES, PART_BYTES + 1, 40 << 20])
def test_a_chunk_rank_goes_down_and_comes_back_byte_for_byte(tier, admin, arena, nbytes):
    key = os.urandom(16)
    write(tier, arena, key, nbytes)
    want = chunk_bytes(key, 0, nbytes).tobytes()
    assert read(tier, arena, key, nbytes) == want
    # Parts of at most 16 MiB, in order, and the manifest: nothing else, every key with the TTL.
    k = keys_of(key)
    parts = -(-nbytes // PART_BYTES)
    assert stored(admin) == {k.manifest, *(k.part(i) for i in range(parts))}
    for i in range(parts):
        assert admin.get(k.part(i)) == want[i * PART_BYTES : (i + 1) * PART_BYTES]
    for name in stored(admin):
        assert (TTL_S - 10) * 1000 < admin.pttl(name) <= TTL_S * 1000, name
    io = tier.io
    assert (io.writes, io.written_bytes, io.reads, io.read_bytes) == (1, nbytes, 1, nbytes)
    assert (io.write_errors, io.read_errors, io.checksum_failures, io.bad_files) == (0, 0, 0, 0)


def test_a_probe_finds_the_leading_chunks_whose_every_rank_is_stored(tier, arena):
    keys = [os.urandom(16) for _ in range(6)]
    for i, key in enumerate(keys):
        for rank in (0, 1):
            if (i, rank) != (3, 1):  # chunk 3 lacks rank 1
                write(tier, arena, key, 100, rank=rank)
    assert probe(tier, keys, world_size=2) == 3  # chunk 3 stops it: 4 and 5 do not count
    assert probe(tier, keys[4:], world_size=2) == 2
    assert probe(tier, keys[3:], world_size=2) == 0
    assert probe(tier, keys[:3], world_size=1) == 3
    assert probe(tier, [os.urandom(16), *keys], world_size=2) == 0  # an unknown head
    assert probe(tier, keys, world_size=2, nbytes=101) == 0  # another slot size: not ours
    assert probe(tier, keys, world_size=2, ns=OTHER_NS) == 0


def test_a_second_write_of_a_stored_chunk_only_renews_its_ttl(tier, admin, arena):
    key = os.urandom(16)
    nbytes = PART_BYTES + 1000
    write(tier, arena, key, nbytes)
    for name in stored(admin):
        admin.pexpire(name, 5000)
    admin.config_resetstat()
    write(tier, arena, key, nbytes)  # as another node storing the same prefix would
    commands = admin.info("commandstats")
    assert "cmdstat_set" not in commands, commands  # no byte rewritten
    assert commands["cmdstat_pexpire"]["calls"] == 3  # both parts and the manifest
    for name in stored(admin):
        assert admin.pttl(name) > (TTL_S - 10) * 1000, name
    assert (tier.io.already_stored, tier.io.writes) == (1, 1)
    assert read(tier, arena, key, nbytes) == chunk_bytes(key, 0, nbytes).tobytes()


def test_a_second_write_of_a_chunk_missing_a_part_writes_it_whole(tier, admin, arena):
    key = os.urandom(16)
    nbytes = PART_BYTES + 1000
    write(tier, arena, key, nbytes)
    admin.delete(keys_of(key).part(1))  # evicted by the server's maxmemory policy
    write(tier, arena, key, nbytes)
    assert (tier.io.already_stored, tier.io.writes) == (0, 2)
    assert len(stored(admin)) == 3
    assert read(tier, arena, key, nbytes) == chunk_bytes(key, 0, nbytes).tobytes()


# --- damage: a miss, never wrong bytes reported ok, and no debris left ------------------------

NBYTES = PART_BYTES + 4096  # two parts


def _flip_part(admin, key: bytes) -> None:
    k = keys_of(key)
    value = bytearray(admin.get(k.part(0)))
    value[12345] ^= 0x40
    admin.set(k.part(0), bytes(value), keepttl=True)


def _delete_part(admin, key: bytes) -> None:
    admin.delete(keys_of(key).part(1))


def _shorter_part(admin, key: bytes) -> None:
    k = keys_of(key)
    admin.set(k.part(1), admin.get(k.part(1))[:-1], keepttl=True)


def _longer_part(admin, key: bytes) -> None:
    admin.append(keys_of(key).part(0), b"x")


def _part_of_another_type(admin, key: bytes) -> None:
    k = keys_of(key)
    admin.delete(k.part(1))
    admin.rpush(k.part(1), b"not a string")


def _garbage_manifest(admin, key: bytes) -> None:
    k = keys_of(key)
    admin.set(k.manifest, os.urandom(len(admin.get(k.manifest))), keepttl=True)


def _manifest_bit_flipped(admin, key: bytes) -> None:  # its CRC catches it
    k = keys_of(key)
    value = bytearray(admin.get(k.manifest))
    value[60] ^= 0x01  # inside the part CRCs
    admin.set(k.manifest, bytes(value), keepttl=True)


def _manifest_of_another_type(admin, key: bytes) -> None:
    k = keys_of(key)
    admin.delete(k.manifest)
    admin.hset(k.manifest, "a", "b")


def _manifest_of_another_chunk(admin, key: bytes, other: bytes) -> None:
    admin.set(keys_of(key).manifest, admin.get(keys_of(other).manifest), keepttl=True)


def with_version(manifest: bytes, version: int) -> bytes:
    """A well-formed manifest of another format version (its CRC right for its bytes)."""
    body = bytearray(manifest[:-4])
    struct.pack_into("<H", body, 4, version)
    return bytes(body) + struct.pack("<I", crc32c.crc32c(bytes(body)))


DAMAGES = {
    "part deleted": (_delete_part, "read_errors"),
    "part bytes flipped, same length": (_flip_part, "checksum_failures"),
    "part one byte shorter": (_shorter_part, "checksum_failures"),
    "part one byte longer": (_longer_part, "checksum_failures"),
    "part of another type": (_part_of_another_type, "checksum_failures"),
    "manifest garbage": (_garbage_manifest, "bad_files"),
    "manifest bit flipped": (_manifest_bit_flipped, "bad_files"),
    "manifest of another type": (_manifest_of_another_type, "bad_files"),
    "manifest of another chunk": (_manifest_of_another_chunk, "bad_files"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_chunk_is_a_miss_and_its_keys_are_deleted(tier, admin, arena, damage):
    key, other = os.urandom(16), os.urandom(16)
    write(tier, arena, key, NBYTES)
    write(tier, arena, other, NBYTES, content_rank=5)  # the same size, other bytes
    assert probe(tier, [key], nbytes=NBYTES) == 1
    harm, counter = DAMAGES[damage]
    if harm is _manifest_of_another_chunk:
        harm(admin, key, other)
    else:
        harm(admin, key)
    with pytest.raises(TierError):
        read(tier, arena, key, NBYTES)  # the slot's bytes are never reported ok
    assert getattr(tier.io, counter) == 1 and tier.io.reads == 0 and tier.io.last_error
    k = keys_of(key)
    assert stored(admin) & {k.manifest, k.part(0), k.part(1)} == set(), "debris left"
    assert probe(tier, [key], nbytes=NBYTES) == 0
    with pytest.raises(TierError):  # gone now: a plain miss
        read(tier, arena, key, NBYTES)
    # The other chunk was not touched (even when its manifest was copied).
    assert read(tier, arena, other, NBYTES) == chunk_bytes(other, 5, NBYTES).tobytes()
    # A write stores the chunk again, whole.
    write(tier, arena, key, NBYTES)
    assert read(tier, arena, key, NBYTES) == chunk_bytes(key, 0, NBYTES).tobytes()


def test_a_manifest_of_another_format_version_is_a_miss_and_is_left_alone(tier, admin, arena):
    """A newer (or older) server's chunk sharing the cluster: not readable here, not ours to
    delete either."""
    key = os.urandom(16)
    write(tier, arena, key, NBYTES)
    k = keys_of(key)
    newer = with_version(admin.get(k.manifest), FORMAT_VERSION + 1)
    admin.set(k.manifest, newer, keepttl=True)
    before = {name: admin.get(name) for name in stored(admin)}
    with pytest.raises(TierError, match="version"):
        read(tier, arena, key, NBYTES)
    assert probe(tier, [key], nbytes=NBYTES) == 0
    assert {name: admin.get(name) for name in stored(admin)} == before  # left alone
    assert tier.io.bad_files == 1 and tier.io.reads == 0


def test_delete_deletes_nothing(tier, admin, arena):
    key = os.urandom(16)
    write(tier, arena, key, 100)
    before = stored(admin)
    tier.delete(Delete("remote", NS, key, 0, tier.spec.locate(NS, key, 0)))
    assert stored(admin) == before and len(before) == 2
    assert read(tier, arena, key, 100) == chunk_bytes(key, 0, 100).tobytes()


def test_namespaces_never_share_keys(tier, admin, arena, redis_server):
    key = os.urandom(16)  # the same chunk key in two tenants' namespaces
    write(tier, arena, key, 1000, ns=NS)
    write(tier, arena, key, 1000, ns=OTHER_NS, content_rank=9)
    assert tier.io.already_stored == 0  # the second is no renewal of the first
    assert len({n for n in stored(admin) if n.endswith(b":m")}) == 2
    assert read(tier, arena, key, 1000, ns=NS) == chunk_bytes(key, 0, 1000).tobytes()
    assert read(tier, arena, key, 1000, ns=OTHER_NS) == chunk_bytes(key, 9, 1000).tobytes()
    only_here = os.urandom(16)
    write(tier, arena, only_here, 1000, ns=NS)
    assert probe(tier, [only_here], nbytes=1000, ns=NS) == 1
    assert probe(tier, [only_here], nbytes=1000, ns=OTHER_NS) == 0
    with pytest.raises(TierError):
        read(tier, arena, only_here, 1000, ns=OTHER_NS)
    assert read(tier, arena, only_here, 1000, ns=NS) == chunk_bytes(only_here, 0, 1000).tobytes()
    # Another deployment's key prefix on the same server: its own keys.
    other = make_tier(redis_server.url, prefix="kvt-other")
    try:
        assert probe(other, [only_here], nbytes=1000) == 0
        write(other, arena, only_here, 1000)
        assert len(stored(admin, "kvt-other")) == 2
    finally:
        other.close()


# --- a server down, stalled, or not there at start: fast failures, nothing hangs -------------


def timed(fn):
    started = time.monotonic()
    try:
        return fn(), time.monotonic() - started
    except TierError as exc:
        return exc, time.monotonic() - started


def test_a_server_down_fails_fast_and_is_used_again_once_back(tmp_path, arena):
    server = RedisServer(tmp_path / "redis").start()
    tier = make_tier(server.url, timeout_s=2.0)
    try:
        key = os.urandom(16)
        write(tier, arena, key, 1000)
        server.kill()
        for _ in range(3):  # the first failure, then the node's backoff
            got, took = timed(lambda: read(tier, arena, key, 1000))
            assert isinstance(got, TierError) and took < 1.0, (got, took)
            got, took = timed(lambda: write(tier, arena, os.urandom(16), 1000))
            assert isinstance(got, TierError) and took < 1.0, (got, took)
            got, took = timed(lambda: probe(tier, [key], nbytes=1000))
            assert isinstance(got, TierError) and took < 1.0, (got, took)  # a failed probe
        assert tier.io.read_errors == 3 and tier.io.write_errors == 3
        back = RedisServer(tmp_path / "redis", port=server.port).start()  # empty again
        try:
            again = os.urandom(16)
            deadline = time.monotonic() + 15
            while isinstance(timed(lambda: write(tier, arena, again, 1000))[0], TierError):
                assert time.monotonic() < deadline, "the tier did not use the server again"
                time.sleep(0.1)
            assert read(tier, arena, again, 1000) == chunk_bytes(again, 0, 1000).tobytes()
        finally:
            back.stop()
    finally:
        tier.close()
        server.stop()


def test_a_stalled_server_fails_by_the_deadline(tmp_path, arena):
    server = RedisServer(tmp_path / "redis").start()
    tier = make_tier(server.url, timeout_s=1.0, probe_timeout_s=0.5)
    try:
        key = os.urandom(16)
        write(tier, arena, key, 1000)
        server.signal(19)  # SIGSTOP: connections stay open, nothing answers
        got, took = timed(lambda: read(tier, arena, key, 1000))
        assert isinstance(got, TierError) and took < 1.5, (got, took)
        got, took = timed(lambda: probe(tier, [key], nbytes=1000))
        assert isinstance(got, TierError) and took < 1.0, (got, took)
        got, took = timed(lambda: write(tier, arena, os.urandom(16), 1000))
        assert isinstance(got, TierError) and took < 1.5, (got, took)
        server.signal(18)  # SIGCONT
        deadline = time.monotonic() + 15
        while isinstance(timed(lambda: read(tier, arena, key, 1000))[0], TierError):
            assert time.monotonic() < deadline, "the tier did not use the server again"
            time.sleep(0.1)
        assert read(tier, arena, key, 1000) == chunk_bytes(key, 0, 1000).tobytes()
    finally:
        server.signal(18)
        tier.close()
        server.stop()


def test_a_server_not_there_at_start_is_a_miss_until_it_comes(tmp_path, arena, monkeypatch):
    monkeypatch.setattr("kvdepot.server.tiers.remote._RETRY_START_S", 0.3)
    port = free_port()
    tier = make_tier(f"redis://127.0.0.1:{port}", timeout_s=2.0)  # start() does not raise
    try:
        assert "connect" in tier.io.last_error and f"127.0.0.1:{port}" in tier.io.last_error
        key = os.urandom(16)
        got, took = timed(lambda: read(tier, arena, key, 1000))
        assert isinstance(got, TierError) and took < 1.5, (got, took)
        got, took = timed(lambda: probe(tier, [key], nbytes=1000))
        assert isinstance(got, TierError) and took < 1.5, (got, took)
        server = RedisServer(tmp_path / "redis", port=port).start()
        try:
            deadline = time.monotonic() + 15
            while isinstance(timed(lambda: write(tier, arena, key, 1000))[0], TierError):
                assert time.monotonic() < deadline, "the tier never connected"
                time.sleep(0.1)
            assert read(tier, arena, key, 1000) == chunk_bytes(key, 0, 1000).tobytes()
        finally:
            server.stop()
    finally:
        tier.close()


def test_valkey_server(tmp_path, arena):
    with RedisServer(tmp_path / "valkey", binary=server_binary("valkey")) as server:
        tier = make_tier(server.url)
        try:
            admin = server.admin()
            keys = [os.urandom(16) for _ in range(3)]
            for key in keys:
                write(tier, arena, key, PART_BYTES + 1)
            assert probe(tier, keys, nbytes=PART_BYTES + 1) == 3
            for key in keys:
                want = chunk_bytes(key, 0, PART_BYTES + 1).tobytes()
                assert read(tier, arena, key, PART_BYTES + 1) == want
            assert all(0 < admin.pttl(n) <= TTL_S * 1000 for n in stored(admin))
            write(tier, arena, keys[0], PART_BYTES + 1)
            assert tier.io.already_stored == 1
            _flip_part(admin, keys[1])
            with pytest.raises(TierError):
                read(tier, arena, keys[1], PART_BYTES + 1)
            assert not stored(admin) & {keys_of(keys[1]).manifest, keys_of(keys[1]).part(0)}
        finally:
            tier.close()
