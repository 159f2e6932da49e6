"""What the fuzz targets found (tests/fuzz/, docs/fuzzing.md), each as a plain test of the
code at fault, and each minimized input (tests/fuzz/crashes/<target>/<issue>) replayed
through its harness with every check on. Open findings are xfail(strict=True): the reason is
the diagnosis, and a fix makes the test pass, which fails the run until the mark goes (and
the issue's entry in fuzz_common.KNOWN_ISSUES with it). The six found so far are fixed:
what each was is in the comments above its tests."""

from __future__ import annotations

import hashlib
import importlib
import socket
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import small_geometry

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import fuzz_common  # noqa: E402

from kvdepot.server.allocator import SlabAllocator  # noqa: E402
from kvdepot.server.cache import CacheCore  # noqa: E402
from kvdepot.server.effects import Demote, DemotionDone  # noqa: E402
from kvdepot.server.locations import FileRef, RemoteKey  # noqa: E402
from kvdepot.server.tiers import TierSpec, manifest  # noqa: E402
from kvdepot.server.tiers.resp import wire  # noqa: E402
from kvdepot.server.tiers.resp.nodes import parse_cluster_slots  # noqa: E402
from kvdepot.server.tiers.resp.settings import Endpoint  # noqa: E402

SLOT = 64 << 10
A, B = b"engine-a", b"engine-b"

# Found by fuzzing, fixed (pending): probing.py ProbePath.probe answers a lookup whose first
# unknown key is being probed with len(probe.keys), the key count of the lookup that started the
# probe, not the keys of this lookup it asks about: a shorter lookup (or another branch after
# the same key) gets more pending chunks than it has keys. Fix: count the common prefix of keys
# and probe.keys.
# Found by fuzzing, fixed (two-copies): tiering.py LowerTiers._demotion_done sets the arena
# place READY when one copy of it ends, while another tier's copy (two tiers writing, e.g. both
# write-through) still reads the slot: the slot becomes evictable, is freed and handed to
# another chunk's Reserve, and the second tier stores that chunk's bytes under this chunk's key
# (the CRC is computed over the wrong bytes, so nothing detects it). Fix: keep the place
# COPYING_OUT until the last job reading that rank's arena slot ends (count the demotions per
# key and rank).


# Found by fuzzing, fixed (bulk): resp/wire.py Connection._read_bulk allocates bytearray(size)
# for the length a bulk header declares, before any byte of the value arrives: a node (or
# anything on a plain TCP path) that sends '$4611686018427387904' raises MemoryError ('$' 2**63:
# OverflowError), which no handler of the remote client expects, and a plausible one
# ('$2000000000') makes the server allocate and zero 2 GB per reply. Fix: refuse a bulk length
# over a bound (RespProtocolError; the largest value read without a Call.into view is small:
# CLUSTER SLOTS, manifests) and grow the buffer as the bytes arrive.
# Found by fuzzing, fixed (not-utf8): resp/nodes.py _endpoint decodes a CLUSTER SLOTS node's
# host with bytes.decode(): a host that is not UTF-8 raises UnicodeDecodeError, not
# RespProtocolError, which RemoteClient.refresh does not catch: at start the remote tier fails
# with a bare traceback, and in the background the topology thread (_refresh_loop catches
# RemoteError only) dies, so the slot map is never refreshed again. Fix: decode inside a try
# that raises RespProtocolError (and let _refresh_loop log and survive any Exception).


# Found reading the parser while writing its harness, fixed (nesting): resp/wire.py
# Connection.read_reply reads an array's items by calling itself: a node that sends ~500
# nested arrays ('*1\r\n' repeated, 2 KB) raises RecursionError, which the remote client's
# handlers do not expect (RemoteClient.refresh and _refresh_loop catch RespProtocolError /
# RemoteError only, so the topology thread dies); coverage does not lead libFuzzer to depth.
# Fix: bound the nesting (RespProtocolError past a small depth: CLUSTER SLOTS, the deepest
# reply read, nests 3) or parse with an explicit stack.
# Found by fuzzing, fixed (parts): tiers/manifest.py unpack checks the part count with
# len(part_spans(payload, part_bytes)), which builds a list of every part the manifest's payload
# field implies before comparing: a manifest in the shared store (any node writes them; probes
# read them) whose u64 payload says 2**61 bytes (the fuzzer's input: one flipped bit, default
# part size) makes the reading worker allocate until the server runs out of memory. Fix: compare
# max(1, ceil(payload / part_bytes)) with the part count arithmetically (and bound payload by
# MAX_PARTS * part_bytes) before anything is built.


def key(i: int) -> bytes:
    return hashlib.blake2b(b"regression-%d" % i, digest_size=16).digest()


def replay(target: str, issue: str, monkeypatch) -> None:
    """The minimized input of ``issue``, through its harness, with every check on."""
    monkeypatch.setattr(fuzz_common, "STRICT", True)
    data = (FUZZ / "crashes" / target / issue).read_bytes()
    importlib.import_module(f"fuzz_{target}").TestOneInput(data)


# --- core: a probe's pending count --------------------------------------------------------


