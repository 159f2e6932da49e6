"""Eviction policies on their own: the protocol's contract for every policy (insert, touch,
hold/release, remove, evict all or nothing), and what S3-FIFO does that LRU does not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdepot.server.config import parse_args
from kvdepot.server.policies import DEFAULT_POLICY, POLICY_CLASSES, S3FIFOPolicy, policy_factory

POLICIES = sorted(POLICY_CLASSES)


def drain(policy) -> list:
    out = []
    while victims := policy.evict(1):
        out += victims
    return out


@pytest.mark.parametrize("name", POLICIES)
def test_evict_is_all_or_nothing(name):
    make = POLICY_CLASSES[name]
    a, b = make(), make()
    for policy in (a, b):
        for key in range(10):
            policy.insert(key)
        policy.touch([3, 5, 5, 7])
        policy.hold(4)
    # Three keys may go (all but the held one and six protected ones): four cannot.
    assert a.evict(4, protected={0, 1, 2, 6, 8, 9}) is None
    assert len(a) == 9 and all(k in a for k in range(10) if k != 4)
    assert drain(a) == drain(b)  # the failed search left no trace
    c = make()
    for key in range(10):
        c.insert(key)
    chosen = c.evict(3, protected={0, 1})
    assert len(chosen) == 3 and not {0, 1} & set(chosen) and len(c) == 7
    assert not any(c.tracks(k) for k in chosen)


@pytest.mark.parametrize("name", POLICIES)
def test_held_keys_never_go_and_a_released_first_key_goes_next(name):
    policy = POLICY_CLASSES[name]()
    for key in "abcdef":
        policy.insert(key)
    policy.hold("a")
    policy.hold("zz")  # untracked: ignored
    assert policy.tracks("a") and "a" not in policy and not policy.tracks("zz")
    gone = policy.evict(2)
    assert gone is not None and "a" not in gone
    policy.release("d", first=True)  # evictable already: now the next to go
    assert policy.evict(1) == ["d"]
    policy.release("a", first=True)
    assert policy.evict(1) == ["a"]
    policy.remove("f")
    policy.remove("nope")
    assert not policy.tracks("f") and set(drain(policy)) == set("bce") - set(gone)


def test_s3fifo_lets_keys_read_once_go_before_keys_read_again():
    """A scan of keys read once cannot push out a key read twice, as LRU lets it."""
    s3, lru = S3FIFOPolicy(), POLICY_CLASSES["lru"]()
    for policy in (s3, lru):
        for key in range(20):
            policy.insert(("hot", key))
        policy.touch([("hot", k) for k in range(20)])
        for key in range(40):  # the scan
            policy.insert(("scan", key))
    first_20 = {k[0] for k in s3.evict(20)}
    assert first_20 == {"scan"}
    assert {k[0] for k in lru.evict(20)} == {"hot"}


def test_s3fifo_remembers_what_left_the_small_queue():
    policy = S3FIFOPolicy()
    for key in range(10):
        policy.insert(key)
    assert policy.evict(1) == [0]
    policy.insert(0)  # back soon after it went: straight to the main queue
    for key in range(10, 30):
        policy.insert(key)
    order = drain(policy)
    assert order.index(0) > order.index(29)  # newer keys of the small queue went first


def test_the_registry_and_the_flag():
    assert DEFAULT_POLICY == "lru" and parse_args([]).eviction_policy == "lru"
    assert parse_args(["--eviction-policy", "s3fifo"]).eviction_policy == "s3fifo"
    with pytest.raises(SystemExit):
        parse_args(["--eviction-policy", "arc"])
    with pytest.raises(ValueError, match="known: lru, s3fifo"):
        policy_factory("clock")


OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "touch", "hold", "release", "first", "remove", "evict"]),
              st.integers(0, 11), st.integers(1, 4), st.sets(st.integers(0, 11), max_size=6)),
    max_size=120,
)


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=200, deadline=None, database=None)
@given(ops=OPS)
def test_any_sequence_keeps_the_contract(name, ops):
    policy = POLICY_CLASSES[name]()
    evictable: set[int] = set()
    held: set[int] = set()
    for op, key, n, protected in ops:
        if op == "insert" and key not in evictable | held:
            policy.insert(key)
            evictable.add(key)
        elif op == "touch":
            passed: list[int] = []
            policy.touch([key, (key + 1) % 12], passed.append)
            assert set(passed) == {key, (key + 1) % 12} - evictable
        elif op == "hold":
            policy.hold(key)
            if key in evictable:
                evictable.remove(key)
                held.add(key)
        elif op in ("release", "first"):
            assert policy.release(key, first=op == "first") == (key in evictable | held)
            if key in held:
                held.remove(key)
                evictable.add(key)
            if op == "first" and key in evictable:
                assert policy.evict(1) == [key]
                evictable.remove(key)
        elif op == "remove":
            policy.remove(key)
            evictable.discard(key)
            held.discard(key)
        elif op == "evict":
            chosen = policy.evict(n, protected)
            if len(evictable - protected) < n:
                assert chosen is None
            else:
                assert chosen is not None and len(set(chosen)) == n
                assert set(chosen) <= evictable - protected
                evictable -= set(chosen)
        assert len(policy) == len(evictable)
        for k in range(12):
            assert (k in policy) == (k in evictable) and policy.tracks(k) == (k in evictable | held)
