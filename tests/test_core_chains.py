"""Eviction keeps what stays reachable: chains stored over many calls (chunked prefill), looked
up from the middle (vLLM's own prefix cache covers the head), leased, half-written, aborted.

A lookup walks a chain from its head, so a chunk is worth keeping only while every chunk before
it stays. The core must never evict a chunk while a chunk after it stays, whatever the calls
that stored or touched them."""

from __future__ import annotations

import random
import sys

import pytest
from conftest import small_geometry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core import A, B, make_core

from kvdepot.keys import chunk_keys
from kvdepot.protocol import SlotStatus
from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.cache import CacheCore, CacheError
from kvdepot.server.policies import POLICY_CLASSES

C = 256  # tokens per chunk in make_core
_policy = "lru"  # the eviction policy of this module's cores: every test runs with each


@pytest.fixture(autouse=True, params=sorted(POLICY_CLASSES))
def eviction_policy(request, monkeypatch):
    """Every property here holds whichever policy orders the evictable chunks."""
    monkeypatch.setattr(sys.modules[__name__], "_policy", request.param)
    return request.param


def chain(ns_digest: bytes, seed: int, n: int, shared: list[int] | None = None) -> list[bytes]:
    """Keys of an n-chunk prompt; ``shared`` tokens first (a branch of another prompt)."""
    rng = random.Random(seed)
    head = list(shared or [])
    return chunk_keys(ns_digest, head + [rng.randrange(50000) for _ in range(n * C - len(head))], C)


def store_in_calls(core: CacheCore, ns_id: int, keys: list[bytes], per_call: int, rank: int = 0,
                   session: bytes = A, now: float = 0.0) -> list[int]:
    """Store a chain the way chunked prefill does: a few chunks per call, each naming its
    parent. Returns every key's status."""
    statuses: list[int] = []
    for start in range(0, len(keys), per_call):
        parent = keys[start - 1] if start else b""
        blob = b"".join(keys[start : start + per_call])
        rid, status, _ = core.reserve(session, ns_id, rank, blob, 0, now, parent=parent)
        if rid:
            core.commit(session, rid, now)
        statuses += status
    return statuses


def hits(core: CacheCore, ns_id: int, keys: list[bytes]) -> int:
    return core.lookup(B, ns_id, b"".join(keys), 0, 0.0)[0]


def resident(core: CacheCore, keys: list[bytes]) -> list[bool]:
    return [k in core.index.entries for k in keys]


def sixteen_slot_core(**kw) -> CacheCore:
    kw.setdefault("policy_factory", POLICY_CLASSES[_policy])
    return make_core(arena_mib=1, slab_mib=1, **kw)  # 64 KiB slots: 16 of them


def test_a_chain_stored_two_chunks_per_call_keeps_its_head():
    """The issue's case: the buffer holds 16 chunks, a 32-chunk prompt is stored 2 chunks per
    call. Before, eviction took each call's head first and a replay hit 0 chunks."""
    core = sixteen_slot_core()
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 1, 32)
    status = store_in_calls(core, ns.id, keys, per_call=2)
    assert status[:16] == [SlotStatus.RESERVED] * 16
    # Full of its own prefix: the next call cannot evict its parent's ancestors; every later
    # call's parent is then missing, so nothing unreachable is stored either.
    assert status[16:18] == [SlotStatus.NO_SPACE] * 2
    assert status[18:] == [SlotStatus.NO_PARENT] * 14
    assert hits(core, ns.id, keys) == 16
    core.check_invariants()


def test_the_old_way_without_parents_still_works_but_loses_the_head():
    """An engine that predates ``parent`` stores every call as a head: the behaviour the issue
    saw (documented here so the contrast stays visible)."""
    core = sixteen_slot_core()
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 2, 32)
    for start in range(0, 32, 2):
        rid, _, _ = core.reserve(A, ns.id, 0, b"".join(keys[start : start + 2]), 0, 0.0)
        core.commit(A, rid, 0.0)
    assert hits(core, ns.id, keys) == 0
    core.check_invariants()


def test_a_mid_chain_lookup_never_costs_the_chain_its_head():
    core = sixteen_slot_core()
    ns = core.register("m", small_geometry(), 1, "")
    old, other = chain(ns.digest, 3, 8), chain(ns.digest, 4, 8)
    store_in_calls(core, ns.id, old, per_call=2)
    store_in_calls(core, ns.id, other, per_call=2)
    # vLLM's prefix cache holds old[:4]: the engine asks from chunk 4 on, so only the tail is
    # touched, and becomes more recent than `other` (whose head is the oldest chunk now).
    assert core.lookup(B, ns.id, b"".join(old[4:]), 0, 0.0)[0] == 4
    fresh = chain(ns.digest, 5, 6)
    assert store_in_calls(core, ns.id, fresh, per_call=3) == [SlotStatus.RESERVED] * 6
    # The 6 victims: `other` from its tail, then nothing of `old` (its head is as recent as
    # its touched tail).
    assert resident(core, old) == [True] * 8
    assert resident(core, other) == [True] * 2 + [False] * 6
    assert [hits(core, ns.id, k) for k in (old, other, fresh)] == [8, 2, 6]
    core.check_invariants()


