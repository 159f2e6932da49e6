"""The world of the ``core`` target (fuzz_core.py): a CacheCore set up from the input's first
bytes, and what its edges hold (the arena's slots, the tiers' places) as values, so that every
byte a hit hands out, a copy moves or a delete removes can be checked.

Setup: the eviction policy, a small arena (3 to 10 slots of 64 KiB, slabs of 1, 2 or 4
slots), a disk-like tier (a new place per write, a footprint with a header, a byte cap, a
queue, write-back or write-through, admission by hits, slow reads) and a shared tier spec (a
store other nodes write: probed, fixed places per chunk), either, both or none, prefetch
deadlines, and chunk files a restarted disk found (adopted before any Register).
"""

from __future__ import annotations

import hashlib

from fuzz_common import Reader, diff, snapshot

from kvdepot.keys import namespace_digest
from kvdepot.protocol import KEY_BYTES, KVGeometry
from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.cache import CacheCore
from kvdepot.server.effects import (
    Delete, Demote, DemotionDone, Evicted, Prefetch, PrefetchDone, Probe, ProbeDone,
)
from kvdepot.server.locations import FileRef, RemoteKey
from kvdepot.server.policies import POLICY_CLASSES
from kvdepot.server.prefetching import PrefetchSettings
from kvdepot.server.tiers import StoredChunk, TierSpec

CHUNK = 256
SLOT = 64 << 10  # bytes per rank of a chunk of the small geometry
A, B, STRANGER = b"engine-a", b"engine-b", b"engine-x"
MAX_OPS = 300
# Leases and TTLs engines ask for, in ms (negative: refused).
LEASES_MS = (0, 0, 50, 2000, 30000, -5)
STEPS_S = (0.0005, 0.05, 0.6, 2.5, 31.0, 700.0)  # time passing between operations
POOL = 12  # keys per namespace: a main chain 0..7 and a branch 8..11 after key 3
_UNORDERED = frozenset({"jobs"})  # a refused completion may re-insert its job: order unused


def geometry(layers: int = 2, block: int = 16) -> KVGeometry:
    piece = 16 * 2 * 2 * 16 * 2  # 16-token blocks, 2 heads, K+V of 16 dims, bf16
    return KVGeometry(2, 2, 16, 16, "bfloat16", block, layers, piece, f"layer_major:{layers}x{piece}")


# (model, geometry, world size, salt): the namespaces engines ask for. The last four are
# refused: a block size that does not divide the chunk, no model, no rank, a slot larger
# than any arena here.
NAMESPACES = (
    ("m", geometry(), 1, ""),
    ("m", geometry(), 2, ""),
    ("m", geometry(4), 1, "tenant"),
    ("m", geometry(block=7), 1, ""),
    ("", geometry(), 1, ""),
    ("m", geometry(), 0, ""),
    ("m", geometry(512), 1, ""),
)
VALID = 3


def pool_key(spec: int, j: int) -> bytes:
    return hashlib.blake2b(b"%d:%d" % (spec, j), digest_size=KEY_BYTES).digest()


def parent_index(j: int) -> int | None:
    return None if j == 0 else 3 if j == 8 else j - 1


def path(start: int, n: int) -> list[int]:
    out = [start]
    while len(out) < n and out[-1] not in (7, POOL - 1):
        out.append(out[-1] + 1)
    return out


def value(key: bytes, rank: int) -> bytes:
    return key + bytes([rank])


