"""Fuzz target ``core``: CacheCore with lower tiers, driven by operations read from the
fuzzer's bytes, every invariant checked after every operation.

The input's first bytes choose the setup (core_world.py: the policy, a small arena, a
disk-like tier and a shared tier spec, chunk files a restarted disk found). The rest is
operations by two engine sessions (and a stranger): register (valid
and invalid namespaces, three geometries, TP 1 and 2), lookup (leased or not), reserve
(chains, branches, duplicate keys, keys of another namespace, wrong parents, bad blobs),
commit, abort, acquire, release, expire, drop a session, clear, time passing, and the
effects' completions in any order: success, failure, probes answering any count, and
completions of jobs that are unknown, already applied or of the wrong kind.

Checked after every operation:
- ``check_invariants()`` (the core's own consistency check);
- bytes: the harness keeps what each arena slot and each tier place holds (an engine writes
  ``key + rank`` into every slot it reserved; a copy moves the value; a failed load leaves
  junk). Every hit a lookup or an acquire hands out holds its chunk's value, and keeps it
  while the lease lasts; a write-down copies a committed value; a load reads a place the
  tier holds; a delete names one;
- replies are well-formed (one status and offset per key, no holes after NO_SPACE...);
- a CacheError, and a completion the core does not know, changes nothing (a deep snapshot of
  the core before and after);
- nothing else is ever raised.
"""

from __future__ import annotations

from fuzz_common import Reader, diff, fuzz, instrumented, snapshot

with instrumented(__name__):
    from core_world import (
        A, B, LEASES_MS, MAX_OPS, NAMESPACES, POOL, STEPS_S, STRANGER, VALID, World,
        parent_index, path, pool_key, value,
    )

    from kvdepot.keys import namespace_digest
    from kvdepot.protocol import SlotStatus
    from kvdepot.server.cache import CacheError


def keys_of(w: World, r: Reader, spec: int) -> tuple[bytes, list[bytes], bytes]:
    """(blob, keys, natural parent) of a request: a path along the spec's chains, sometimes
    with a key repeated, a key of another namespace, or a blob that is not whole keys."""
    start = r.below(POOL)
    indices = path(start, 1 + r.below(6))
    keys = [pool_key(spec, j) for j in indices]
    twist = r.below(8)
    if twist == 1:
        keys.append(keys[0])
    elif twist == 2:
        keys.insert(r.below(len(keys) + 1), pool_key((spec + 1) % VALID, r.below(POOL)))
    elif twist == 3:
        keys = []
    up = parent_index(start)
    blob = b"".join(keys)
    if twist == 4:
        blob += b"\x01"
    return blob, keys, b"" if up is None else pool_key(spec, up)


def namespace(w: World, r: Reader) -> tuple[int, int]:
    """(namespace id, spec) to name: a registered one mostly, else an unknown id."""
    if w.namespaces and r.below(8):
        spec = r.pick(sorted(w.namespaces))
        return w.namespaces[spec].id, spec
    return r.pick((0, 9, -1, 1 << 40)), 0


def op_register(w: World, r: Reader) -> None:
    spec = r.below(len(NAMESPACES))
    model, geo, world, salt = NAMESPACES[spec]
    info = w.core.register(model, geo, world, salt)
    assert spec < VALID, f"registered {NAMESPACES[spec]}"
    assert info.digest == namespace_digest(model, geo, world, salt)
    if spec in w.namespaces:
        assert info is w.namespaces[spec], "a second Register gave another namespace"
    w.namespaces[spec] = info


def op_lookup(w: World, r: Reader) -> None:
    ns_id, spec = namespace(w, r)
    blob, keys, _ = keys_of(w, r, spec)
    session = r.pick((A, B))
    lease_ms = r.pick(LEASES_MS)
    hits, lease, offsets, pending = w.core.lookup_and_prefetch(session, ns_id, blob, lease_ms, w.now)
    assert 0 <= hits <= len(keys) and 0 <= pending, (hits, pending, keys)
    assert hits + pending <= len(keys), f"{hits} hits and {pending} pending of {len(keys)} keys"
    world = w.core.index.namespaces[ns_id].world_size
    if lease_ms and hits:
        assert lease and len(offsets) == hits * world, (lease, offsets)
        w.check_reads(lease, offsets, [value(keys[i], rank) for rank in range(world) for i in range(hits)])
    else:
        assert offsets == [], offsets
        assert not lease or (lease_ms and pending), (lease, lease_ms, pending)
        if lease:  # it holds the pending chunks only
            w.check_reads(lease, [], [])


