"""The remote tier's layout: a chunk rank as parts plus a manifest, under keys of one hash tag.

One rank's bytes of a chunk are stored as parts of at most ``PART_BYTES`` (just under 4 MiB:
Redis 7.0 serves values of 8 MiB and more at half the speed of 1-4 MiB ones here (a fresh
reply buffer faulted in per GET: bench/remote_tier.py), Valkey 9.1 as fast; a small value also
keeps a server's event loop responsive; a 40 MiB chunk is 10 parts, read in one pipeline) and a manifest, written last:

    <prefix>:v<version>:{<namespace hex><key hex>}:<rank>:m      the manifest
    <prefix>:v<version>:{<namespace hex><key hex>}:<rank>:<i>    part i, i = 0 .. parts - 1

The format version is in every key: servers of two versions sharing a cluster (a rolling
upgrade) each read and write their own keys, never each other's.

Everything between the braces is the hash tag: every key of a chunk (all its ranks) lives on
one shard, so a chunk is written and read in one pipeline on one connection. The namespace
digest (model, KV geometry, tensor-parallel degree, layout, tenant salt) is in every key, so
two tenants' chunks never share a key, whatever their chunk keys.

Manifest fields, little-endian:

    magic           4 bytes  b"KVDR"
    format version  u16      FORMAT_VERSION; a manifest of another version is a miss
    flags           u16      0
    namespace       16 bytes the namespace digest
    key             16 bytes the chunk's key
    rank            u32
    payload bytes   u64      the rank's bytes, all parts together
    part bytes      u32      every part but the last holds this many
    parts           u32
    part CRCs       u32 each CRC32C of each part
    manifest CRC    u32      CRC32C of every byte before it

A read needs the manifest and every part, of the lengths and CRCs it names; anything else is
a miss (and the debris is deleted by the reader).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c

from kvdepot.protocol import KEY_BYTES

MAGIC = b"KVDR"
FORMAT_VERSION = 2  # 1: 16 MiB parts
# 64 bytes under 4 MiB: Redis' allocator (jemalloc) keeps a value with its headers in the
# next size class up (a value of exactly 16 MiB takes 20 MiB of server memory, MEMORY USAGE,
# Redis 7.0 here); 64 bytes less stays in the class.
PART_BYTES = (4 << 20) - 64
_FIXED = struct.Struct("<4sHH16s16sIQII")
_U32 = struct.Struct("<I")
MAX_PARTS = 1 << 16  # a rank of 256 GiB: anything more is not a manifest of ours


class BadManifest(ValueError):
    """Not a readable manifest of this format (truncated, another version, a bad CRC)."""


class OtherVersion(BadManifest):
    """A manifest of another format version: a newer or older server's, left alone."""


@dataclass(frozen=True)
class Manifest:
    namespace: bytes
    key: bytes
    rank: int
    payload_bytes: int
    part_crcs: tuple[int, ...]
    part_bytes: int = PART_BYTES

    def pack(self) -> bytes:
        fixed = _FIXED.pack(
            MAGIC, FORMAT_VERSION, 0, self.namespace, self.key, self.rank,
            self.payload_bytes, self.part_bytes, len(self.part_crcs),
        )
        body = fixed + b"".join(_U32.pack(c) for c in self.part_crcs)
        return body + _U32.pack(crc32c.crc32c(body))


def part_spans(payload_bytes: int, part_bytes: int = PART_BYTES) -> list[tuple[int, int]]:
    """(offset, length) of each part of a rank of ``payload_bytes`` (>= 1 part)."""
    if payload_bytes <= 0:
        return [(0, 0)]
    return [
        (off, min(part_bytes, payload_bytes - off)) for off in range(0, payload_bytes, part_bytes)
    ]


def unpack(data: bytes) -> Manifest:
    """The manifest in ``data``; BadManifest (OtherVersion) when it is not one of ours."""
    if len(data) < _FIXED.size + 4:
        raise BadManifest(f"a manifest of {len(data)} bytes is too short")
    magic, version, _flags, namespace, key, rank, payload, part_bytes, parts = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise BadManifest("not a kvdepot manifest (magic)")
    if version != FORMAT_VERSION:
        raise OtherVersion(f"manifest format version {version}, this server reads {FORMAT_VERSION}")
    if not 1 <= parts <= MAX_PARTS or len(data) != _FIXED.size + 4 * parts + 4:
        raise BadManifest(f"a manifest of {len(data)} bytes cannot name {parts} parts")
    # Arithmetic before anything is built: a payload field of 2**61 must cost nothing.
    if part_bytes < 1 or max(1, -(-payload // part_bytes)) != parts:
        raise BadManifest(f"{parts} parts of {part_bytes} bytes cannot hold {payload} bytes")
    body = memoryview(data)[:-4]
    if crc32c.crc32c(body) != _U32.unpack_from(data, len(data) - 4)[0]:
        raise BadManifest("manifest checksum (CRC32C) mismatch")
    crcs = struct.unpack_from(f"<{parts}I", data, _FIXED.size)
    return Manifest(namespace, key, rank, payload, tuple(crcs), part_bytes)


@dataclass(frozen=True)
class ChunkKeys:
    """The keys of one rank of one chunk (see the module's layout)."""

    manifest: bytes
    base: bytes  # the parts' keys are base + b"<i>"

    def part(self, i: int) -> bytes:
        return self.base + str(i).encode()


def chunk_keys(prefix: bytes, namespace: bytes, key: bytes, rank: int) -> ChunkKeys:
    if len(namespace) != KEY_BYTES or len(key) != KEY_BYTES:
        raise ValueError("namespace digests and chunk keys are 16 bytes")
    base = b"%s:v%d:{%s%s}:%d:" % (
        prefix, FORMAT_VERSION, namespace.hex().encode(), key.hex().encode(), rank,
    )
    return ChunkKeys(base + b"m", base)