def test_pending_counts_only_this_lookups_keys():
    shared = TierSpec("shared", 1 << 30, 8, lambda ns, k, rank: RemoteKey(ns + k + bytes([rank])),
                      shared=True)
    core = CacheCore(SlabAllocator(1 << 20, 1 << 20), 256, tiers=[shared])
    ns = core.register("m", small_geometry(), 1, "")
    keys = [key(i) for i in range(6)]
    hits, _, _, pending = core.lookup_and_prefetch(A, ns.id, b"".join(keys), 5000, 1.0)
    assert (hits, pending) == (0, 6)  # a probe of the 6 keys is out
    # The same prompt's first chunk only (a shorter request): one key, so at most 1 pending.
    hits, _, _, pending = core.lookup_and_prefetch(B, ns.id, keys[0], 5000, 1.1)
    assert hits + pending <= 1, f"{pending} chunks pending for a lookup of 1 key"


def test_pending_counts_only_this_lookups_keys_fuzz_input(monkeypatch):
    replay("core", "pending-counts-other-lookups-keys", monkeypatch)


# --- core: two tiers copying one arena slot -----------------------------------------------


def test_a_slot_two_tiers_copy_stays_until_both_copies_end():
    disk = TierSpec("disk", 1 << 30, 4, lambda ns, k, rank: FileRef(f"{k.hex()}-{rank}"),
                    write_through=True)
    shared = TierSpec("shared", 1 << 30, 4, lambda ns, k, rank: RemoteKey(ns + k + bytes([rank])),
                      write_through=True, shared=True)
    core = CacheCore(SlabAllocator(2 * SLOT, SLOT), 256, tiers=[disk, shared])
    ns = core.register("m", small_geometry(), 1, "")
    rid, _, _ = core.reserve(A, ns.id, 0, key(1), 0, 0.0)
    core.commit(A, rid, 0.0)  # complete: both write-through tiers start copying its slot
    to_disk, to_shared = [e for e in core.take_effects() if isinstance(e, Demote)]
    assert to_disk.source == to_shared.source
    assert core.complete(DemotionDone(to_disk.job, True))  # the disk's copy ends first
    rid, _, _ = core.reserve(A, ns.id, 0, key(2), 0, 0.0)  # the arena's other slot
    core.commit(A, rid, 0.0)
    core.take_effects()
    _, status, offsets = core.reserve(A, ns.id, 0, key(3), 0, 0.0)  # full: someone goes
    assert to_shared.source.offset not in offsets, (
        f"slot {to_shared.source.offset} handed to another chunk while the shared tier copies it"
    )


def test_a_slot_two_tiers_copy_stays_until_both_copies_end_fuzz_input(monkeypatch):
    replay("core", "two-tiers-copy-one-slot", monkeypatch)


# --- resp: what a node's bytes may do to the client ---------------------------------------


def _replies(sent: bytes) -> list:
    """The replies a real Connection reads from a node that sends ``sent`` and closes."""
    ours, node = socket.socketpair()
    try:
        node.sendall(sent)
        node.shutdown(socket.SHUT_WR)
        conn, replies = wire.Connection(ours), []
        while True:
            try:
                replies.append(conn.read_reply(time.monotonic() + 5.0))
            except wire.PeerClosed:
                return replies
    finally:
        ours.close()
        node.close()


def test_a_bulk_length_is_checked_before_memory_is_taken():
    with pytest.raises(wire.RespProtocolError):
        _replies(b"$4611686018427387904\r\n")


def test_a_bulk_length_is_checked_before_memory_is_taken_fuzz_input(monkeypatch):
    replay("resp", "bulk-length-trusted", monkeypatch)


def test_a_cluster_slots_host_that_is_not_utf8_is_a_protocol_error():
    (reply,) = _replies(b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$2\r\n\xff\xfe\r\n:7000\r\n")
    with pytest.raises(wire.RespProtocolError):
        parse_cluster_slots(reply, Endpoint("10.0.0.1", 6379))


def test_a_cluster_slots_host_that_is_not_utf8_is_a_protocol_error_fuzz_input(monkeypatch):
    replay("resp", "cluster-slots-host-not-utf8", monkeypatch)


def test_deeply_nested_replies_are_a_protocol_error():
    with pytest.raises(wire.RespProtocolError):
        _replies(b"*1\r\n" * 600 + b":1\r\n")


def test_deeply_nested_replies_are_a_protocol_error_fuzz_input(monkeypatch):
    replay("resp", "reply-nesting-recursion", monkeypatch)


# --- formats: a manifest another node wrote ------------------------------------------------


def _peak_bytes(run) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_manifest_is_checked_in_bounded_memory():
    # One part named, a payload of 2**17 parts of the default size (the fuzzer's said 2**39).
    data = manifest.Manifest(key(1), key(2), 0, manifest.PART_BYTES << 17, (0,)).pack()

    def unpack() -> None:
        with pytest.raises(manifest.BadManifest):
            manifest.unpack(data)

    peak = _peak_bytes(unpack)
    assert peak < 1 << 20, f"checking a {len(data)}-byte manifest took {peak} bytes"


def test_a_manifest_is_checked_in_bounded_memory_fuzz_input(monkeypatch):
    # The fuzzer's input with its payload scaled down to 200,000 parts (it ran out of memory).
    peak = _peak_bytes(lambda: replay("formats", "manifest-parts-from-payload", monkeypatch))
    assert peak < 1 << 20, f"checking a 68-byte manifest took {peak} bytes"