def op_reserve(w: World, r: Reader) -> None:
    ns_id, spec = namespace(w, r)
    blob, keys, natural = keys_of(w, r, spec)
    parent = r.pick((natural, natural, natural, b"", pool_key(spec, r.below(POOL)), b"short"))
    session = r.pick((A, B))
    rank = r.pick((0, 0, 1, 2))
    rid, status, offsets = w.core.reserve(session, ns_id, rank, blob, r.pick(LEASES_MS), w.now, parent=parent)
    assert len(status) == len(keys) == len(offsets), (status, offsets, keys)
    reserved = [off for s, off in zip(status, offsets) if s == SlotStatus.RESERVED]
    assert (rid != 0) == bool(reserved), (rid, status)
    assert all(off >= 0 for off in reserved) and len(set(reserved)) == len(reserved), offsets
    assert all(off == -1 for s, off in zip(status, offsets) if s != SlotStatus.RESERVED)
    if SlotStatus.NO_SPACE in status:
        first = status.index(SlotStatus.NO_SPACE)
        assert all(s == SlotStatus.NO_SPACE for s in status[first:]), f"a hole after NO_SPACE: {status}"
    if SlotStatus.NO_PARENT in status:
        assert all(s == SlotStatus.NO_PARENT for s in status) and not rid, status
    for s, off, key in zip(status, offsets, keys):
        if s == SlotStatus.RESERVED:
            w.arena[off] = value(key, rank)  # the engine writes its slots before Commit
    if rid:
        w.reservations.append((rid, session))


def _reservation(w: World, r: Reader) -> tuple[bytes, int]:
    if w.reservations and r.below(6):
        rid, session = w.reservations[r.below(len(w.reservations))]
        return (session if r.below(4) else r.pick((A, B, STRANGER))), rid
    return r.pick((A, B)), r.pick((0, 7, 1 << 62))


def op_commit(w: World, r: Reader) -> None:
    session, rid = _reservation(w, r)
    items = len(w.core.reservations.items[rid].items) if rid in w.core.reservations.items else None
    assert w.core.commit(session, rid, w.now) == items


def op_abort(w: World, r: Reader) -> None:
    session, rid = _reservation(w, r)
    w.core.abort(session, rid)


def op_acquire(w: World, r: Reader) -> None:
    ns_id, spec = namespace(w, r)
    blob, keys, _ = keys_of(w, r, spec)
    rank = r.pick((0, 0, 1, 2))
    lease, offsets = w.core.acquire(r.pick((A, B)), ns_id, rank, blob, r.pick(LEASES_MS), w.now)
    assert len(offsets) <= len(keys) and (lease != 0) == bool(offsets), (lease, offsets)
    w.check_reads(lease, offsets, [value(k, rank) for k in keys[: len(offsets)]])


def op_release(w: World, r: Reader) -> None:
    session = r.pick((A, B, A, B, STRANGER))
    known = sorted(w.leases)
    chosen = [lease for i, lease in enumerate(known) if r.byte() & 1] if known else []
    if r.below(6) == 0:
        chosen.append(r.pick((0, 999, chosen[0] if chosen else 1)))
    retrieved = [lease for lease in chosen if r.flag()]
    if r.below(8) == 0:
        retrieved.append(12345)
    w.core.release(session, chosen, w.now, retrieved)


def op_expire(w: World, r: Reader) -> None:
    w.now += r.pick(STEPS_S)
    w.core.expire(w.now)


def op_drop_session(w: World, r: Reader) -> None:
    w.core.drop_session(r.pick((A, B, STRANGER)), w.now)


def op_clear(w: World, r: Reader) -> None:
    w.core.clear()


def op_time(w: World, r: Reader) -> None:
    w.now += r.pick(STEPS_S)


OPS = (
    op_register, op_lookup, op_lookup, op_reserve, op_reserve, op_commit, op_abort, op_acquire,
    op_release, World.complete, World.complete, World.complete_unknown, op_expire,
    op_drop_session, op_clear, op_time,
)


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    w = World(r)
    w.check()
    for _ in range(MAX_OPS):
        if not r.left:
            break
        op = OPS[r.byte() % len(OPS)]
        before = snapshot(w.core)
        try:
            op(w, r)
        except CacheError:
            after = snapshot(w.core)
            assert before == after, f"{op.__name__} refused, and changed {diff(before, after)}"
        w.settle()
        w.check()


if __name__ == "__main__":
    fuzz(TestOneInput)
