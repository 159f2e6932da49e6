"""The core with a lower tier, at the effect/completion level: the core is pure, so the test is
the tier. ``FakeTier`` keeps what the arena's slots and the tier hold as values (one per chunk
rank: what its engine wrote), carries out Demote/Prefetch/Delete effects only when the test
finishes them, and checks every hit against what was written. A real tier (disk) runs the same
effects on worker threads (tests/test_server_tiers.py shows the loop side)."""

from __future__ import annotations

import itertools
import random

import pytest
from conftest import small_geometry
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_core import A, B
from test_core_chains import LINKED, OPS, ChainModel, chain, store_in_calls

from kvdepot.protocol import SlotStatus
from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.cache import CacheCore, CacheError
from kvdepot.server.effects import Delete, Demote, DemotionDone, Evicted, Prefetch, PrefetchDone
from kvdepot.server.locations import ARENA, RemoteKey, State
from kvdepot.server.policies import POLICY_CLASSES
from kvdepot.server.prefetching import PrefetchSettings
from kvdepot.server.tiers import StoredChunk, TierSpec

C = 256
TIER = "fake"
POLICIES = sorted(POLICY_CLASSES)


def value(key: bytes, rank: int) -> bytes:
    return key + bytes([rank])


class FakeTier:
    def __init__(self, core: CacheCore):
        self.core = core
        self.arena: dict[int, bytes] = {}  # slot offset -> the value last written there
        self.store: dict[RemoteKey, bytes] = {}
        self.jobs: dict[int, Demote | Prefetch] = {}  # started, not finished
        self.evicted: list[Evicted] = []
        self.deleted: list[Delete] = []
        self.meta: dict[RemoteKey, StoredChunk] = {}  # what a restarted tier's scan finds
        self._written = 0

    def take(self) -> list:
        effects = self.core.take_effects()
        for effect in effects:
            if isinstance(effect, (Demote, Prefetch)):
                assert effect.tier == TIER and effect.job not in self.jobs
                self.jobs[effect.job] = effect
            elif isinstance(effect, Delete):
                assert effect.where in self.store, effect
                del self.store[effect.where]
                del self.meta[effect.where]
                self.deleted.append(effect)
            else:
                self.evicted.append(effect)
        return effects

    def write(self, status: list[int], offsets: list[int], keys: list[bytes], rank: int) -> None:
        """The engine writes the slots it reserved."""
        for s, off, key in zip(status, offsets, keys):
            if s == SlotStatus.RESERVED:
                self.arena[off] = value(key, rank)

    def finish(self, job: int, ok: bool = True) -> None:
        effect = self.jobs.pop(job)
        if isinstance(effect, Demote):
            if ok:  # read at the end: the slot must not have changed meanwhile
                self.store[effect.target] = self.arena[effect.source.offset]
                self._written += 1
                self.meta[effect.target] = StoredChunk(
                    effect.namespace, effect.key, effect.parent, effect.rank, effect.nbytes,
                    effect.target, float(self._written),
                )
            assert self.core.complete(DemotionDone(job, ok, "" if ok else "disk full"))
        else:
            if ok:
                self.arena[effect.target.offset] = self.store[effect.source]
            else:  # a bad copy: the tier drops it
                del self.store[effect.source]
                del self.meta[effect.source]
            assert self.core.complete(PrefetchDone(job, ok, "" if ok else "checksum"))
        self.take()

    def finish_all(self) -> None:
        while self.jobs:
            self.finish(next(iter(self.jobs)))

    def check_hit(self, keys: list[bytes], world_size: int, hits: int, offsets: list[int]) -> None:
        for rank in range(world_size):
            for i in range(hits):
                assert self.arena[offsets[rank * hits + i]] == value(keys[i], rank), (rank, i)


def tiered_core(capacity_chunks: int = 64, queue_depth: int = 8, policy: str = "lru",
                arena_mib: int = 1, slab_kib: int = 1024, write_through: bool = False,
                admit_hits: int = 0, **kw) -> CacheCore:
    # A new place per write (like the disk tier's file names): a write never meets an older
    # copy of the same chunk, nor its queued delete.
    writes = itertools.count()
    spec = TierSpec(TIER, capacity_chunks * (64 << 10), queue_depth,
                    lambda ns, key, rank: RemoteKey(ns + key + bytes([rank]) + b"%d" % next(writes)),
                    write_through=write_through, admit_hits=admit_hits)
    return CacheCore(SlabAllocator(arena_mib << 20, slab_kib << 10), C,
                     policy_factory=POLICY_CLASSES[policy], tiers=[spec], **kw)


