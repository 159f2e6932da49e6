"""The disk tier's files (kvdepot/server/tiers/disk.py) on real directories: round trips
straight from and into an arena-like mapping, every way a file can be bad (each a failed load,
the file deleted, counted), the start-up scan, the byte cap, the directory's marker and lock.

Also the helpers the server tests (test_disk_tier_server.py) share: chunk bytes that are a
function of the key, stores that wait out write-backs, loads that ask again while pending."""

from __future__ import annotations

import json
import mmap
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kvdepot.protocol import SlotStatus
from kvdepot.server.effects import Delete, Demote, Prefetch
from kvdepot.server.locations import ArenaSlot, FileRef
from kvdepot.server.tiers import TierError
from kvdepot.server.tiers.chunkfile import FORMAT_VERSION, HEADER_BYTES, footprint
from kvdepot.server.tiers.disk import MARKER, DiskTier

NS, PARENT = b"N" * 16, b"P" * 16


# --- helpers shared with the server tests ---------------------------------------------------


def chunk_bytes(key: bytes, rank: int, nbytes: int) -> np.ndarray:
    """What an engine writes for one chunk rank: a function of the key, so a reader checks it."""
    rng = np.random.default_rng(int.from_bytes(key[:8], "little") + rank)
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


def prompt(client, ns, seed: int, chunks: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return client.chunk_keys(ns, rng.integers(0, 50000, chunks * 256).tolist())


def store(client, ns, keys: list[bytes], parent: bytes = b"", per_call: int = 4,
          timeout: float = 20.0) -> None:
    """Store a chain (after ``parent``) a few chunks per call, as chunked prefill does; a
    call the buffer has no room for yet (NO_SPACE while write-backs run) is tried again."""
    deadline = time.monotonic() + timeout
    for start in range(0, len(keys), per_call):
        part = keys[start : start + per_call]
        parent = keys[start - 1] if start else parent
        while True:
            res = client.reserve(ns, 0, part, parent=parent)
            for key, status, offset in zip(part, res.status, res.offsets):
                if status == SlotStatus.RESERVED:
                    client.arena(res.epoch).slot(offset, ns.slot_bytes)[:] = chunk_bytes(key, 0, ns.slot_bytes)
            if res.id:
                client.commit(res.id)
            if all(s in (SlotStatus.RESERVED, SlotStatus.PRESENT) for s in res.status):
                break
            assert SlotStatus.NO_PARENT not in res.status, f"chunk {start - 1} is gone"
            assert time.monotonic() < deadline, f"no room for chunks {start}.. in {timeout} s"
            time.sleep(0.02)


def load(client, ns, keys: list[bytes], timeout: float = 20.0) -> tuple[int, int]:
    """Leased lookups as a connector makes them, asking again while chunks are pending;
    checks every hit's bytes. (hits, the most pending any lookup answered)."""
    deadline = time.monotonic() + timeout
    most_pending = 0
    while True:
        res = client.lookup(ns, keys, lease_ms=10_000)
        most_pending = max(most_pending, res.pending)
        try:
            for i, offset in enumerate(res.rank_offsets(0)):
                got = client.arena(res.epoch).slot(offset, ns.slot_bytes)
                assert (got == chunk_bytes(keys[i], 0, ns.slot_bytes)).all(), f"chunk {i} differs"
        finally:
            if res.lease:
                client.release([res.lease], retrieved=[res.lease] if res.hit_chunks else [])
        if not res.pending:
            return res.hit_chunks, most_pending
        assert time.monotonic() < deadline, f"still {res.pending} pending after {timeout} s"
        time.sleep(0.01)


def http_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())


def wait_until(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


# --- the tier on its own -------------------------------------------------------------------


class Arena:
    """An arena-like anonymous mapping (page-aligned, like the shared-memory segment)."""

    def __init__(self, nbytes: int = 1 << 20):
        self.map = mmap.mmap(-1, nbytes)

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.map)[offset : offset + nbytes]


def write(tier: DiskTier, arena: Arena, key: bytes, nbytes: int, offset: int = 0, rank: int = 0) -> FileRef:
    arena.map[offset : offset + nbytes] = chunk_bytes(key, rank, nbytes).tobytes()
    where = tier.spec.locate(NS, key, rank)
    tier.write(Demote(1, "disk", NS, key, rank, ArenaSlot(0, offset), nbytes, where, PARENT),
               arena.view(offset, nbytes))
    return where


def read(tier: DiskTier, arena: Arena, key: bytes, where: FileRef, nbytes: int, offset: int = 1 << 19) -> bytes:
    arena.map[offset : offset + nbytes] = bytes(nbytes)
    tier.read(Prefetch(2, "disk", NS, key, 0, where, ArenaSlot(0, offset), nbytes),
              arena.view(offset, nbytes))
    return arena.map[offset : offset + nbytes]


@pytest.mark.parametrize("nbytes", [65536, 70001, 100])  # whole blocks, a partial last block, less than one
@pytest.mark.parametrize("medium", ["disk", "tmpfs"])
def test_a_chunk_goes_down_and_comes_back_byte_for_byte(tmp_path, nbytes, medium):
    root = tmp_path / "tier" if medium == "disk" else f"/dev/shm/kvdepot-test-tier-{os.getpid()}"
    tier = DiskTier(str(root), 10 << 20)
    try:
        arena = Arena()
        where = write(tier, arena, b"K" * 16, nbytes)
        assert read(tier, arena, b"K" * 16, where, nbytes) == chunk_bytes(b"K" * 16, 0, nbytes).tobytes()
        path = os.path.join(tier.root, where.path)
        assert os.path.getsize(path) == footprint(nbytes) == tier.io.used_bytes
        assert (tier.io.files, tier.io.writes, tier.io.reads) == (1, 1, 1)
        assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
        tier.delete(Delete("disk", NS, b"K" * 16, 0, where))
        assert not os.path.exists(path) and tier.io.used_bytes == 0 and tier.io.files == 0
    finally:
        tier.close()
        if medium == "tmpfs":
            import shutil

            shutil.rmtree(root, ignore_errors=True)


