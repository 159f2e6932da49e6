"""The core with a shared tier (a store other nodes write too), at the effect level: probes,
chunks found joining the index, their loads, and writes to a local and a shared tier at once.
The real remote tier runs these effects against a Redis/Valkey Cluster
(tests/test_server_remote.py)."""

from __future__ import annotations

import pytest
from conftest import small_geometry
from test_core import A, B
from test_core_chains import chain

from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.cache import CacheCore
from kvdepot.server.effects import Demote, DemotionDone, Prefetch, PrefetchDone, Probe, ProbeDone
from kvdepot.server.locations import RemoteKey, State
from kvdepot.server.probing import PROBE_MEMORY_S
from kvdepot.server.tiers import TierSpec

C = 256
LEASE_MS = 5000


def remote_spec(write_through=True, writes=True, queue_depth=8) -> TierSpec:
    return TierSpec("remote", 1 << 30, queue_depth, lambda ns, key, rank: RemoteKey(key + bytes([rank])),
                    write_through=write_through, writes=writes, shared=True)


def disk_spec(write_through=False) -> TierSpec:
    return TierSpec("disk", 1 << 30, 8, lambda ns, key, rank: RemoteKey(b"d" + key + bytes([rank])),
                    write_through=write_through)


def core_with(*specs: TierSpec, arena_mib: int = 1) -> CacheCore:
    return CacheCore(SlabAllocator(arena_mib << 20, 1 << 20), C, tiers=list(specs))


def store(core: CacheCore, ns, keys: list[bytes]) -> None:
    rid, _, _ = core.reserve(A, ns.id, 0, b"".join(keys), 0, 0.0)
    if rid:  # 0: no room now (victims are being written down)
        core.commit(A, rid, 0.0)


def lookup(core: CacheCore, ns, keys: list[bytes], now: float = 1.0, session: bytes = B):
    return core.lookup_and_prefetch(session, ns.id, b"".join(keys), LEASE_MS, now)


def of(effects, kind):
    return [e for e in effects if isinstance(e, kind)]


def test_a_lookup_past_the_known_prefix_probes_and_loads_what_the_shared_tier_holds():
    core = core_with(remote_spec())
    ns = core.register("m", small_geometry(), 2, "")
    keys = chain(ns.digest, 1, 6)
    hits, _, _, pending = lookup(core, ns, keys)
    assert (hits, pending) == (0, 6)
    (probe,) = of(core.take_effects(), Probe)
    assert probe.keys == keys and probe.world_size == 2 and probe.slot_bytes == ns.slot_bytes
    # The engine asks again while the probe is out: still pending, no second probe.
    assert lookup(core, ns, keys, now=1.1)[3] == 6 and core.take_effects() == []
    # The store holds the first 4: they join the index and start loading, both ranks.
    assert core.complete(ProbeDone(probe.job, 4), now=1.2)
    loads = of(core.take_effects(), Prefetch)
    assert sorted((l.key, l.rank) for l in loads) == sorted((k, r) for k in keys[:4] for r in (0, 1))
    assert [core.index.resident_parent(core.index.entries[k]) for k in keys[1:4]] == [
        core.index.entries[k] for k in keys[:3]
    ]
    hits, lease, _, pending = lookup(core, ns, keys, now=1.3)
    assert (hits, pending) == (0, 4) and lease  # loading, leased; the last 2 were asked already
    for load in loads:
        assert core.complete(PrefetchDone(load.job, True), now=1.4)
    hits, _, offsets, pending = lookup(core, ns, keys, now=1.5)
    assert (hits, pending) == (4, 0) and len(offsets) == 8
    stats = core.places.lower.books["remote"].counters
    assert (stats.probes, stats.probe_found) == (1, 4)
    core.check_invariants()