def fill(core: CacheCore, tier: FakeTier, ns, keys: list[bytes], per_call: int = 4) -> list[int]:
    statuses = []
    for start in range(0, len(keys), per_call):
        part = keys[start : start + per_call]
        rid, status, offsets = core.reserve(A, ns.id, 0, b"".join(part), 0, 0.0,
                                            parent=keys[start - 1] if start else b"")
        tier.write(status, offsets, part, 0)
        if rid:
            core.commit(A, rid, 0.0)
        tier.take()
        statuses += status
    return statuses


def test_without_tiers_the_core_reports_only_evictions():
    core = CacheCore(SlabAllocator(1 << 20, 1 << 20), C)  # 16 slots
    ns = core.register("m", small_geometry(), 1, "")
    store_in_calls(core, ns.id, chain(ns.digest, 1, 16), per_call=4)
    assert core.take_effects() == []
    store_in_calls(core, ns.id, chain(ns.digest, 2, 3), per_call=3)
    effects = core.take_effects()
    assert [type(e) for e in effects] == [Evicted] * 3 and {e.tier for e in effects} == {ARENA}
    assert core.take_effects() == [] and core.counters.evicted_chunks == 3
    assert core.places.lower is None and not core.complete(DemotionDone(1, True))


@pytest.mark.parametrize("policy", POLICIES)
def test_an_evicted_chunk_is_written_down_and_comes_back_on_a_leased_lookup(policy):
    core = tiered_core(policy=policy)
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 3, 16)
    assert fill(core, tier, ns, keys) == [SlotStatus.RESERVED] * 16  # the arena is full
    other = chain(ns.digest, 4, 1)
    # The only chain's tail must go: it is written down first, and its slot stays until then.
    rid, status, _ = core.reserve(B, ns.id, 0, other[0], 0, 0.0)
    effects = tier.take()
    assert status == [SlotStatus.NO_SPACE] and rid == 0
    [demote] = [e for e in effects if isinstance(e, Demote)]
    tail = core.index.entries[keys[15]]
    assert (demote.key, demote.rank, demote.namespace) == (keys[15], 0, ns.digest)
    assert tail.arena[0].state is State.COPYING_OUT and tail.places_in(TIER)[0].state is State.LOADING_IN
    hits, lease, offsets = core.lookup(B, ns.id, b"".join(keys), 1000, 0.0)  # still readable
    assert hits == 16 and offsets[15] == demote.source.offset
    tier.check_hit(keys, 1, hits, offsets)
    core.check_invariants()
    # Done while leased: the arena copy stays (a reader holds it); the tier has one too.
    tier.finish(demote.job)
    assert tail.arena[0].state is State.READY and tail.places_in(TIER)[0].state is State.READY
    core.release(B, [lease], 0.0)
    # The next eviction of it frees its slot at once: nothing more to write.
    rid, status, offsets = core.reserve(B, ns.id, 0, other[0], 0, 0.0)
    tier.write(status, offsets, other, 0)
    effects = tier.take()
    assert status == [SlotStatus.RESERVED] and offsets[0] == demote.source.offset
    assert effects == [Evicted(ARENA, keys[15])] and not tail.in_arena
    core.abort(B, rid)  # a free slot for the load below
    core.check_invariants()
    # A leased lookup of the whole chain hits 15 in the arena and loads the 16th back.
    hits, lease, offsets = core.lookup(B, ns.id, b"".join(keys), 1000, 0.0)
    assert hits == 15
    [prefetch] = [e for e in tier.take() if isinstance(e, Prefetch)]
    assert prefetch.key == keys[15] and tail.arena[0].state is State.LOADING_IN
    assert core.lookup(B, ns.id, b"".join(keys), 0, 0.0)[0] == 15  # not readable until it landed
    core.check_invariants()
    tier.finish_all()
    core.release(B, [lease], 0.0)
    hits, lease, offsets = core.lookup(B, ns.id, b"".join(keys), 1000, 0.0)
    assert hits == 16
    tier.check_hit(keys, 1, hits, offsets)
    core.release(B, [lease], 0.0)
    core.check_invariants()