def damage_flip(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 1000)
        byte = f.read(1)
        f.seek(HEADER_BYTES + 1000)
        f.write(bytes([byte[0] ^ 0x01]))


def damage_truncate(path: str) -> None:
    os.truncate(path, HEADER_BYTES + 512)


def damage_version(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write((FORMAT_VERSION + 1).to_bytes(2, "little"))


def damage_header(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(40)  # inside the key: the header's CRC no longer matches
        f.write(b"\xff")


@pytest.mark.parametrize("damage, counter", [
    (damage_flip, "checksum_failures"), (damage_truncate, "bad_files"),
    (damage_version, "bad_files"), (damage_header, "bad_files"),
])  # fmt: skip
def test_a_bad_file_fails_its_load_and_is_deleted_and_counted(tmp_path, damage, counter):
    tier = DiskTier(str(tmp_path / "tier"), 10 << 20)
    arena = Arena()
    where = write(tier, arena, b"K" * 16, 65536)
    path = os.path.join(tier.root, where.path)
    damage(path)
    with pytest.raises(TierError):
        read(tier, arena, b"K" * 16, where, 65536)
    assert not os.path.exists(path) and getattr(tier.io, counter) == 1
    assert tier.io.used_bytes == 0 and tier.io.files == 0 and tier.io.last_error
    # A missing file is a failed load too (an I/O error), never a crash.
    with pytest.raises(TierError):
        read(tier, arena, b"K" * 16, where, 65536)
    assert tier.io.read_errors == 1
    tier.close()


def test_the_scan_keeps_readable_files_and_removes_the_rest(tmp_path):
    tier = DiskTier(str(tmp_path / "tier"), 10 << 20)
    arena = Arena()
    good = [write(tier, arena, bytes([i]) * 16, 65536) for i in range(4)]
    newer_copy = write(tier, arena, bytes([0]) * 16, 65536)  # a second copy of chunk 0
    bad = [write(tier, arena, bytes([9 + i]) * 16, 65536) for i in range(3)]
    for where, damage in zip(bad, (damage_truncate, damage_version, damage_header)):
        damage(os.path.join(tier.root, where.path))
    stray = os.path.join(tier.root, "ab", "interrupted.kvc.tmp")
    open(stray, "wb").write(b"half a chunk")
    foreign = os.path.join(tier.root, "ab", "README")  # not ours: left alone
    open(foreign, "w").write("hello")
    os.utime(os.path.join(tier.root, good[0].path), (1, 1))  # the older copy of chunk 0
    tier.close()

    again = DiskTier(str(tmp_path / "tier"), 10 << 20)
    found = list(again.scan())
    assert sorted(c.key for c in found) == sorted(bytes([i]) * 16 for i in range(4))
    assert {c.where for c in found} == {newer_copy, *good[1:]}
    assert all(c.parent == PARENT and c.namespace == NS and c.nbytes == 65536 for c in found)
    assert [c.last_used for c in found] == sorted(c.last_used for c in found)  # oldest first
    assert (again.io.bad_files, again.io.temp_files_removed, again.io.files) == (3, 1, 4)
    assert not os.path.exists(stray) and os.path.exists(foreign)
    assert again.io.used_bytes == 4 * footprint(65536)
    again.close()


def test_the_scan_keeps_the_newest_files_within_a_smaller_cap(tmp_path):
    tier = DiskTier(str(tmp_path / "tier"), 10 << 20)
    arena = Arena()
    wheres = [write(tier, arena, bytes([i]) * 16, 65536) for i in range(6)]
    for i, where in enumerate(wheres):
        os.utime(os.path.join(tier.root, where.path), (1000 + i, 1000 + i))
    tier.close()
    small = DiskTier(str(tmp_path / "tier"), 3 * footprint(65536))
    assert [c.key[0] for c in small.scan()] == [3, 4, 5]
    assert small.io.used_bytes == 3 * footprint(65536)
    assert len(list(Path(small.root).glob("??/*.kvc"))) == 3
    small.close()


def test_a_write_that_would_pass_the_cap_fails_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("kvdepot.server.tiers.disk._ROOM_WAIT_S", 0.1)
    tier = DiskTier(str(tmp_path / "tier"), 2 * footprint(65536))
    arena = Arena()
    write(tier, arena, b"A" * 16, 65536)
    write(tier, arena, b"B" * 16, 65536)
    with pytest.raises(TierError, match="cap"):
        write(tier, arena, b"C" * 16, 65536)
    assert tier.io.used_bytes == 2 * footprint(65536) and tier.io.write_errors == 1
    assert len(list(Path(tier.root).glob("??/*"))) == 2  # no temporary file left
    tier.close()


def test_the_directory_is_the_tiers_alone(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "photo.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not empty and not a kvdepot disk tier"):
        DiskTier(str(busy), 10 << 20)
    assert os.listdir(busy) == ["photo.jpg"]  # nothing touched
    tier = DiskTier(str(tmp_path / "tier"), 10 << 20)
    assert os.path.exists(tmp_path / "tier" / MARKER)
    with pytest.raises(ValueError, match="another kvdepot server uses"):
        DiskTier(str(tmp_path / "tier"), 10 << 20)
    tier.close()
    DiskTier(str(tmp_path / "tier"), 10 << 20).close()  # free again once the first let go
