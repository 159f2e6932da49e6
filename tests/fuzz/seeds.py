"""Seed inputs of the fuzz targets, built with the real encoder: every message type, and
request sequences that walk the handlers' states (register, store, look up, load, release).

``python tests/fuzz/seeds.py`` writes them to tests/fuzz/corpus/<target>/seed-*; the fuzzer
adds what it finds interesting beside them (libFuzzer names those by their SHA-1).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fuzz_common import CORPUS  # noqa: E402

from kvdepot import protocol as p  # noqa: E402


def geometry(layers: int = 2, heads: int = 2, head_dim: int = 16, block: int = 16) -> p.KVGeometry:
    """A small geometry (tests/conftest.py's): a 256-token chunk is 64 KiB per rank."""
    piece = block * heads * 2 * head_dim * 2
    return p.KVGeometry(
        num_layers=layers, num_kv_heads=heads, head_size_k=head_dim, head_size_v=head_dim,
        dtype="bfloat16", block_size=block, num_planes=layers, piece_bytes=piece,
        layout=f"layer_major:{layers}x{piece}:test",
    )


def key(i: int) -> bytes:
    return hashlib.blake2b(b"fuzz-key-%d" % i, digest_size=p.KEY_BYTES).digest()


def keys(first: int, n: int) -> bytes:
    return b"".join(key(i) for i in range(first, first + n))


def stats() -> p.ServerStats:
    node = p.TierNode("127.0.0.1:6379", "master", True, 10, 20, 3, 0, "")
    tier = p.TierStats(
        "disk", {"path": "/var/cache/kvdepot"}, 1 << 30, 4096, 1, 0, 0, 4, 1, 4096, 1, 4096,
        0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1e9, "", probes=2, probe_found=1, nodes=[node],
    )
    return p.ServerStats(
        "0.1.0", "boot", 1.5, True, 1 << 20, 65536, (1 << 20) - 65536, 256, 1, 1, 1, 0, 0, 3,
        2, 1, 512, 256, 1, 256, 65536, 1, 256, 65536, 0, 0, 0, {"BAD_FRAME": 1}, [tier],
    )


def requests() -> list[p.Request]:
    """One of every request type, plus a Batch of several."""
    single = [
        p.Hello(req_id=1, protocol_version=p.PROTOCOL_VERSION, engine_id="engine-a", pid=4242),
        p.Register(req_id=2, model="tiny-llama", geometry=geometry(), world_size=2, salt="tenant"),
        p.Lookup(req_id=3, namespace=1, keys=keys(0, 3), lease_ms=5000),
        p.Reserve(req_id=4, namespace=1, rank=0, keys=keys(3, 2), ttl_ms=1000, parent=key(2)),
        p.Commit(req_id=5, reservation=1),
        p.Abort(req_id=6, reservation=2),
        p.Acquire(req_id=7, namespace=1, rank=1, keys=keys(0, 2), lease_ms=0),
        p.Release(req_id=8, leases=[1, 2], retrieved=[2]),
        p.Heartbeat(req_id=9),
        p.GetStats(req_id=10),
        p.Goodbye(req_id=11),
    ]
    batch = p.Batch(req_id=12, ops=[single[2], single[3], single[7], single[8]])
    return single + [batch]


def replies() -> list[p.Reply]:
    single = [
        p.HelloReply(1, 1, "boot", "0.1.0", "kvdepot", 1 << 20, 256, 1000, 10000, True),
        p.RegisterReply(2, 1, key(99), 65536, 256),
        p.LookupReply(3, 2, 7, [0, 65536, 131072, 196608], 1),
        p.ReserveReply(4, 3, [0, 1, 2, 3, 4], [0, -1, -1, -1, -1]),
        p.CommitReply(5, 2),
        p.AcquireReply(6, 8, [0, 65536]),
        p.OkReply(7),
        p.StatsReply(8, stats()),
        p.ErrorReply(9, int(p.ErrorCode.NO_SPACE), "no room"),
    ]
    return single + [p.BatchReply(10, [single[2], single[3], single[6], single[8]])]


def wire_seeds() -> dict[str, bytes]:
    out = {}
    for message in [*requests(), *replies()]:
        out[f"seed-{p.wire_tag(type(message))}"] = p.encode(message)
    return out


def raw_frame(frame: bytes, engine: int = 0) -> bytes:
    """One ``rpc`` input operation: engine ``engine`` sends ``frame`` as it is."""
    if len(frame) < 256:
        return bytes([engine << 4 | 0, len(frame), 0]) + frame
    return bytes([engine << 4 | 3, len(frame) // 16, len(frame) % 16]) + frame


TICK = bytes([14, 1])  # half a second passes: the loop's maintenance tick
TASKS = bytes([15, 3, 1])  # the workers run 4 queued tasks, which succeed


def rpc_seeds() -> dict[str, bytes]:
    """Sessions of the ``rpc`` target (fuzz_rpc.py reads them): a setup (a lower tier of 4
    slots, queue 2, write-back; slabs of 1 slot; LRU), then frames by the real encoder."""
    setup = bytes([1, 3, 1, 0, 0, 0])
    hello = [p.Hello(1, p.PROTOCOL_VERSION, f"engine-{e}", 100 + e) for e in range(3)]
    register = p.Register(2, "m", geometry(), 1, "")
    store = [
        p.Reserve(3, 1, 0, keys(0, 3)), p.Commit(4, 1),
        p.Reserve(5, 1, 0, keys(3, 2), parent=key(2)), p.Commit(6, 2),
    ]
    load = [p.Lookup(7, 1, keys(0, 5), lease_ms=5000), p.Release(8, [1], [1]),
            p.Acquire(9, 1, 0, keys(0, 2)), p.Release(10, [2])]
    fill = [p.Reserve(11 + i, 1, 0, keys(5 + 2 * i, 2), parent=key(4 + 2 * i)) for i in range(3)]
    session = [hello[0], register, *store, *load]
    sessions = {
        "store-load": [(0, m) for m in session] + [(0, p.GetStats(20)), (0, p.Goodbye(21))],
        "two-engines": [(0, hello[0]), (1, hello[1]), (0, register), (1, register), *[(0, m) for m in store],
                        (1, load[0]), (1, load[1]), (0, p.Batch(30, [load[2], load[3], p.Heartbeat(31)]))],
        "no-session": [(2, p.Lookup(1, 1, keys(0, 1))), (2, hello[2]), (2, p.Goodbye(2)), (2, p.Heartbeat(3))],
        "evict-to-tier": [(0, m) for m in [*session, *fill, p.Commit(40, 3), p.Commit(41, 4), p.Commit(42, 5)]],
    }
    out = {}
    for name, messages in sessions.items():
        data = setup + b"".join(raw_frame(p.encode(m), e) for e, m in messages)
        out[f"seed-{name}"] = data
        out[f"seed-{name}-ticks"] = setup + b"".join(
            raw_frame(p.encode(m), e) + TASKS + TICK for e, m in messages
        )
    return out


def resp_seeds() -> dict[str, bytes]:
    """Replies of the commands the remote tier sends, as a node sends them (fuzz_resp.py:
    the first byte says how they are read: 0 plainly, 1 | 4n into an n-byte view, 3 | 4n
    with a checksum)."""
    slots = (b"*2\r\n*4\r\n:0\r\n:8191\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$4\r\nabcd\r\n"
             b"*2\r\n$0\r\n\r\n:7003\r\n*3\r\n:8192\r\n:16383\r\n*2\r\n$1\r\n?\r\n:7001\r\n")
    value = b"$16\r\n" + bytes(range(16)) + b"\r\n"
    return {
        "seed-simple": b"\x00+OK\r\n:1\r\n$-1\r\n*-1\r\n$3\r\nabc\r\n*2\r\n:0\r\n$0\r\n\r\n",
        "seed-errors": b"\x00-MOVED 3999 127.0.0.1:6381\r\n-ASK 12 [::1]:7002\r\n-ERR unknown\r\n-NOAUTH x\r\n",
        "seed-cluster-slots": b"\x00" + slots,
        "seed-into": bytes([1 | 16 << 2]) + value + b"$3\r\nabc\r\n$-1\r\n-ERR x\r\n",
        "seed-into-checksum": bytes([3 | 16 << 2]) + value + value,
        "seed-pipeline": b"\x00+OK\r\n+OK\r\n:0\r\n" + value + b"*3\r\n:1\r\n:0\r\n:1\r\n",
    }


def formats_seeds() -> dict[str, bytes]:
    """A manifest and chunk-file headers, packed by the formats' own code (fuzz_formats.py:
    the first byte's bit 0 picks the header, bit 1 fixes the checksum)."""
    from kvdepot.server.tiers import chunkfile, manifest

    out = {}
    for name, payload, crcs in (("one-part", 65536, (7,)), ("three-parts", 3 * manifest.PART_BYTES - 5, (1, 2, 3))):
        m = manifest.Manifest(key(1), key(2), 1, payload, crcs)
        out[f"seed-manifest-{name}"] = bytes([2]) + m.pack()
    for name, parent in (("head", b""), ("linked", key(3))):
        buf = bytearray(chunkfile.HEADER_BYTES)
        chunkfile.pack(memoryview(buf), chunkfile.Header(key(1), key(2), parent, 0, 65536, 99))
        # The fields and a few of the zeros after them: the rest of the 4 KiB are zeros too.
        out[f"seed-header-{name}"] = bytes([3]) + bytes(buf[:128])
    return out


def random_seeds(n: int, seed: int, max_len: int) -> dict[str, bytes]:
    """Inputs of targets that read decisions (fuzz_common.Reader): any bytes are valid, and
    a few hundred random ones already walk long operation sequences."""
    rng = random.Random(seed)
    return {
        f"seed-random-{i}": bytes(rng.randrange(256) for _ in range(rng.randrange(max_len // 2, max_len)))
        for i in range(n)
    }


def write(target: str, seeds: dict[str, bytes]) -> None:
    root = os.path.join(CORPUS, target)
    os.makedirs(root, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)


def main() -> None:
    write("wire", wire_seeds())
    write("core", random_seeds(8, 1, 600))
    write("rpc", rpc_seeds())
    write("resp", resp_seeds())
    write("formats", formats_seeds())


if __name__ == "__main__":
    main()