def test_a_failed_copy_loses_the_chunk_but_nothing_else():
    core = tiered_core()
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 5, 16)
    fill(core, tier, ns, keys)
    core.reserve(B, ns.id, 0, chain(ns.digest, 6, 1)[0], 0, 0.0)
    tier.take()
    [job] = tier.jobs
    tier.finish(job, ok=False)  # the tier could not write it: it is evicted all the same
    assert keys[15] not in core.index.entries and core.allocator.free_bytes == 64 << 10
    assert tier.evicted[-1] == Evicted(ARENA, keys[15])
    core.check_invariants()
    # Written down, then unreadable when loaded back: a miss, its slot and place given back.
    core.reserve(B, ns.id, 0, chain(ns.digest, 7, 2)[0] + chain(ns.digest, 7, 2)[1], 0, 0.0)
    tier.take()
    tier.finish_all()
    assert not core.index.entries[keys[14]].in_arena
    hits, lease, _, pending = core.lookup_and_prefetch(B, ns.id, b"".join(keys), 1000, 0.0)
    assert (hits, pending) == (14, 1)
    tier.take()
    [job] = [j for j, e in tier.jobs.items() if isinstance(e, Prefetch)]
    tier.finish(job, ok=False)
    # No place is left; the lookup's lease keeps the entry until it ends, then it goes.
    failed = core.index.entries[keys[14]]
    assert not failed.in_arena and not failed.lower and failed.leases == 1
    assert not core.places.lower.books[TIER].used_bytes
    core.check_invariants()
    assert core.lookup_and_prefetch(B, ns.id, b"".join(keys), 0, 0.0)[::3] == (14, 0)
    core.release(B, [lease], 0.0)
    assert keys[14] not in core.index.entries
    core.check_invariants()


def store_head(core: CacheCore, tier: FakeTier, ns, key: bytes) -> None:
    """Store a one-chunk chain, waiting for write-backs when the arena is full."""
    for _ in range(4):
        rid, status, offsets = core.reserve(B, ns.id, 0, key, 0, 0.0)
        tier.write(status, offsets, [key], 0)
        tier.take()
        if rid:
            core.commit(B, rid, 0.0)
            return
        assert status == [SlotStatus.NO_SPACE]  # a tail is being written down for it
        tier.finish_all()
    raise AssertionError("no room after the write-backs")


def test_the_tier_cap_evicts_its_own_tails_and_deletes_their_bytes():
    core = tiered_core(capacity_chunks=4)
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 8, 16)
    fill(core, tier, ns, keys)
    books = core.places.lower.books[TIER]
    for i in range(12):
        store_head(core, tier, ns, chain(ns.digest, 100 + i, 1)[0])
        assert books.used_bytes <= 4 * (64 << 10) and len(tier.store) <= 4
        core.check_invariants()
    # The tier took what left the arena and, full, let its own tails go: `keys` lost its
    # last chunks from the end, and what is left of it is still a prefix, in some tier.
    gone = [d.key for d in tier.deleted if d.key in keys]
    assert gone and gone == sorted(gone, key=keys.index, reverse=True)
    held = [k in core.index.entries for k in keys]
    assert held == sorted(held, reverse=True) and held.count(False) == len(gone)
    assert all(d.where not in tier.store for d in tier.deleted)


def test_a_full_queue_drops_what_it_cannot_write_and_counts_it():
    core = tiered_core(queue_depth=1)
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    first, second = chain(ns.digest, 9, 8), chain(ns.digest, 10, 8)
    fill(core, tier, ns, first)
    fill(core, tier, ns, second)
    rid, status, _ = core.reserve(B, ns.id, 0, chain(ns.digest, 11, 1)[0], 0, 0.0)
    effects = tier.take()
    # One tail is being written down (the queue holds one); the next victim is dropped.
    assert status == [SlotStatus.RESERVED]
    assert sum(isinstance(e, Demote) for e in effects) == 1
    assert core.places.lower.unwritten == 1
    core.check_invariants()


def test_a_completion_twice_or_of_an_unknown_job_changes_nothing():
    core = tiered_core()
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    fill(core, tier, ns, chain(ns.digest, 12, 16))
    core.reserve(B, ns.id, 0, chain(ns.digest, 13, 1)[0], 0, 0.0)
    tier.take()
    [job] = tier.jobs
    assert not core.complete(PrefetchDone(job, True))  # the wrong kind
    tier.finish(job)
    assert not core.complete(DemotionDone(job, True)) and not core.complete(DemotionDone(999, True))
    core.check_invariants()


