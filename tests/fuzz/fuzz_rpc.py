"""Fuzz target ``rpc``: the server's request path, frame in, reply out.

A real CacheServer runs in this process: its ROUTER socket on a TCP port, a shared-memory
arena (8 slots of 64 KiB), metrics, and the tier workers with a lower tier holding real bytes
(rpc_support.MemoryTier) whose tasks run when the input says (rpc_support.StepExecutor).
Three real DEALER sockets, three engines, send what the input says: raw frames (the seeds
are valid requests of every type, encoded by the real encoder, that libFuzzer mutates),
requests built from the input's choices with the namespace, reservation and lease ids of
earlier replies (single or batched), frames of two parts; between them, time passes (the
loop's maintenance tick: expiry, session timeouts, metrics) and worker tasks run, failing
when the input says.

The seam: there is no function from a frame's bytes to its reply; CacheServer.serve_forever
receives a frame on the ROUTER socket and calls ``_on_message``, which answers on the
socket. The harness runs that loop body itself (receive, ``_on_message``; the tick is
``_on_monitor`` and ``_maintain``), so each input runs the same way every time.

Checked after every frame and tick:
- the sender gets exactly one reply, which decodes, carries the request's req_id (0 for
  an undecodable frame), is the request's reply type or an ErrorReply (a BatchReply holds
  one per op, in order), and is never INTERNAL; the server logs no error;
- an ErrorReply to a single request changed nothing in the core (deep snapshot);
- the core's invariants hold; every lease and reservation belongs to a live session; a
  tier never deletes what it does not hold;
- the bytes: an engine writes ``key + rank`` into every slot it reserved; every hit a
  lookup or acquire hands out holds its chunk's bytes, and keeps them while leased;
- /metrics never shows a key, a namespace digest or a salt.
"""

from __future__ import annotations

import atexit
import logging
import os
import time

from fuzz_common import Reader, diff, fuzz, instrumented, snapshot

with instrumented(__name__):
    import msgspec
    import zmq

    from kvdepot import protocol as p
    from kvdepot.server.allocator import SlabAllocator
    from kvdepot.server.arena import SharedArena
    from kvdepot.server.cache import CacheCore
    from kvdepot.server.main import LoggingObserver
    from kvdepot.server.metrics import ServerMetrics
    from kvdepot.server.policies import POLICY_CLASSES
    from kvdepot.server.rpc import CacheServer
    from rpc_support import SLOT, MemoryTier, StepExecutor
    from seeds import geometry, key

ARENA_BYTES = 8 * SLOT
IDENTITIES = (b"engine-a", b"engine-b", b"engine-c")
MAX_OPS = 120
REPLY_OF = {
    p.Hello: p.HelloReply, p.Register: p.RegisterReply, p.Lookup: p.LookupReply,
    p.Reserve: p.ReserveReply, p.Commit: p.CommitReply, p.Abort: p.OkReply,
    p.Acquire: p.AcquireReply, p.Release: p.OkReply, p.Heartbeat: p.OkReply,
    p.GetStats: p.StatsReply, p.Goodbye: p.OkReply, p.Batch: p.BatchReply,
}
KEYS = [key(i) for i in range(12)]
SALTS = ("", "tenant-secret-salt")
STEPS_S = (0.01, 0.5, 3.0, 11.0, 31.0)
_SKIP = frozenset({"observer"})  # metrics count refused requests too


