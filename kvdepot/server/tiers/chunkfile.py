"""The disk tier's file format: one file per chunk and rank.

    [0, 4096)                 header (HEADER_BYTES): the fields below, zeros after them
    [4096, 4096 + payload)    the rank's bytes of the chunk, as the arena slot holds them
    up to a multiple of 4096  zeros (O_DIRECT writes and reads whole blocks)

Header fields, little-endian:

    magic           8 bytes  b"KVDCHUNK"
    format version  u16      FORMAT_VERSION; a file of another version is not read
    flags           u16      bit 0: the chunk has a parent (else it is a chain's head)
    header bytes    u32      where the payload starts (4096)
    namespace       16 bytes the namespace digest (kvdepot.keys.namespace_digest)
    key             16 bytes the chunk's key
    parent          16 bytes the key of the chunk before it (zeros for a head)
    rank            u32      tensor-parallel rank
    payload bytes   u64
    payload CRC     u32      CRC32C (Castagnoli) of the payload
    header CRC      u32      CRC32C of every header byte before it

Files are named ``XX/<key hex>-<rank>-<write id>.kvc`` (XX: the key's first byte, so no
directory grows past a few thousand files at 1 M chunks); a write goes to the same name plus
``.tmp`` and is renamed when whole, so a crash never leaves a readable partial chunk.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

import crc32c

from kvdepot.protocol import KEY_BYTES

MAGIC = b"KVDCHUNK"
FORMAT_VERSION = 1
BLOCK = 4096  # O_DIRECT alignment of offsets, lengths and memory (a page; >= any sector)
HEADER_BYTES = BLOCK
SUFFIX = ".kvc"
TEMP_SUFFIX = SUFFIX + ".tmp"
_HAS_PARENT = 1

_PREFIX = struct.Struct("<8sHH")  # magic, version, flags: the same in every version
_FIELDS = struct.Struct(f"<I{KEY_BYTES}s{KEY_BYTES}s{KEY_BYTES}sIQI")
_CRC = struct.Struct("<I")
_CRC_AT = _PREFIX.size + _FIELDS.size
_ZEROS = bytes(HEADER_BYTES)


class BadFile(Exception):
    """Not a chunk file this server can read: the message says why."""


@dataclass(frozen=True, slots=True)
class Header:
    namespace: bytes  # digest
    key: bytes
    parent: bytes  # b"" for a chain's head
    rank: int
    payload_bytes: int
    payload_crc: int


def align_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def footprint(payload_bytes: int) -> int:
    """Bytes a chunk file of ``payload_bytes`` takes: header, payload, padding."""
    return HEADER_BYTES + align_up(payload_bytes)


def file_name(key: bytes, rank: int, write_id: str) -> str:
    """The file of one write of a chunk's rank, relative to the tier's directory."""
    return f"{key[0]:02x}/{key.hex()}-{rank}-{write_id}{SUFFIX}"


def pack(buf: memoryview, header: Header) -> None:
    """Write ``header`` into ``buf`` (HEADER_BYTES long), zeros after the fields."""
    buf[:HEADER_BYTES] = _ZEROS
    _PREFIX.pack_into(buf, 0, MAGIC, FORMAT_VERSION, _HAS_PARENT if header.parent else 0)
    _FIELDS.pack_into(
        buf, _PREFIX.size, HEADER_BYTES, header.namespace, header.key,
        header.parent or bytes(KEY_BYTES), header.rank, header.payload_bytes, header.payload_crc,
    )
    _CRC.pack_into(buf, _CRC_AT, crc32c.crc32c(buf[:_CRC_AT]))


def unpack(buf: memoryview | bytes) -> Header:
    """The header at the start of ``buf``; BadFile when it is not one this server reads."""
    if len(buf) < HEADER_BYTES:
        raise BadFile("short file (no whole header)")
    magic, version, flags = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise BadFile("not a kvdepot chunk file (magic)")
    if version != FORMAT_VERSION:
        raise BadFile(f"format version {version}, this server reads {FORMAT_VERSION}")
    (crc,) = _CRC.unpack_from(buf, _CRC_AT)
    if crc != crc32c.crc32c(memoryview(buf)[:_CRC_AT]):
        raise BadFile("header checksum mismatch")
    start, namespace, key, parent, rank, payload_bytes, payload_crc = _FIELDS.unpack_from(
        buf, _PREFIX.size
    )
    if start != HEADER_BYTES:
        raise BadFile(f"payload at {start}, not {HEADER_BYTES}")
    return Header(namespace, key, parent if flags & _HAS_PARENT else b"", rank, payload_bytes,
                  payload_crc)


def layout(head: memoryview, slot: memoryview, tail: memoryview, nbytes: int) -> list[memoryview]:
    """The iovecs of a chunk file: header, the slot's whole blocks, its last partial block."""
    whole = nbytes - nbytes % BLOCK
    bufs = [head]
    if whole:
        bufs.append(slot[:whole])
    if whole < nbytes:
        bufs.append(tail)
    return bufs


def move_all(fd: int, bufs: list[memoryview], write: bool) -> int:
    """pwritev/preadv ``bufs`` from offset 0 until done (or, reading, the file's end)."""
    offset = 0
    while bufs:
        n = os.pwritev(fd, bufs, offset) if write else os.preadv(fd, bufs, offset)
        if n <= 0:
            if write:
                raise OSError(errno.EIO, "the disk took no bytes")
            return offset
        offset += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs = bufs[1:]
        if n:
            bufs = [bufs[0][n:], *bufs[1:]]
    return offset