def test_chunks_after_one_only_a_tier_holds_keep_it_in_the_arena():
    """A chunk whose later chunks live only below cannot simply be dropped from the arena:
    they would be unreachable. While no tier can take it (its queue is full), it stays."""
    core = tiered_core(queue_depth=1)
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 14, 16)
    fill(core, tier, ns, keys)
    for i in range(2):  # keys[15], then keys[14], go down to the tier
        rid, status, _ = core.reserve(B, ns.id, 0, chain(ns.digest, 15 + i, 1)[0], 0, 0.0)
        assert status == [SlotStatus.NO_SPACE]
        tier.take()
        tier.finish_all()
        if i == 0:  # an open store takes the slot keys[15] left
            rid, status, offsets = core.reserve(B, ns.id, 0, chain(ns.digest, 20, 1)[0], 0, 0.0)
            assert status == [SlotStatus.RESERVED]
    assert [core.index.entries[k].in_arena for k in keys[13:]] == [True, False, False]
    # A leased lookup of keys[15] alone loads it into the slot keys[14] left: the queue's one
    # place is taken, and keys[13] (keys[14] lives only below) has nowhere to go.
    assert core.lookup(B, ns.id, keys[15], 1000, 0.0)[0] == 0
    [load] = [e for e in tier.take() if isinstance(e, Prefetch)]
    rid, status, _ = core.reserve(B, ns.id, 0, chain(ns.digest, 21, 1)[0], 0, 0.0)
    assert status == [SlotStatus.NO_SPACE] and not tier.take()
    assert core.index.entries[keys[13]].in_arena and core.places.lower.unwritten == 0
    core.check_invariants()
    tier.finish(load.job)  # the queue is free again: keys[13] goes down when room is needed
    rid, status, _ = core.reserve(B, ns.id, 0, chain(ns.digest, 21, 1)[0], 0, 0.0)
    assert [e.key for e in tier.take() if isinstance(e, Demote)] == [keys[13]]
    core.check_invariants()


# --- property: random operations, copies finishing in any order, some failing ------------------

FINISHES = st.lists(st.tuples(st.integers(0, 1 << 16), st.booleans()), max_size=150)


def run_ops(core: CacheCore, tier: FakeTier, model: ChainModel, ops, finishes, now: float = 0.0) -> float:
    """Random stores, commits, aborts, lookups (leased ones prefetch, and say what is pending),
    acquires, releases, expiries and crashed engines; after each, one copy ends (in any order,
    some failing) and every chain and byte is checked. Returns the clock."""
    sessions = [b"s1", b"s2"]
    open_res: list[tuple[bytes, int]] = []
    leases: list[tuple[bytes, int]] = []
    rng = random.Random(len(ops))
    for step, (what, which, first, n, choice) in enumerate(ops):
        ns, keys = model.chains[which]
        first = min(first, len(keys) - 1)
        part = keys[first : first + n]
        sess = sessions[choice % 2]
        rank = choice % ns.world_size
        before = {k: e.committed_ranks or int(bool(e.lower)) for k, e in core.index.entries.items()}
        stored: list[bytes] = []
        now += 0.1
        if what <= 3:
            parent = keys[first - 1] if first else b""
            rid, status, offsets = core.reserve(sess, ns.id, rank, b"".join(part), 0, now, parent=parent)
            tier.write(status, offsets, part, rank)
            stored = [k for k, s in zip(part, status) if s in LINKED]
            if rid and choice % 3:
                core.commit(sess, rid, now)
            elif rid:
                open_res.append((sess, rid))
        elif what <= 5 and open_res:
            s, rid = open_res.pop(choice % len(open_res))
            try:
                (core.commit(s, rid, now) if what == 4 else core.abort(s, rid))
            except CacheError:
                pass  # expired meanwhile
        elif what <= 7:  # leased lookups start loads from the tier
            tail = keys[first:] if what == 6 else keys  # from the middle, or the head
            hits, lease, offsets, pending = core.lookup_and_prefetch(
                sess, ns.id, b"".join(tail), 1000 if choice % 4 else 0, now
            )
            if lease:
                tier.check_hit(tail, ns.world_size, hits, offsets)
                leases.append((sess, lease))
            # Pending: the chunks right after the hits, each loading or landed, and held.
            for key in tail[hits : hits + pending]:
                entry = core.index.entries[key]
                assert entry.leases and (entry.complete or entry.loading_ranks), entry
            assert not pending or lease
        elif what == 8:
            lease, offsets = core.acquire(sess, ns.id, rank, b"".join(keys[first:]), 1000, now)
            for key, off in zip(keys[first:], offsets):
                assert tier.arena[off] == value(key, rank)
            if lease:
                leases.append((sess, lease))
        elif what == 9 and leases:
            s, lease = leases.pop(choice % len(leases))
            try:
                core.release(s, [lease], now)
            except CacheError:
                pass
        elif what == 10:
            now += 5.0
            core.expire(now)
        else:
            core.drop_session(sess, now)
        tier.take()
        # Copies end in any order, some fail; a failed load loses its chunk (orphans allowed).
        if step < len(finishes) and tier.jobs:
            pick, ok = finishes[step]
            job = sorted(tier.jobs)[pick % len(tier.jobs)]
            if not ok and isinstance(tier.jobs[job], Prefetch):
                before[tier.jobs[job].key] = 0
            tier.finish(job, ok or rng.random() < 0.5)
        model.check(before, stored)
    tier.finish_all()
    for s in sessions:
        core.drop_session(s, now)
    tier.take()
    core.check_invariants()
    return now


