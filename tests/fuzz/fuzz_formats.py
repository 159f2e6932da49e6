"""Fuzz target ``formats``: the two on-medium formats a server reads back, which others may
have written: the remote tier's manifest (kvdepot.server.tiers.manifest: any node sharing
the cluster writes them, and a probe reads them) and the disk tier's chunk-file header
(kvdepot.server.tiers.chunkfile: whatever a restarted server finds in its directory).

The input's first byte chooses the format, whether the harness fixes the checksum the
format ends with (so that mutated fields get past it, as a writer's own would) and, for a
header, whether the bytes are a whole 4 KiB block (zeros after them) or a short file; the
rest is the bytes.

Properties: ``unpack`` raises only the format's error (BadManifest, BadFile) and returns in
bounded time whatever the fields say; what it returns packs back to the same bytes (fields
are neither lost nor reinterpreted) and describes a consistent rank (parts that hold exactly
the payload; a header's fields survive a pack).
"""

from __future__ import annotations

import struct

from fuzz_common import fuzz, instrumented

with instrumented(__name__):
    import crc32c

    from kvdepot.server.tiers import chunkfile, manifest


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        _header(body, fix_crc=bool(mode & 2), whole=not mode & 4)
    else:
        _manifest(body, fix_crc=bool(mode & 2))


def _manifest(data: bytes, fix_crc: bool) -> None:
    if fix_crc and len(data) >= 4:
        data = data[:-4] + struct.pack("<I", crc32c.crc32c(data[:-4]))
    try:
        m = manifest.unpack(data)
    except manifest.BadManifest:
        return
    packed = m.pack()
    # Every field but the flags (reserved, 0 when written; unpack ignores them) and the CRC.
    assert packed[:6] + packed[8:-4] == data[:6] + data[8:-4], "unpack lost or changed a field"
    parts = len(m.part_crcs)
    assert 1 <= parts <= manifest.MAX_PARTS and m.part_bytes >= 1, m
    # Every part but the last is whole, and the last holds the rest (one empty part: none).
    assert (parts - 1) * m.part_bytes < max(m.payload_bytes, 1) <= parts * m.part_bytes, m


def _header(data: bytes, fix_crc: bool, whole: bool) -> None:
    """``whole``: the bytes are the start of a whole header block (zeros after them), as a
    file's first 4 KiB; else they are all the file holds."""
    buf = bytearray(data[: chunkfile.HEADER_BYTES])
    if whole:
        buf = buf.ljust(chunkfile.HEADER_BYTES, b"\0")
    if len(buf) >= chunkfile._CRC_AT + 4 and fix_crc:
        struct.pack_into("<I", buf, chunkfile._CRC_AT, crc32c.crc32c(bytes(buf[: chunkfile._CRC_AT])))
    try:
        header = chunkfile.unpack(bytes(buf))
    except chunkfile.BadFile:
        return
    assert len(buf) == chunkfile.HEADER_BYTES, "a header read from a short buffer"
    again = bytearray(chunkfile.HEADER_BYTES)
    chunkfile.pack(memoryview(again), header)
    # Flag bits other than "has a parent" and the bytes after the fields mean nothing in
    # this version: the fields are what must survive.
    assert chunkfile.unpack(bytes(again)) == header, "unpack lost or changed a field"
    assert header.parent == b"" or len(header.parent) == 16, header
    assert chunkfile.footprint(header.payload_bytes) >= chunkfile.HEADER_BYTES


if __name__ == "__main__":
    fuzz(TestOneInput)
