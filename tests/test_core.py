"""The pure core, tested directly: allocator, eviction policy, index semantics."""

from __future__ import annotations

import random

import pytest
from conftest import small_geometry

from kvdepot.keys import chunk_keys
from kvdepot.protocol import ErrorCode, KEY_BYTES, SlotStatus
from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.cache import CacheCore, CacheError, CacheObserver
from kvdepot.server.policies import POLICY_CLASSES, LRUPolicy

MIB = 1 << 20
A, B = b"engine-a", b"engine-b"


# --- allocator ----------------------------------------------------------------------------------


def test_allocator_packs_size_classes_and_returns_empty_slabs():
    alloc = SlabAllocator(8 * MIB, 2 * MIB)
    small = [alloc.allocate(512 * 1024) for _ in range(4)]  # one slab
    assert None not in small and len({o // (2 * MIB) for o in small}) == 1
    big = alloc.allocate(1536 * 1024)  # another size class takes another slab
    assert big is not None and big // (2 * MIB) != small[0] // (2 * MIB)
    assert alloc.free_slab_count() == 2
    for o in small:
        alloc.free(o)
    assert alloc.free_slab_count() == 3  # the emptied slab went back to the pool
    assert alloc.used_bytes == 1536 * 1024


def test_allocator_spans_and_exhaustion():
    alloc = SlabAllocator(8 * MIB, 2 * MIB)
    span = alloc.allocate(5 * MIB)  # three adjacent slabs
    assert span == 0 and alloc.free_slab_count() == 1
    assert alloc.allocate(5 * MIB) is None
    one = alloc.allocate(2 * MIB)
    assert one == 6 * MIB
    assert alloc.allocate(4096) is None
    alloc.free(span)
    assert alloc.free_slab_count() == 3
    with pytest.raises(ValueError):
        alloc.free(span)  # double free is refused
    with pytest.raises(ValueError):
        alloc.free(123)


def test_allocator_random_never_overlaps():
    rng = random.Random(7)
    alloc = SlabAllocator(64 * MIB, 4 * MIB)
    live: dict[int, int] = {}
    for _ in range(5000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            alloc.free(off)
            del live[off]
        else:
            size = rng.choice([4096, 300_000, 1 * MIB, 3 * MIB, 9 * MIB])
            off = alloc.allocate(size)
            if off is not None:
                live[off] = alloc.size_class(size)
        spans = sorted(live.items())
        for (o1, s1), (o2, _) in zip(spans, spans[1:]):
            assert o1 + s1 <= o2
        assert all(o + s <= alloc.capacity for o, s in spans)
        assert alloc.used_bytes == sum(live.values())


# --- eviction policy ----------------------------------------------------------------------------


def test_lru_policy_order():
    lru = LRUPolicy()
    for k in "abc":
        lru.insert(k)
    lru.insert("a")  # touched
    assert lru.evict(1) == ["b"]
    assert len(lru) == 2 and lru.evict(1) == ["c"]
    lru.remove("zz")  # absent: ignored


def test_lru_touch_skips_untracked_keys_and_keeps_order():
    lru = LRUPolicy()
    for k in "abcdef":
        lru.insert(k)
    lru.remove("c")  # leased, say: not evictable, not tracked
    lru.touch(iter("xacfbz"))  # untracked keys first, in the middle and last
    order = []
    while victims := lru.evict(1):
        order += victims
    assert order == ["d", "e", "a", "f", "b"]


# --- core ---------------------------------------------------------------------------------------


def make_core(arena_mib: int = 8, slab_mib: int = 1, **kw) -> CacheCore:
    return CacheCore(SlabAllocator(arena_mib * MIB, slab_mib * MIB), 256, **kw)


def store(core: CacheCore, session: bytes, ns_id: int, rank: int, keys: list[bytes], now=0.0):
    rid, status, offsets = core.reserve(session, ns_id, rank, b"".join(keys), 0, now)
    if rid:
        core.commit(session, rid, now)
    return status


def keys_for(core: CacheCore, digest: bytes, seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    return chunk_keys(digest, [rng.randrange(50000) for _ in range(n * 256)], 256)


def test_keys_are_stable_and_namespaced():
    g = small_geometry()
    core = make_core()
    ns = core.register("m", g, 1, "")
    again = core.register("m", g, 1, "")
    salted = core.register("m", g, 1, "tenant")
    other = core.register("m2", g, 1, "")
    assert again.id == ns.id and len({ns.digest, salted.digest, other.digest}) == 3
    toks = list(range(600))
    k1 = chunk_keys(ns.digest, toks, 256)
    assert len(k1) == 2 and k1 == chunk_keys(ns.digest, toks, 256)
    assert chunk_keys(ns.digest, [9] + toks[1:], 256)[1] != k1[1]  # the chain carries the prefix
    # A fixed vector: the same on every machine and process, whatever PYTHONHASHSEED is.
    assert chunk_keys(b"\0" * 16, list(range(4)), 4)[0].hex() == chunk_keys(
        b"\0" * 16, range(4), 4
    )[0].hex()


def test_two_phase_store_hides_uncommitted_and_tp_needs_all_ranks():
    core = make_core()
    ns = core.register("m", small_geometry(), 2, "")
    keys = keys_for(core, ns.digest, 1, 3)
    blob = b"".join(keys)
    rid, status, offsets = core.reserve(A, ns.id, 0, blob, 0, 0.0)
    assert status == [SlotStatus.RESERVED] * 3
    assert core.lookup(B, ns.id, blob, 0, 0.0) == (0, 0, [])
    assert core.acquire(B, ns.id, 0, blob, 0, 0.0) == (0, [])  # pending is unreadable
    core.commit(A, rid, 0.0)
    assert core.lookup(B, ns.id, blob, 0, 0.0)[0] == 0  # rank 1 missing
    assert core.acquire(B, ns.id, 0, blob, 0, 0.0)[1] == offsets
    store(core, B, ns.id, 1, keys[:2])
    assert core.lookup(B, ns.id, blob, 0, 0.0)[0] == 2
    assert store(core, A, ns.id, 0, keys) == [SlotStatus.PRESENT] * 3  # cheap no-op
    core.check_invariants()


def test_abort_and_expiry_free_memory():
    core = make_core(reservation_ttl_s=5, lease_ttl_s=5)
    ns = core.register("m", small_geometry(), 1, "")
    keys = keys_for(core, ns.digest, 2, 4)
    rid, *_ = core.reserve(A, ns.id, 0, b"".join(keys), 0, 0.0)
    core.abort(A, rid)
    assert core.allocator.used_bytes == 0 and len(core.index) == 0
    core.reserve(A, ns.id, 0, b"".join(keys), 0, 0.0)
    store(core, B, ns.id, 0, keys_for(core, ns.digest, 3, 2))
    lease, _ = core.acquire(B, ns.id, 0, b"".join(keys_for(core, ns.digest, 3, 2)), 0, 0.0)
    assert core.expire(4.9) == (0, 0)
    assert core.expire(5.0) == (1, 1)
    assert len(core.index) == 2 and not core.leases and not core.reservations
    with pytest.raises(CacheError) as err:
        core.release(B, [lease], 6.0)
    assert err.value.code == ErrorCode.UNKNOWN_LEASE
    core.check_invariants()


def test_a_lease_named_twice_is_released_once():
    core = make_core()
    ns = core.register("m", small_geometry(), 1, "")
    keys = keys_for(core, ns.digest, 6, 2)
    store(core, A, ns.id, 0, keys)
    first, _ = core.acquire(B, ns.id, 0, b"".join(keys), 0, 0.0)
    second, _ = core.acquire(B, ns.id, 0, b"".join(keys), 0, 0.0)
    core.release(B, [first, first], 0.0)
    assert [e.leases for e in core.index.entries.values()] == [1, 1]  # the other lease holds
    core.release(B, [second], 0.0)
    core.check_invariants()


class RecordingObserver(CacheObserver):
    def __init__(self) -> None:
        self.retrieves: list[tuple[float, int, int, int]] = []

    def on_retrieve(self, seconds: float, chunks: int, tokens: int, nbytes: int) -> None:
        self.retrieves.append((seconds, chunks, tokens, nbytes))


def test_leased_lookup_hands_out_every_ranks_offsets():
    core = make_core()
    ns = core.register("m", small_geometry(), 2, "")
    keys = keys_for(core, ns.digest, 50, 4)
    blob = b"".join(keys)
    store(core, A, ns.id, 0, keys)
    store(core, A, ns.id, 1, keys[:3])  # the fourth chunk misses rank 1: not a hit
    assert core.lookup(B, ns.id, blob, 0, 0.0) == (3, 0, [])  # no lease, no offsets
    assert core.lookup(B, ns.id, keys_for(core, ns.digest, 51, 2)[0], 1000, 0.0) == (0, 0, [])
    hits, lease, offsets = core.lookup(B, ns.id, blob, 1000, 0.0)
    assert hits == 3 and lease and len(offsets) == 2 * 3
    per_rank = [core.acquire(A, ns.id, rank, blob, 0, 0.0) for rank in range(2)]
    assert offsets[:3] == per_rank[0][1][:3]  # rank-major: rank 0's three slots, then rank 1's
    assert offsets[3:] == per_rank[1][1][:3]
    assert core.leases.items[lease].nbytes == 3 * ns.slot_bytes * 2  # every rank's slots
    core.release(A, [per_rank[0][0], per_rank[1][0]], 0.0)
    core.check_invariants()


def test_release_counts_a_lookup_lease_only_when_named_retrieved():
    observer = RecordingObserver()
    core = make_core(observer=observer)
    ns = core.register("m", small_geometry(), 2, "")
    keys = keys_for(core, ns.digest, 52, 3)
    for rank in range(2):
        store(core, A, ns.id, rank, keys)
    _, unread, _ = core.lookup(B, ns.id, b"".join(keys), 1000, 1.0)
    core.release(B, [unread], 1.5)
    assert core.counters.retrieved_chunks == 0 and observer.retrieves == []
    _, read, _ = core.lookup(B, ns.id, b"".join(keys), 1000, 2.0)
    _, other, _ = core.lookup(B, ns.id, b"".join(keys[:1]), 1000, 2.0)
    core.release(B, [read, other], 2.5, retrieved=[read])
    c = core.counters
    assert (c.retrieved_chunks, c.retrieved_tokens, c.retrieved_bytes) == (3, 3 * 256, 3 * ns.slot_bytes * 2)
    assert observer.retrieves == [(0.5, 3, 3 * 256, 3 * ns.slot_bytes * 2)]
    # An Acquire lease still counts without being named, and counts once when named.
    acquired, _ = core.acquire(B, ns.id, 1, b"".join(keys), 0, 3.0)
    core.release(B, [acquired], 3.0, retrieved=[acquired])
    assert c.retrieved_chunks == 6 and c.retrieved_bytes == 3 * ns.slot_bytes * 3
    assert len(observer.retrieves) == 2 and not core.leases
    core.check_invariants()


def test_release_naming_a_stray_retrieved_lease_changes_nothing():
    observer = RecordingObserver()
    core = make_core(observer=observer)
    ns = core.register("m", small_geometry(), 1, "")
    keys = keys_for(core, ns.digest, 53, 2)
    store(core, A, ns.id, 0, keys)
    _, first, _ = core.lookup(B, ns.id, b"".join(keys), 1000, 0.0)
    _, second, _ = core.lookup(B, ns.id, b"".join(keys), 1000, 0.0)
    before = (set(core.leases.items), [e.leases for e in core.index.entries.values()])
    # A real lease that is not being released, an unknown one, a negative and a huge id.
    for stray in ([second], [first, 999], [-1], [2**63]):
        with pytest.raises(CacheError) as err:
            core.release(B, [first], 0.0, retrieved=stray)
        assert err.value.code == ErrorCode.BAD_REQUEST
    assert (set(core.leases.items), [e.leases for e in core.index.entries.values()]) == before
    assert core.counters.retrieved_chunks == 0 and observer.retrieves == []
    core.check_invariants()
    core.release(B, [first, second], 0.0, retrieved=[second])
    assert not core.leases and core.counters.retrieved_chunks == 2
    core.check_invariants()


def test_drop_session_releases_everything_it_held():
    core = make_core()
    ns = core.register("m", small_geometry(), 1, "")
    held = keys_for(core, ns.digest, 4, 2)
    store(core, A, ns.id, 0, held)
    core.lookup(B, ns.id, b"".join(held), 1000, 0.0)
    core.reserve(B, ns.id, 0, b"".join(keys_for(core, ns.digest, 5, 3)), 0, 0.0)
    assert core.drop_session(B, 0.0) == (1, 1)
    assert len(core.index) == 2 and all(e.evictable for e in core.index.entries.values())
    core.check_invariants()


def test_lru_evicts_tail_first_and_never_leased_or_pending():
    # 1 MiB slabs, 8 of them; a slot is 64 KiB (2 layers x 16 blocks x 2 KiB): 128 slots.
    core = make_core()
    ns = core.register("m", small_geometry(), 1, "")
    assert ns.slot_bytes == 64 * 1024
    old = keys_for(core, ns.digest, 10, 40)
    leased = keys_for(core, ns.digest, 11, 40)
    store(core, A, ns.id, 0, old)
    store(core, A, ns.id, 0, leased)
    core.acquire(B, ns.id, 0, b"".join(leased), 60_000, 0.0)
    new = keys_for(core, ns.digest, 12, 60)
    assert store(core, A, ns.id, 0, new) == [SlotStatus.RESERVED] * 60
    # 12 of the old prefix had to go, from its tail: its first 28 chunks still hit.
    assert core.lookup(A, ns.id, b"".join(old), 0, 0.0)[0] == 28
    assert core.lookup(A, ns.id, b"".join(leased), 0, 0.0)[0] == 40
    # With the new prefix leased too, only the old prefix's 28 chunks may go: a larger store
    # stops with NO_SPACE and leaves no holes.
    core.acquire(B, ns.id, 0, b"".join(new), 60_000, 0.0)
    more = keys_for(core, ns.digest, 13, 40)
    status = store(core, A, ns.id, 0, more)
    assert status[:28] == [SlotStatus.RESERVED] * 28
    assert status[28:] == [SlotStatus.NO_SPACE] * 12
    assert core.lookup(A, ns.id, b"".join(leased), 0, 0.0)[0] == 40
    assert core.lookup(A, ns.id, b"".join(new), 0, 0.0)[0] == 60
    assert core.lookup(A, ns.id, b"".join(old), 0, 0.0)[0] == 0
    core.check_invariants()


def test_reserve_never_evicts_its_own_prefix():
    core = make_core(arena_mib=1, slab_mib=1)  # 16 slots
    ns = core.register("m", small_geometry(), 1, "")
    keys = keys_for(core, ns.digest, 20, 20)
    store(core, A, ns.id, 0, keys[:10])
    status = store(core, A, ns.id, 0, keys)
    assert status[:10] == [SlotStatus.PRESENT] * 10
    assert status[10:16] == [SlotStatus.RESERVED] * 6
    assert status[16:] == [SlotStatus.NO_SPACE] * 4
    assert core.lookup(A, ns.id, b"".join(keys), 0, 0.0)[0] == 16
    core.check_invariants()


def test_models_of_different_sizes_share_the_arena():
    core = make_core(arena_mib=8, slab_mib=1)
    small = core.register("small", small_geometry(), 1, "")
    big = core.register("big", small_geometry(layers=8), 1, "")  # 256 KiB slots
    store(core, A, small.id, 0, keys_for(core, small.digest, 30, 128))  # fills everything
    assert core.allocator.free_slab_count() == 0
    status = store(core, A, big.id, 0, keys_for(core, big.digest, 31, 8))
    assert status == [SlotStatus.RESERVED] * 8  # whole small slabs were evicted for it
    core.check_invariants()


def test_bad_requests_change_nothing():
    core = make_core()
    ns = core.register("m", small_geometry(), 2, "")
    other = core.register("other", small_geometry(), 1, "")
    keys = keys_for(core, ns.digest, 40, 2)
    store(core, A, ns.id, 0, keys)
    before = (dict(core.index.entries), core.allocator.used_bytes)
    cases = [
        lambda: core.reserve(A, ns.id, 2, b"".join(keys), 0, 0.0),  # rank out of range
        lambda: core.reserve(A, 99, 0, b"".join(keys), 0, 0.0),  # unknown namespace
        lambda: core.lookup(A, ns.id, b"x" * (KEY_BYTES + 1), 0, 0.0),  # ragged keys
        lambda: core.acquire(A, ns.id, -1, b"".join(keys), 0, 0.0),
        lambda: core.commit(B, 12345, 0.0),
        lambda: core.release(A, [777], 0.0),
        lambda: core.release(A, [777], 0.0, retrieved=[778]),  # read a lease it does not end
        lambda: core.reserve(A, ns.id, 0, b"".join(keys), -5, 0.0),
        lambda: core.register("m", small_geometry(block=17), 1, ""),  # does not divide 256
        lambda: core.register("", small_geometry(), 1, ""),
        # A fresh key first, then one of another namespace: refused before allocating.
        lambda: core.reserve(A, other.id, 0, b"\x01" * KEY_BYTES + keys[0], 0, 0.0),
        # A parent of another namespace, or not one key.
        lambda: core.reserve(A, other.id, 0, b"\x01" * KEY_BYTES, 0, 0.0, parent=keys[0]),
        lambda: core.reserve(A, ns.id, 0, b"\x01" * KEY_BYTES, 0, 0.0, parent=keys[0][:8]),
    ]
    for case in cases:
        with pytest.raises(CacheError):
            case()
    assert (dict(core.index.entries), core.allocator.used_bytes) == before
    core.check_invariants()


@pytest.mark.parametrize("policy", sorted(POLICY_CLASSES))
def test_random_operations_keep_invariants(policy):
    rng = random.Random(1234)
    core = make_core(arena_mib=4, slab_mib=1, lease_ttl_s=3, reservation_ttl_s=3,
                     policy_factory=POLICY_CLASSES[policy])
    spaces = [core.register("a", small_geometry(), 2, ""), core.register("b", small_geometry(layers=5), 1, "")]
    prompts = [(ns, keys_for(core, ns.digest, s, 12)) for s in range(6) for ns in spaces]
    sessions = [b"s1", b"s2", b"s3"]
    open_res: list[tuple[bytes, int]] = []
    leases: list[tuple[bytes, int]] = []
    now = 0.0
    for step in range(3000):
        now += rng.random() * 0.05
        ns, keys = rng.choice(prompts)
        sess = rng.choice(sessions)
        n = rng.randrange(1, len(keys) + 1)
        op = rng.random()
        if op < 0.3:
            rid, *_ = core.reserve(sess, ns.id, rng.randrange(ns.world_size), b"".join(keys[:n]), 0, now)
            if rid:
                open_res.append((sess, rid))
        elif op < 0.5 and open_res:
            s, rid = open_res.pop(rng.randrange(len(open_res)))
            try:
                if rng.random() < 0.8:
                    core.commit(s, rid, now)
                else:
                    core.abort(s, rid)
            except CacheError as exc:
                assert exc.code == ErrorCode.UNKNOWN_RESERVATION
        elif op < 0.7:
            hits, lease, _ = core.lookup(sess, ns.id, b"".join(keys[:n]), rng.choice([0, 500]), now)
            if lease:
                leases.append((sess, lease))
        elif op < 0.8:
            lease, _ = core.acquire(sess, ns.id, rng.randrange(ns.world_size), b"".join(keys[:n]), 1000, now)
            if lease:
                leases.append((sess, lease))
        elif op < 0.9 and leases:
            s, lease = leases.pop(rng.randrange(len(leases)))
            try:
                core.release(s, [lease], now, retrieved=[lease] if rng.random() < 0.5 else [])
            except CacheError as exc:
                assert exc.code == ErrorCode.UNKNOWN_LEASE
        elif op < 0.93:
            core.drop_session(sess, now)
        else:
            core.expire(now)
        if step % 50 == 0:
            core.check_invariants()
    core.check_invariants()


def test_lru_touch_hands_untracked_keys_over_at_their_turn():
    lru = LRUPolicy()
    for k in "abc":
        lru.insert(k)
    seen = []

    def missing(key):
        seen.append(key)
        if key == "p":  # a parked key comes back where the sequence reaches it
            lru.insert(key)

    lru.touch(iter("cxpa"), missing)
    assert seen == ["x", "p"]
    order = []
    while victims := lru.evict(1):
        order += victims
    assert order == ["b", "c", "p", "a"]