def test_a_probe_answer_stands_a_moment_then_the_store_is_asked_again():
    core = core_with(remote_spec())
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 1, 3)
    lookup(core, ns, keys, now=1.0)
    (probe,) = of(core.take_effects(), Probe)
    core.complete(ProbeDone(probe.job, 0), now=1.01)
    assert lookup(core, ns, keys, now=1.02)[3] == 0 and core.take_effects() == []  # a miss
    assert lookup(core, ns, keys, now=1.01 + PROBE_MEMORY_S + 0.01)[3] == 3
    assert len(of(core.take_effects(), Probe)) == 1


def test_a_probe_past_its_deadline_is_a_miss_and_is_not_repeated_while_out():
    core = core_with(remote_spec())
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 1, 3)
    lookup(core, ns, keys, now=1.0)
    (probe,) = of(core.take_effects(), Probe)
    late = 1.0 + core.places.lower.settings.deadline_base_s + 0.1
    assert lookup(core, ns, keys, now=late)[3] == 0 and core.take_effects() == []
    # Its answer still counts when it comes: the chunks load for the next lookups.
    core.complete(ProbeDone(probe.job, 3), now=late + 0.1)
    assert len(of(core.take_effects(), Prefetch)) == 3


def test_a_failed_probe_or_a_full_probe_queue_is_a_miss():
    core = core_with(remote_spec(queue_depth=1))
    ns = core.register("m", small_geometry(), 1, "")
    first, second = chain(ns.digest, 1, 2), chain(ns.digest, 2, 2)
    assert lookup(core, ns, first)[3] == 2
    (probe,) = of(core.take_effects(), Probe)
    assert lookup(core, ns, second)[3] == 0  # one probe in flight at most
    core.complete(ProbeDone(probe.job, 0, "RemoteUnavailable: node down"), now=1.1)
    assert core.places.lower.books["remote"].counters.probe_errors == 1
    assert lookup(core, ns, second, now=1.2)[3] == 2


def test_known_chunks_are_not_probed_and_lookups_without_a_lease_never_probe():
    core = core_with(remote_spec())
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 1, 4)
    store(core, ns, keys[:2])
    core.take_effects()
    assert core.lookup_and_prefetch(B, ns.id, b"".join(keys), 0, 1.0)[3] == 0
    assert core.take_effects() == []
    assert lookup(core, ns, keys)[:1] == (2,)
    (probe,) = of(core.take_effects(), Probe)
    assert probe.keys == keys[2:]
    core.complete(ProbeDone(probe.job, 2), now=1.1)
    assert core.index.resident_parent(core.index.entries[keys[2]]) is core.index.entries[keys[1]]


@pytest.mark.parametrize("policy", ["write-through", "on-evict", "off"])
def test_writes_go_to_the_local_and_the_shared_tier_by_their_policies(policy):
    remote = remote_spec(write_through=policy == "write-through", writes=policy != "off")
    core = core_with(disk_spec(), remote)  # 16 slots of 64 KiB
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 1, 16)
    for part in (keys[:8], keys[8:16]):  # fills the arena
        store(core, ns, part)
        through = of(core.take_effects(), Demote)
        assert {d.tier for d in through} == ({"remote"} if policy == "write-through" else set())
        for d in through:
            core.complete(DemotionDone(d.job, True), now=1.0)
    # Evictions: the disk (write-back) gets every victim, and so does the shared tier on
    # eviction unless it holds the chunk already (written through) or is read-only.
    store(core, ns, chain(ns.digest, 2, 4))
    evicting = of(core.take_effects(), Demote)
    tiers = sorted({d.tier for d in evicting})
    assert tiers == (["disk", "remote"] if policy == "on-evict" else ["disk"])
    for d in evicting:
        core.complete(DemotionDone(d.job, True), now=1.1)
    entry = core.index.entries[evicting[0].key]
    assert not entry.in_arena and entry.places_in("disk")[0].state is State.READY
    held = entry.places_in("remote")[0]
    assert (held is not None) == (policy != "off")
    core.check_invariants()