class _Errors(logging.Handler):
    """What the server logs at ERROR: an exception that escaped a handler."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_errors = _Errors()
_log = logging.getLogger("kvdepot")
_ctx = zmq.Context()
_arena: SharedArena | None = None


class _Quiet:
    """During one input: the server's errors are collected, its info lines dropped (they
    would cost more than the requests); the logger is as it was afterwards."""

    def __enter__(self) -> None:
        self.saved = _log.level, _log.propagate
        _errors.records.clear()
        _log.addHandler(_errors)
        _log.setLevel(logging.ERROR)
        _log.propagate = False

    def __exit__(self, *exc) -> None:
        _log.removeHandler(_errors)
        _log.setLevel(self.saved[0])
        _log.propagate = self.saved[1]


def shared_arena() -> SharedArena:
    global _arena
    if _arena is None:
        _arena = SharedArena(f"kvdepot-fuzz-rpc-{os.getpid()}", ARENA_BYTES)
        # No engine maps it here: its name goes now, so a fuzzer that ends by exit() (as
        # libFuzzer does, with no Python teardown) or is killed leaves nothing in /dev/shm.
        os.unlink(_arena.path)
        atexit.register(_arena.close)
    return _arena


class Rig:
    """One server, its edges and three engines, for one input."""

    def __init__(self, r: Reader):
        self.arena = shared_arena()
        self.arena.view(0, ARENA_BYTES)[:] = bytes(ARENA_BYTES)  # nothing from the last input
        self.now = 1000.0
        metrics = ServerMetrics(lookup_totals_from_stats=True)
        tiered = r.byte() % 4 != 0
        self.tier = MemoryTier(1 + r.below(12), 1 + r.below(3), r.flag()) if tiered else None
        self.executor = StepExecutor()
        core = CacheCore(
            SlabAllocator(ARENA_BYTES, r.pick((1, 2, 4)) * SLOT), 256,
            policy_factory=POLICY_CLASSES[r.pick(sorted(POLICY_CLASSES))],
            observer=LoggingObserver(metrics), tiers=[self.tier.spec] if self.tier else [],
        )
        self.server = CacheServer(
            core, self.arena, port=0, metrics=metrics, clock=lambda: self.now,
            executor=self.executor, tiers={"memory": self.tier} if self.tier else None,
        )
        self.core = core
        self.dealers = []
        self.poller = zmq.Poller()
        self.poller.register(self.server._socket, zmq.POLLIN)
        for identity in IDENTITIES:
            dealer = _ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.ROUTING_ID, identity)
            dealer.connect(f"tcp://127.0.0.1:{self.server.port}")
            self.poller.register(dealer, zmq.POLLIN)
            self.dealers.append(dealer)
        self.namespaces: list[int] = []
        self.reservations: list[int] = []
        self.leases: dict[int, list[tuple[int, bytes]]] = {}  # lease -> (offset, bytes) it reads
        self.req_id = 0

    def close(self) -> None:
        for dealer in self.dealers:
            dealer.close(linger=0)
        self.server._close_sockets()

    # --- the loop, by hand ----------------------------------------------------------------

    def exchange(self, client: int, frames: list[bytes]) -> bytes:
        """Send ``frames`` from engine ``client`` and run the loop until its reply is back."""
        dealer = self.dealers[client]
        dealer.send_multipart(frames)
        deadline = time.monotonic() + 10.0
        while True:
            ready = dict(self.poller.poll(1000))
            if self.server._socket in ready:
                self.server._on_message(self.server._socket.recv(copy=False))
            if dealer in ready:
                return dealer.recv()
            assert time.monotonic() < deadline, f"no reply to {frames!r:.200}"

    def drain(self) -> None:
        """Let the loop take what the workers posted (completions wake it on its socket)."""
        while self.server._socket.poll(0 if self.server.completions._items.empty() else 100):
            self.server._on_message(self.server._socket.recv(copy=False))

    def tick(self, step: float) -> None:
        self.now += step
        self.server._on_monitor()
        self.server._maintain(self.now)
        metrics = self.server.metrics
        metrics.update_from_stats(self.server.snapshot())
        text = metrics.render()
        for secret in [*KEYS, *(i.digest for i in self.core.index.namespaces.values())]:
            assert secret.hex().encode() not in text, "a key in /metrics"
        assert SALTS[1].encode() not in text, "a salt in /metrics"

    def run_tasks(self, n: int, failing: bool) -> None:
        if self.tier is not None:
            self.tier.failing = failing
        self.executor.run(n)
        self.drain()

    # --- checks ---------------------------------------------------------------------------

    def check(self) -> None:
        assert not _errors.records, f"the server logged: {_errors.records[0].getMessage()}"
        self.core.check_invariants()
        sessions = self.server.sessions
        for lease in self.core.leases.items.values():
            assert lease.session in sessions, f"lease {lease.id} of a gone session"
        for reservation in self.core.reservations.items.values():
            assert reservation.session in sessions, f"reservation {reservation.id} of a gone session"
        if self.tier is not None:
            assert not self.tier.stray_deletes, f"deleted what the tier lacks: {self.tier.stray_deletes[0]}"
        for lease, reads in list(self.leases.items()):
            if lease not in self.core.leases.items:
                del self.leases[lease]
                continue
            for offset, want in reads:
                held = bytes(self.arena.view(offset, len(want)))
                assert held == want, f"leased slot {offset} holds {held!r}, not {want!r}"

    def read(self, offset: int, want: bytes) -> tuple[int, bytes]:
        held = bytes(self.arena.view(offset, len(want)))
        assert held == want, f"a hit at slot {offset} holds {held!r}, not {want!r}"
        return offset, want

    def learn(self, request, reply) -> None:
        """Ids for later requests, the engine's writes, and the bytes of every hit."""
        if isinstance(reply, p.ErrorReply):
            return
        if isinstance(request, p.Batch):
            for op, answer in zip(request.ops, reply.replies):
                self.learn(op, answer)
        elif isinstance(reply, p.RegisterReply):
            if reply.namespace not in self.namespaces:
                self.namespaces.append(reply.namespace)
        elif isinstance(reply, p.ReserveReply):
            keys = p.split_keys(request.keys)
            assert len(reply.status) == len(keys) == len(reply.offsets), reply
            for status, offset, k in zip(reply.status, reply.offsets, keys):
                if status == p.SlotStatus.RESERVED:
                    self.arena.view(offset, 17)[:] = k + bytes([request.rank])
            if reply.reservation:
                self.reservations.append(reply.reservation)
        elif isinstance(reply, (p.LookupReply, p.AcquireReply)):
            keys = p.split_keys(request.keys)
            if isinstance(reply, p.AcquireReply):
                reads = [self.read(o, k + bytes([request.rank])) for o, k in zip(reply.offsets, keys)]
            else:
                hits = reply.hit_chunks
                world = len(reply.offsets) // hits if hits else 0
                assert len(reply.offsets) in (0, hits * world) and hits <= len(keys), reply
                reads = [self.read(reply.offsets[r * hits + i], keys[i] + bytes([r]))
                         for r in range(world) for i in range(hits)]
            if reply.lease:
                assert reply.lease not in self.leases, f"lease {reply.lease} handed out twice"
                self.leases[reply.lease] = reads