def empty_everything(core: CacheCore, tier: FakeTier) -> None:
    """Nothing leaks: with every copy done and nobody holding anything, every tier empties."""
    core.clear()
    tier.take()
    assert not core.index.entries and core.allocator.used_bytes == 0
    assert not tier.store and core.places.lower.books[TIER].used_bytes == 0
    core.check_invariants()


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=OPS, finishes=FINISHES)
def test_random_operations_with_a_tier_keep_every_byte_and_every_chain(policy, ops, finishes):
    # 16 slots of the first namespace's size; the tier holds 24 of them and copies 3 at once.
    core = tiered_core(capacity_chunks=24, queue_depth=3, policy=policy, slab_kib=256,
                       lease_ttl_s=3, reservation_ttl_s=3)
    tier = FakeTier(core)
    run_ops(core, tier, ChainModel(core), ops, finishes)
    empty_everything(core, tier)


def reachable_on_tier(tier: FakeTier, world_size: dict[bytes, int]) -> set[bytes]:
    """The keys whose every rank the tier holds, recorded with one parent, and whose chain up
    to a head, by those records, it holds too. By the records, not the true chains: a chunk
    stored while its parent's store was dropped (an abort, an expiry) is written down as a
    head, and a restart can know no better (a lookup never reaches it; its tier evicts it as
    any tail)."""
    parents: dict[bytes, set[bytes]] = {}
    ranks: dict[bytes, set[int]] = {}
    for chunk in tier.meta.values():
        ranks.setdefault(chunk.key, set()).add(chunk.rank)
        parents.setdefault(chunk.key, set()).add(chunk.parent)
    whole = {k: next(iter(parents[k])) for k, r in ranks.items()
             if len(r) == world_size[k] and len(parents[k]) == 1}
    out = set()
    for key in whole:
        k = key
        while k in whole and whole[k]:
            k = whole[k]
        if k in whole and not whole[k]:
            out.add(key)
    return out


@pytest.mark.parametrize("write_through, admit_hits", [(True, 0), (False, 1), (True, 1)])
@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=OPS, more=OPS, finishes=FINISHES)
# Found by this property (1 run in ~1000): a store adding ranks to a chunk that only the tier
# held made room in the arena, whose victim's write-through made room in the tier by evicting
# that very chunk: its entry left the index under the store, and the commit failed.
@example(ops=[(0, 3, 0, 4, 215), (0, 3, 0, 4, 15046), (0, 0, 0, 3, 14), (0, 5, 0, 3, 403),
              (0, 5, 0, 5, 188)], more=[], finishes=[])
# A chunk written down while its parent was unknown (the parent's store was dropped, then the
# chunk linked again later): the tier's record says head; found 1 run in ~3000.
@example(ops=[(0, 1, 0, 5, 81), (0, 1, 5, 4, 4593), (0, 1, 11, 5, 35254), (6, 1, 9, 4, 195)],
         more=[], finishes=[])