class World:
    """The core, and what its edges hold: the arena's slots and the tiers' places."""

    def __init__(self, r: Reader):
        policy = r.pick(sorted(POLICY_CLASSES))
        slab = r.pick((1, 2, 4)) * SLOT
        arena = max(3 + r.below(8), slab // SLOT) * SLOT
        tiers = r.pick((0, 1, 2, 3, 3, 3))  # bits: disk, shared
        specs = []
        self.writes = 0
        if tiers & 1:
            specs.append(TierSpec(
                "disk", (1 + r.below(8)) * (SLOT + 4096), 1 + r.below(3), self._disk_place,
                footprint=lambda n: 4096 + -(-n // 4096) * 4096, write_through=r.flag(),
                admit_hits=r.below(3), read_bytes_per_s=r.pick((1e9, 1e9, 1e3)),
            ))
        if tiers & 2:
            specs.append(TierSpec(
                "shared", (1 + r.below(12)) * SLOT, 1 + r.below(3),
                lambda ns, key, rank: RemoteKey(b"r" + ns + key + bytes([rank])),
                write_through=r.flag(), writes=r.pick((True, True, False)), shared=True,
            ))
        prefetch = PrefetchSettings(
            r.pick((0.05, 1.0, 5.0)), r.pick((0.0, 0.25e-3)), r.pick((1e4, 1e4, 1e12))
        )
        self.core = CacheCore(
            SlabAllocator(arena, slab), CHUNK, policy_factory=POLICY_CLASSES[policy],
            tiers=specs, prefetch=prefetch,
        )
        self.now = 100.0
        self.arena: dict[int, bytes] = {}  # slot offset -> what it holds
        self.store: dict[object, bytes] = {}  # a tier's place -> what it holds
        self.jobs: list[Demote | Prefetch | Probe] = []  # started, not completed
        self.done: list[Demote | Prefetch | Probe] = []
        self.namespaces: dict[int, object] = {}  # NAMESPACES index -> NamespaceInfo
        self.reservations: list[tuple[int, bytes]] = []  # (id, session) ever handed out
        self.leases: dict[int, list[tuple[int, bytes]]] = {}  # id -> (offset, value) it reads
        if tiers & 1:
            self._adopt(r)

    def _disk_place(self, ns: bytes, key: bytes, rank: int) -> FileRef:
        self.writes += 1  # a new file per write, like the disk tier's names
        return FileRef(f"{key.hex()}-{rank}-{self.writes}")

    def _adopt(self, r: Reader) -> None:
        """Chunk files a restarted disk found: of known and unknown namespaces, linked or
        not, any rank and size; before any Register, as at start."""
        found = []
        for i in range(r.below(8)):
            spec = r.below(VALID + 1)
            if spec < VALID:
                model, geo, world, salt = NAMESPACES[spec]
                digest = namespace_digest(model, geo, world, salt)
            else:
                digest, spec = b"\x07" * KEY_BYTES, 0
            j = r.below(POOL)
            up = parent_index(j)
            parent = r.pick((
                b"" if up is None else pool_key(spec, up), b"", pool_key(spec, r.below(POOL)),
            ))
            rank = r.pick((0, 0, 1, 2))
            where = FileRef(f"found/{i}")
            found.append(StoredChunk(
                digest, pool_key(spec, j), parent, rank, r.pick((SLOT, SLOT, 2 * SLOT, 1)),
                where, float(r.byte()),
            ))
            self.store[where] = value(pool_key(spec, j), rank)
        self.core.adopt("disk", found)
        self.settle()

    # --- the edges ------------------------------------------------------------------------

    def settle(self) -> None:
        """Take the core's effects as the RPC loop does after every request: deletes run
        first (the workers' order), copies and probes wait for a completion."""
        for effect in self.core.take_effects():
            if isinstance(effect, Delete):
                if effect.tier == "shared":
                    continue  # forgotten, not deleted: other nodes may hit it (TierSpec.shared)
                assert effect.where in self.store, f"delete of a place the tier does not hold: {effect}"
                del self.store[effect.where]
            elif isinstance(effect, Demote):
                held = self.arena.get(effect.source.offset)
                assert held == value(effect.key, effect.rank), f"writes down {held!r}: {effect}"
                self.jobs.append(effect)
            elif isinstance(effect, Prefetch):
                assert effect.source in self.store, f"loads a place the tier lacks: {effect}"
                self.jobs.append(effect)
            elif isinstance(effect, Probe):
                assert effect.keys and len(effect.keys) <= 64, effect
                self.jobs.append(effect)
            else:
                assert isinstance(effect, Evicted), effect

    def complete(self, r: Reader) -> None:
        if not self.jobs:
            return
        job = self.jobs.pop(r.below(len(self.jobs)))
        ok = r.byte() % 4 != 0
        if isinstance(job, Demote):
            done = DemotionDone(job.job, ok, "" if ok else "disk full")
            held = self.arena.get(job.source.offset)  # read during the copy: it must not change
            assert held == value(job.key, job.rank), f"slot rewritten during {job}: {held!r}"
            if ok:
                self.store[job.target] = self.arena.get(job.source.offset, b"<unwritten>")
        elif isinstance(job, Prefetch):
            done = PrefetchDone(job.job, ok, "" if ok else "checksum", r.pick((0.0, 1e-4, 2.0)))
            assert job.source in self.store, f"the place a load reads went: {job}"
            if ok:
                self.arena[job.target.offset] = self.store[job.source]
            else:  # the tier dropped its bad copy; the slot holds junk
                del self.store[job.source]
                self.arena[job.target.offset] = b"<junk>"
        else:
            n = len(job.keys)
            found = r.pick((0, 1, n // 2, n, n, n + 3, -1))
            done = ProbeDone(job.job, found, "" if found else r.pick(("", "timeout")))
            for key in job.keys[: max(0, min(found, n))]:  # what other nodes stored
                for rank in range(job.world_size):
                    self.store.setdefault(RemoteKey(b"r" + job.namespace + key + bytes([rank])),
                                          value(key, rank))
        assert self.core.complete(done, self.now), f"a job the core started is unknown: {job}"
        self.done.append(job)

    def complete_unknown(self, r: Reader) -> None:
        """A completion the core must refuse (False), changing nothing."""
        kind = r.below(3)
        if kind == 0 or not (self.jobs or self.done):
            job_id = 1_000_000 + r.byte()
            done = r.pick((DemotionDone(job_id, True), PrefetchDone(job_id, True), ProbeDone(job_id, 1)))
        elif kind == 1 and self.done:
            job = self.done[r.below(len(self.done))]  # applied already
            done = (DemotionDone(job.job, True) if isinstance(job, Demote) else
                    PrefetchDone(job.job, True) if isinstance(job, Prefetch) else ProbeDone(job.job, 1))
        else:
            jobs = self.jobs or self.done
            job = jobs[r.below(len(jobs))]  # the wrong kind of completion for it
            done = (PrefetchDone(job.job, True) if isinstance(job, Demote) else DemotionDone(job.job, True))
        before = snapshot(self.core, _UNORDERED)
        assert not self.core.complete(done, self.now), f"applied {done}"
        after = snapshot(self.core, _UNORDERED)
        assert before == after, f"a refused {done} changed {diff(before, after)}"

    # --- checks ---------------------------------------------------------------------------

    def check(self) -> None:
        self.core.check_invariants()
        assert not self.core.places.effects, "effects left behind"
        for lease_id, reads in list(self.leases.items()):
            if lease_id not in self.core.leases.items:
                del self.leases[lease_id]
                continue
            for offset, expected in reads:
                held = self.arena.get(offset)
                assert held == expected, f"lease {lease_id}: slot {offset} holds {held!r}, not {expected!r}"

    def check_reads(self, lease: int, offsets: list[int], expected: list[bytes]) -> None:
        assert len(offsets) == len(expected), (offsets, expected)
        reads = list(zip(offsets, expected))
        for offset, want in reads:
            held = self.arena.get(offset)
            assert held == want, f"a hit at slot {offset} holds {held!r}, not {want!r}"
        if lease:
            assert lease not in self.leases, f"lease id {lease} handed out twice"
            self.leases[lease] = reads