def expected(rig: Rig, identity: bytes, frames: list[bytes]):
    """(request or None, what the reply must be): a type, or an ErrorReply code to expect."""
    if len(frames) != 1:
        return None, p.ErrorCode.BAD_FRAME
    try:
        request = p.decode_request(frames[0])
    except (msgspec.DecodeError, ValueError):
        return None, p.ErrorCode.BAD_FRAME
    if not isinstance(request, p.Hello) and identity not in rig.server.sessions:
        return request, p.ErrorCode.NO_SESSION
    return request, REPLY_OF[type(request)]


def check_reply(request, want, raw: bytes) -> None:
    reply = p.decode_reply(raw)
    if isinstance(want, p.ErrorCode):
        assert isinstance(reply, p.ErrorReply) and reply.code == want, (want, reply)
        assert reply.req_id == (0 if request is None else request.req_id), reply
        return
    assert reply.req_id == request.req_id, (request, reply)
    if isinstance(reply, p.ErrorReply):
        assert reply.code != p.ErrorCode.INTERNAL, f"INTERNAL for {request!r:.300}"
        assert reply.code in p.ErrorCode.__members__.values(), reply
        return
    assert type(reply) is want, (request, reply)
    if isinstance(reply, p.BatchReply):
        assert len(reply.replies) == len(request.ops), (request, reply)
        for op, answer in zip(request.ops, reply.replies):
            assert answer.req_id == op.req_id, (op, answer)
            assert type(answer) in (REPLY_OF[type(op)], p.ErrorReply), (op, answer)
            assert not isinstance(answer, p.ErrorReply) or answer.code != p.ErrorCode.INTERNAL, (op, answer)