def test_random_operations_across_a_restart_keep_every_byte_and_every_chain(
    write_through, admit_hits, ops, more, finishes
):
    """Write-through or write-back, admission by hits; then a new core adopts what the tier
    holds (as a restarted server's scan finds it), namespaces register again, and it goes on.
    Exactly the chunks whose chain the tier holds whole come back; every byte is right."""
    kw = dict(capacity_chunks=24, queue_depth=3, slab_kib=256, lease_ttl_s=3,
              reservation_ttl_s=3, write_through=write_through, admit_hits=admit_hits)
    core = tiered_core(**kw)
    tier = FakeTier(core)
    model = ChainModel(core)
    now = run_ops(core, tier, model, ops, finishes)
    # Every chain stored whole, rank by rank, a few chunks per call, copies done as they go:
    # the tier then holds chains (and pieces of chains) of both namespaces.
    for ns, keys in model.chains:
        for rank in range(ns.world_size):
            for start in range(0, len(keys), 3):
                part = keys[start : start + 3]
                rid, status, offsets = core.reserve(A, ns.id, rank, b"".join(part), 0, now,
                                                    parent=keys[start - 1] if start else b"")
                tier.write(status, offsets, part, rank)
                if rid:
                    core.commit(A, rid, now)
                tier.take()
                tier.finish_all()
    found = list(tier.meta.values())
    sizes = {ns.digest: ns for ns, _ in model.chains}
    world = {c.key: sizes[c.namespace].world_size for c in found}
    expected = reachable_on_tier(tier, world)

    again = tiered_core(**kw)
    tier2 = FakeTier(again)
    tier2.store, tier2.meta = dict(tier.store), dict(tier.meta)
    again.adopt(TIER, found)
    books = again.places.lower.books[TIER]
    assert len(books.orphans) == len(found) and not again.index.entries
    again.check_invariants()
    model2 = ChainModel(again)  # registers both namespaces: their chunks join the index
    tier2.take()  # deletes what could not be adopted
    assert set(again.index.entries) == expected and not books.orphans
    assert {c.key for c in tier2.meta.values()} == expected
    again.check_invariants()
    run_ops(again, tier2, model2, more, finishes)
    empty_everything(again, tier2)


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4), st.booleans()), min_size=10, max_size=80))
def test_a_working_set_larger_than_the_arena_cycles_through_the_tier(policy, steps):
    """Six 6-chunk prompts, 16 arena slots: each turn looks one up (leased), reads what hit,
    stores what missed; copies finish a few per turn, now and then failing. Every hit reads
    exactly what its engine wrote, whichever tier it went through."""
    core = tiered_core(capacity_chunks=40, queue_depth=4, policy=policy)
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    prompts = [chain(ns.digest, 400 + i, 6) for i in range(6)]
    loaded = 0
    for which, finishing, ok in steps:
        keys = prompts[which]
        hits, lease, offsets = core.lookup(A, ns.id, b"".join(keys), 1000, 0.0)
        tier.take()
        tier.check_hit(keys, 1, hits, offsets)
        if lease:
            core.release(A, [lease], 0.0, retrieved=[lease])
        rest = keys[hits:]
        if rest:
            rid, status, offs = core.reserve(A, ns.id, 0, b"".join(rest), 0, 0.0,
                                             parent=keys[hits - 1] if hits else b"")
            tier.write(status, offs, rest, 0)
            if rid:
                core.commit(A, rid, 0.0)
            tier.take()
        for _ in range(finishing):
            if tier.jobs:
                job = min(tier.jobs)
                loaded += isinstance(tier.jobs[job], Prefetch)
                tier.finish(job, ok or job % 3 != 0)
        core.check_invariants()
    tier.finish_all()
    core.check_invariants()
    if len(steps) >= 40:
        assert loaded, "long runs load chunks back from the tier"


# --- prefetch deadlines, the recompute estimate, write-through, admission -----------------------