def test_whole_chains_go_least_recently_used_first():
    core = sixteen_slot_core()
    ns = core.register("m", small_geometry(), 1, "")
    first, second = chain(ns.digest, 6, 8), chain(ns.digest, 7, 8)
    store_in_calls(core, ns.id, first, per_call=2)
    store_in_calls(core, ns.id, second, per_call=2)
    store_in_calls(core, ns.id, chain(ns.digest, 8, 8), per_call=8)
    assert resident(core, first) == [False] * 8 and hits(core, ns.id, second) == 8
    core.check_invariants()


def test_a_head_hit_while_parked_keeps_its_own_recency():
    """A chain's head waits (parked) for its tail to go; a lookup that hits only the head (a
    prompt that shares it) makes it recent: when the old tail goes, the head stays."""
    core = sixteen_slot_core()
    ns = core.register("m", small_geometry(), 1, "")
    shared, older = chain(ns.digest, 20, 8), chain(ns.digest, 21, 4)
    store_in_calls(core, ns.id, shared, per_call=2)
    store_in_calls(core, ns.id, older, per_call=2)
    store_in_calls(core, ns.id, chain(ns.digest, 22, 6), per_call=6)  # evicts shared[6:]
    assert resident(core, shared) == [True] * 6 + [False] * 2
    assert core.lookup(B, ns.id, b"".join(shared[:3]), 0, 0.0)[0] == 3
    store_in_calls(core, ns.id, chain(ns.digest, 23, 5), per_call=5)
    # The victims: shared[3:6] (the oldest tail), then `older` from its tail; never the head
    # that was just hit.
    assert resident(core, shared) == [True] * 3 + [False] * 5
    assert resident(core, older) == [True] * 2 + [False] * 2
    core.check_invariants()


def test_a_leased_or_half_written_tail_keeps_its_head():
    core = sixteen_slot_core()
    ns = core.register("m", small_geometry(), 1, "")
    leased, writing = chain(ns.digest, 9, 6), chain(ns.digest, 10, 6)
    store_in_calls(core, ns.id, leased, per_call=3)
    lease, _ = core.acquire(B, ns.id, 0, b"".join(leased[3:]), 60_000, 0.0)  # mid-chain
    store_in_calls(core, ns.id, writing[:3], per_call=3)
    open_rid, status, _ = core.reserve(A, ns.id, 0, b"".join(writing[3:]), 0, 0.0, parent=writing[2])
    assert status == [SlotStatus.RESERVED] * 3
    # 12 slots are held by two chains whose tails may not go; a 6-chunk store finds 4 free
    # slots and nothing it may evict.
    status = store_in_calls(core, ns.id, chain(ns.digest, 11, 6), per_call=6)
    assert status == [SlotStatus.RESERVED] * 4 + [SlotStatus.NO_SPACE] * 2
    assert resident(core, leased) == [True] * 6 and resident(core, writing) == [True] * 6
    core.release(B, [lease], 0.0)
    core.commit(A, open_rid, 0.0)
    assert hits(core, ns.id, leased) == 6 and hits(core, ns.id, writing) == 6
    core.check_invariants()


def test_no_parent_changes_nothing_and_a_known_parent_links_an_older_head():
    core = sixteen_slot_core()
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 12, 4)
    before = (dict(core.index.entries), core.allocator.used_bytes)
    assert core.reserve(A, ns.id, 0, b"".join(keys[2:]), 0, 0.0, parent=keys[1]) == (
        0, [SlotStatus.NO_PARENT] * 2, [-1, -1],
    )
    assert (dict(core.index.entries), core.allocator.used_bytes) == before
    # Stored as two heads (an older client), then once more through the whole chain: the
    # second half is linked after the first.
    for heads in (keys[:2], keys[2:]):
        rid, _, _ = core.reserve(A, ns.id, 0, b"".join(heads), 0, 0.0)
        core.commit(A, rid, 0.0)
    assert core.index.entries[keys[2]].parent is None
    assert store_in_calls(core, ns.id, keys, per_call=4) == [SlotStatus.PRESENT] * 4
    assert core.index.entries[keys[2]].parent is core.index.entries[keys[1]]
    core.check_invariants()


def test_an_aborted_parent_leaves_its_children_unlinked_not_broken():
    core = sixteen_slot_core(reservation_ttl_s=5)
    ns = core.register("m", small_geometry(), 1, "")
    keys = chain(ns.digest, 13, 4)
    head, _, _ = core.reserve(A, ns.id, 0, b"".join(keys[:2]), 0, 0.0)  # still being written
    tail, status, _ = core.reserve(A, ns.id, 0, b"".join(keys[2:]), 0, 0.0, parent=keys[1])
    assert status == [SlotStatus.RESERVED] * 2  # a pending parent is in the cache
    core.abort(A, head)  # e.g. preempted: its blocks may be reused
    core.commit(A, tail, 0.0)
    core.check_invariants()
    assert hits(core, ns.id, keys) == 0
    # The engine re-plans from the start: the chain is whole and linked again.
    status = store_in_calls(core, ns.id, keys, per_call=2)
    assert status == [SlotStatus.RESERVED] * 2 + [SlotStatus.PRESENT] * 2
    assert hits(core, ns.id, keys) == 4
    core.check_invariants()