def build(rig: Rig, r: Reader, batchable: bool = True):
    """A request from the input's choices, naming what earlier replies handed out."""
    rig.req_id += 1
    req_id = rig.req_id if r.below(16) else r.pick((0, 1 << 63))
    kind = r.below(13 if batchable else 12)
    ns = r.pick(rig.namespaces) if rig.namespaces and r.below(8) else r.pick((0, 7, -1))
    first = r.below(len(KEYS))
    blob = b"".join(KEYS[first : first + 1 + r.below(6)])
    if r.below(10) == 0:
        blob += b"\0"
    rank = r.pick((0, 0, 1, 3))
    ms = r.pick((0, 0, 100, 5000, 40000, -1))
    if kind == 0:
        return p.Hello(req_id, r.pick((1, 1, 1, 2)), r.pick(("a", "b", "", "x" * 300)), r.byte())
    if kind == 1:
        geo = r.pick((geometry(), geometry(), geometry(4), geometry(block=7), geometry(512)))
        return p.Register(req_id, r.pick(("m", "m", "other", "")), geo, r.pick((1, 1, 2, 0)), r.pick(SALTS))
    if kind in (2, 3):
        return p.Lookup(req_id, ns, blob, ms)
    if kind in (4, 5):
        parent = KEYS[first - 1] if first else b""
        return p.Reserve(req_id, ns, rank, blob, ms, r.pick((parent, parent, b"", KEYS[r.below(12)], b"x")))
    if kind in (6, 7):
        rid = r.pick(rig.reservations) if rig.reservations and r.below(6) else r.pick((0, 99, 1 << 40))
        return (p.Commit if kind == 6 else p.Abort)(req_id, rid)
    if kind == 8:
        return p.Acquire(req_id, ns, rank, blob, ms)
    if kind == 9:
        leases = [lease for lease in sorted(rig.leases) if r.flag()] + ([r.pick((0, 12345))] if r.below(6) == 0 else [])
        return p.Release(req_id, leases, [lease for lease in leases if r.flag()])
    if kind == 10:
        return r.pick((p.Heartbeat, p.GetStats))(req_id)
    if kind == 11:
        return p.Goodbye(req_id)
    return p.Batch(req_id, [build(rig, r, False) for _ in range(1 + r.below(4))])


def op_frames(rig: Rig, r: Reader, ctl: int) -> None:
    """``ctl``: which engine sends (its high bits) and what (its low four): raw bytes (0-5;
    a length byte, times 16 from 3 on, plus 0-15), a request built from choices (6-11),
    a message of two frames (12, 13)."""
    client = (ctl >> 4) % len(IDENTITIES)
    kind = ctl % 16
    if kind <= 5:
        frames = [r.take(r.byte() * (16 if kind >= 3 else 1) + r.below(16))]
    elif kind <= 11:
        frames = [p.encode(build(rig, r))]
    else:
        frames = [r.sized(), r.sized()]
    identity = IDENTITIES[client]
    request, want = expected(rig, identity, frames)
    single = request is not None and not isinstance(request, p.Batch)
    before = snapshot(rig.core, skip=_SKIP) if single else None
    raw = rig.exchange(client, frames)
    check_reply(request, want, raw)
    reply = p.decode_reply(raw)
    if isinstance(reply, p.ErrorReply) and before is not None:
        after = snapshot(rig.core, skip=_SKIP)
        assert before == after, f"refused {request!r:.200} changed {diff(before, after)}"
    if request is not None:
        rig.learn(request, reply)
    rig.drain()


def TestOneInput(data: bytes) -> None:
    with _Quiet():
        _run(Reader(data))


def _run(r: Reader) -> None:
    rig = Rig(r)
    try:
        for _ in range(MAX_OPS):
            if not r.left:
                break
            ctl = r.byte()
            if ctl % 16 == 14:
                rig.tick(r.pick(STEPS_S))
            elif ctl % 16 == 15:
                rig.run_tasks(1 + r.below(4), r.below(4) == 0)
            else:
                op_frames(rig, r, ctl)
            rig.check()
        for dealer in rig.dealers:
            assert not dealer.poll(0), f"a reply nobody asked for: {dealer.recv()!r:.200}"
    finally:
        rig.close()


if __name__ == "__main__":
    fuzz(TestOneInput)