def test_pending_chunks_count_as_misses_after_their_deadline():
    core = tiered_core(prefetch=PrefetchSettings(deadline_base_s=0.5, deadline_per_token_s=1e-3))
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 30, 4)
    fill(core, tier, ns, keys)
    core.reserve(B, ns.id, 0, b"".join(chain(ns.digest, 31, 13)), 0, 0.0)  # evicts 1 of them
    tier.take()
    tier.finish_all()  # written down, gone from the arena
    assert core.lookup(B, ns.id, b"".join(keys), 0, 0.0)[0] == 3
    # 0.5 s + 1 ms x 256 tokens: due at 0.756 s.
    hits, lease, _, pending = core.lookup_and_prefetch(A, ns.id, b"".join(keys), 1000, 0.0)
    assert (hits, pending) == (3, 1) and [e for e in tier.take() if isinstance(e, Prefetch)]
    assert core.lookup_and_prefetch(A, ns.id, b"".join(keys), 1000, 0.7)[::3] == (3, 1)
    assert core.lookup_and_prefetch(A, ns.id, b"".join(keys), 1000, 0.8)[::3] == (3, 0)
    books = core.places.lower.books[TIER]
    assert books.counters.prefetch_timeouts == 1
    assert core.lookup_and_prefetch(A, ns.id, b"".join(keys), 1000, 0.9)[::3] == (3, 0)
    assert books.counters.prefetch_timeouts == 1  # counted once
    core.check_invariants()
    tier.finish_all()  # it lands late: a hit for whoever asks next
    assert core.lookup(A, ns.id, b"".join(keys), 0, 1.0)[0] == 4
    assert books.counters.prefetch_landed == 1 and books.counters.prefetch_started == 1
    core.drop_session(A, 1.0)
    core.check_invariants()


def test_a_load_slower_than_recomputing_is_not_started():
    # 64 KiB per 256 tokens: at 1 MB/s a load takes 66 ms, recomputing at 10k tokens/s 26 ms.
    spec_speed = 1e6
    core = tiered_core(prefetch=PrefetchSettings(recompute_tokens_per_s=10_000.0))
    books = core.places.lower.books[TIER]
    books.read_bytes_per_s = spec_speed
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 40, 4)
    fill(core, tier, ns, keys)
    core.reserve(B, ns.id, 0, b"".join(chain(ns.digest, 41, 13)), 0, 0.0)
    tier.take()
    tier.finish_all()
    hits, lease, _, pending = core.lookup_and_prefetch(A, ns.id, b"".join(keys), 1000, 0.0)
    assert (hits, pending) == (3, 0) and not [e for e in tier.take() if isinstance(e, Prefetch)]
    assert books.counters.prefetch_skipped == 1
    books.read_bytes_per_s = 1e9  # a faster disk (measured on its reads): loads go
    assert core.lookup_and_prefetch(A, ns.id, b"".join(keys), 1000, 0.0)[::3] == (3, 1)
    core.drop_session(A, 0.0)
    core.check_invariants()


def test_write_through_writes_every_committed_chunk_and_eviction_then_costs_nothing():
    core = tiered_core(write_through=True, queue_depth=4)
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 50, 6)
    fill(core, tier, ns, keys, per_call=3)
    books = core.places.lower.books[TIER]
    # The queue takes 4 at once; the other 2 are dropped (counted) and wait for eviction.
    assert len(tier.jobs) == 4 and books.counters.dropped_writes == 2
    assert core.lookup(A, ns.id, b"".join(keys), 0, 0.0)[0] == 6  # readable while copied
    core.check_invariants()
    tier.finish_all()
    assert all(core.index.entries[k].arena[0].state is State.READY for k in keys)  # kept
    assert len(tier.store) == 4
    fill(core, tier, ns, chain(ns.digest, 51, 10))  # the arena is full now: one more store
    rid, status, _ = core.reserve(B, ns.id, 0, chain(ns.digest, 52, 1)[0], 0, 0.0)
    assert status == [SlotStatus.RESERVED]  # something with a copy left at once
    core.check_invariants()


def test_admission_writes_only_chunks_hit_often_enough():
    core = tiered_core(admit_hits=2)
    tier = FakeTier(core)
    ns = core.register("m", small_geometry(), 1, "")
    hot, cold = chain(ns.digest, 60, 8), chain(ns.digest, 61, 8)
    fill(core, tier, ns, hot)
    fill(core, tier, ns, cold)
    for _ in range(2):
        assert core.lookup(A, ns.id, b"".join(hot), 0, 0.0)[0] == 8
    in_arena = lambda: [k for k in hot + cold if k in core.index.entries and core.index.entries[k].in_arena]  # noqa: E731
    for i in range(40):  # new one-chunk prompts until both left the arena
        if not in_arena():
            break
        store_head(core, tier, ns, chain(ns.digest, 100 + i, 1)[0])
        tier.finish_all()  # write-backs end: what waited for them leaves the arena
    assert not in_arena()
    books = core.places.lower.books[TIER]
    below = {e.key for e in core.index.entries.values() if e.lower}
    assert set(hot) <= below and not below & set(cold)
    assert books.counters.not_admitted >= 8
    core.check_invariants()