# --- property: every eviction keeps each chain a prefix ----------------------------------------

OPS = st.lists(
    st.tuples(
        st.integers(0, 11),  # what
        st.integers(0, 5),  # which chain
        st.integers(0, 11),  # first chunk
        st.integers(1, 6),  # chunks
        st.integers(0, 1 << 16),  # any other choice
    ),
    min_size=20,
    max_size=150,
)


LINKED = (SlotStatus.RESERVED, SlotStatus.PRESENT, SlotStatus.BUSY)  # a store links these


class ChainModel:
    """The true chains (a key's parent is the chunk before it, whoever stores it), and the
    chunks allowed to outlive their parent: those whose parent's store was dropped while they
    stayed (abort, expiry, a crashed engine), until a store links them again."""

    def __init__(self, core: CacheCore):
        self.core = core
        spaces = [
            core.register("a", small_geometry(), 1, ""),
            core.register("b", small_geometry(layers=3), 2, ""),  # another size class, TP 2
        ]
        self.chains: list[tuple[object, list[bytes]]] = []
        for i, ns in enumerate(spaces):
            rng = random.Random(i)
            base = [rng.randrange(50000) for _ in range(12 * C)]
            self.chains += [
                (ns, chain(ns.digest, 100 + i, 12, shared=base)),
                (ns, chain(ns.digest, 200 + i, 10, shared=base[: 4 * C])),  # a branch after 4
                (ns, chain(ns.digest, 300 + i, 8)),
            ]
        self.parent: dict[bytes, bytes] = {}
        for _, keys in self.chains:
            for i, key in enumerate(keys):
                self.parent[key] = keys[i - 1] if i else b""
        self.orphans_ok: set[bytes] = set()

    def check(self, before: dict[bytes, int], stored: list[bytes]) -> None:
        entries = self.core.index.entries
        dropped = {k for k, committed in before.items() if k not in entries and not committed}
        self.orphans_ok |= {k for k in entries if self.parent[k] in dropped}
        self.orphans_ok -= set(stored)  # linked again by a store through them
        self.orphans_ok &= entries.keys()
        for key in entries:
            parent = self.parent[key]
            assert not parent or parent in entries or key in self.orphans_ok, (
                "a chunk outlived its parent", key.hex(), parent.hex(), key in before,
            )
        self.core.check_invariants()


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(OPS)
def test_chains_stored_over_many_calls_stay_prefixes(ops):
    # Room for 16 chunks of the first namespace: every few stores evict, across size classes.
    core = CacheCore(SlabAllocator(1 << 20, 256 << 10), C, lease_ttl_s=3, reservation_ttl_s=3,
                     policy_factory=POLICY_CLASSES[_policy])
    model = ChainModel(core)
    sessions = [b"s1", b"s2"]
    open_res: list[tuple[bytes, int, list[bytes]]] = []
    leases: list[tuple[bytes, int]] = []
    now = 0.0
    for what, which, first, n, choice in ops:
        ns, keys = model.chains[which]
        first = min(first, len(keys) - 1)
        part = keys[first : first + n]
        sess = sessions[choice % 2]
        rank = choice % ns.world_size  # type: ignore[attr-defined]
        before = {k: e.committed_ranks for k, e in core.index.entries.items()}
        stored: list[bytes] = []
        now += 0.1
        if what <= 3:  # a store of the next chunks of a prompt, committed now or later
            parent = keys[first - 1] if first else b""
            rid, status, _ = core.reserve(sess, ns.id, rank, b"".join(part), 0, now, parent=parent)
            stored = [k for k, s in zip(part, status) if s in LINKED]
            if rid and choice % 3:
                core.commit(sess, rid, now)
            elif rid:
                open_res.append((sess, rid, part))
        elif what <= 5 and open_res:
            s, rid, _ = open_res.pop(choice % len(open_res))
            try:
                if what == 4:
                    core.commit(s, rid, now)
                else:
                    core.abort(s, rid)
            except CacheError:
                pass  # expired meanwhile
        elif what <= 7:  # a lookup from the middle: vLLM's prefix cache has the chunks before
            _, lease, _ = core.lookup(sess, ns.id, b"".join(keys[first:]), 1000 if choice % 2 else 0, now)
            if lease:
                leases.append((sess, lease))
        elif what == 8:
            lease, _ = core.acquire(sess, ns.id, rank, b"".join(keys[first:]), 1000, now)
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
        model.check(before, stored)
    # Whatever happened, with nobody holding anything the cache still empties from the tails.
    for s in sessions:
        core.drop_session(s, now)
    core.clear()
    assert not core.index.entries and core.allocator.used_bytes == 0
