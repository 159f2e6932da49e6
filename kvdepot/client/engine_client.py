"""The engine's side of the control plane: one DEALER socket to the node's cache server.

Guarantees to the engine:
- no call blocks longer than its deadline (``timeout_ms``); a silent server raises
  ServerUnavailable, which callers treat as a miss;
- a server restart is noticed (new boot id in the handshake): namespaces are registered again
  by themselves, the arena is mapped anew, ``epoch`` goes up, and the call that noticed raises
  ServerRestarted, so nothing obtained from the old server (leases, reservations, offsets) is
  ever used against the new one;
- thread-safe: one lock around the socket; replies for other threads' requests are parked.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import zmq

from kvdepot import protocol as p
from kvdepot.client.arena import ArenaMapping
from kvdepot.keys import chunk_keys

log = logging.getLogger("kvdepot.client")


class KVDepotError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"[{_code_name(code)}] {message}")
        self.code = code
        self.message = message


class ServerUnavailable(KVDepotError):
    """No reply within the deadline, or no connection: treat as a miss."""


class ServerRestarted(KVDepotError):
    """The server's boot id changed: everything obtained before is void."""


class ArenaMismatch(ServerUnavailable):
    """The server answers, but the shared-memory segment this engine can map is not that
    server boot's (another server's under the same name, a stale one, none, or another
    /dev/shm): writing there would corrupt someone else's chunks, so the server is treated as
    unavailable. Code ARENA_MISMATCH; the message says what was found."""


def _code_name(code: int) -> str:
    try:
        return p.ErrorCode(code).name
    except ValueError:
        return str(code)


@dataclass
class Namespace:
    """A registered (model, geometry, world size, salt). ``id`` may change after a restart;
    ``digest`` (and so every key) never does."""

    id: int
    digest: bytes
    slot_bytes: int
    chunk_tokens: int
    model: str
    geometry: p.KVGeometry
    world_size: int
    salt: str


@dataclass(frozen=True)
class LookupResult:
    hit_chunks: int
    lease: int
    epoch: int
    # With a lease and a hit: every rank's slot offset of every hit chunk, rank-major (see
    # protocol.LookupReply); empty without a lease or from a server that predates the field.
    offsets: list[int] = field(default_factory=list)
    # Chunks after the hits the server is loading from a lower tier (disk) for this lookup,
    # held by its lease: ask again for them; 0 from a server that predates the field.
    pending: int = 0

    def rank_offsets(self, rank: int) -> list[int]:
        """Rank ``rank``'s slot offsets of the hit chunks, in prefix order; empty when the
        reply carried no offsets (then the rank needs an Acquire to load)."""
        if not self.offsets or not self.hit_chunks:
            return []
        world_size = len(self.offsets) // self.hit_chunks
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        return self.offsets[rank * self.hit_chunks : (rank + 1) * self.hit_chunks]


@dataclass(frozen=True)
class Reservation:
    id: int
    status: list[int]
    offsets: list[int]
    epoch: int


@dataclass(frozen=True)
class Acquired:
    lease: int
    offsets: list[int]
    epoch: int


class PendingReply:
    """A request in flight; poll with ready(), collect with result()."""

    def __init__(self, client: "KVDepotClient", req_id: int, deadline: float, convert):
        self._client = client
        self._req_id = req_id
        self._deadline = deadline
        self._convert = convert
        self._reply: p.Reply | None = None

    def ready(self) -> bool:
        if self._reply is None:
            self._reply = self._client._collect(self._req_id, 0.0)
        return self._reply is not None or time.monotonic() >= self._deadline

    def abandon(self) -> None:
        """Nobody will take the result: whatever it grants (a lease, a reservation) is given
        back to the server, now if it has arrived, else when it does."""
        with self._client._lock:
            if self._reply is not None:
                self._client._reclaim(self._reply)
                self._reply = None
            else:
                self._client._forget(self._req_id)

    def result(self):
        if self._reply is None:
            self._reply = self._client._collect(self._req_id, self._deadline)
        if self._reply is None:
            with self._client._lock:
                raise self._client._timed_out(self._req_id)
        return self._convert(self._client._check(self._reply))


class KVDepotClient:
    def __init__(
        self,
        host: str = "localhost",
        port: int = 5555,
        *,
        engine_id: str | None = None,
        timeout_ms: int = 1000,
        heartbeat: bool = True,
        prefault: bool = True,
    ):
        self.endpoint = f"tcp://{'127.0.0.1' if host == 'localhost' else host}:{port}"
        self.engine_id = engine_id or f"engine-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.timeout_s = timeout_ms / 1000.0
        self.boot_id: str | None = None
        self.epoch = 0
        self.chunk_tokens = 0
        self.heartbeat_s = 1.0
        self._arena: ArenaMapping | None = None
        self._mismatch_logged_at = float("-inf")
        self._prefault = prefault
        self._namespaces: list[Namespace] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._parked: dict[int, p.Reply] = {}
        self._abandoned: set[int] = set()
        # Leases and reservations granted in replies that nobody waited for any more (a lookup
        # answered after its deadline, a request aborted while its lookup was in flight): given
        # back with the next request, not left to pin chunks until their TTL.
        self._stray_leases: list[int] = []
        self._stray_reservations: list[int] = []
        self._last_send = 0.0
        self._down_until = 0.0  # after a silent server, fail fast until then
        self._backoff_s = 0.0
        self._closed = False
        self._ctx = zmq.Context()
        self._socket = self._new_socket()
        # One long-lived poller: Socket.poll() builds a new one per call, which showed up in
        # every round trip.
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._heartbeat_thread = None
        if heartbeat:
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop, name="kvdepot-heartbeat", daemon=True
            )
            self._heartbeat_thread.start()

    def _new_socket(self) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        # Never queue requests for a server that is not there: they would arrive late.
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.connect(self.endpoint)
        return s

    # --- connection -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.boot_id is not None

    def connect(self) -> bool:
        """Handshake within the deadline; False (never raises) if the server is unreachable."""
        try:
            self._handshake()
            return True
        except KVDepotError as exc:
            log.debug("kvdepot server at %s not reachable: %s", self.endpoint, exc)
            return False

    def _handshake(self) -> None:
        with self._lock:
            reply = self._call_raw(
                p.Hello(req_id=0, protocol_version=p.PROTOCOL_VERSION,
                        engine_id=self.engine_id, pid=os.getpid())
            )
            assert isinstance(reply, p.HelloReply)
            restarted = self.boot_id is not None and reply.boot_id != self.boot_id
            if reply.boot_id != self.boot_id:
                self._adopt_boot(reply)
            if restarted:
                raise ServerRestarted(
                    int(p.ErrorCode.NO_SESSION),
                    "the cache server restarted: leases, reservations and offsets are void",
                )

    def _adopt_boot(self, hello: p.HelloReply) -> None:
        """A server boot we have not seen: map its arena and register our namespaces there.
        Raises ArenaMismatch, with no boot adopted, when the segment is not that boot's."""
        try:
            boot_id = hello.boot_id if hello.arena_identity else None  # older servers: unchecked
            arena = ArenaMapping(hello.shm_name, hello.arena_bytes, boot_id=boot_id)
        except (OSError, ValueError) as exc:  # ValueError: a name or size no segment has
            self._forget_boot()
            error = ArenaMismatch(
                int(p.ErrorCode.ARENA_MISMATCH), f"cache server at {self.endpoint}: {exc}"
            )
            now = time.monotonic()
            if now - self._mismatch_logged_at >= 60.0:  # every call retries: say it once a minute
                self._mismatch_logged_at = now
                log.error("kvdepot: %s", error)
            raise error from None
        old = self._arena
        self._arena = arena
        if self._prefault:
            self._arena.prefault_async()
        if old is not None:
            old.close()
        self.boot_id = hello.boot_id
        self.epoch += 1
        self._stray_leases, self._stray_reservations = [], []  # void with the old boot
        self.chunk_tokens = hello.chunk_tokens
        self.heartbeat_s = hello.heartbeat_ms / 1000.0
        for ns in self._namespaces:
            self._register_call(ns)
        log.info("Connected to kvdepot %s at %s (boot %s)", hello.server_version,
                 self.endpoint, hello.boot_id[:8])

    def _forget_boot(self) -> None:
        """Drop the boot we had (its arena, and through ``epoch`` everything obtained from it);
        the next call shakes hands again."""
        if self.boot_id is None:
            return
        self.boot_id = None
        self.epoch += 1
        old, self._arena = self._arena, None
        if old is not None:
            old.close()

    def _ensure_session(self) -> None:
        if self.boot_id is None:
            self._handshake()

    # --- requests ---------------------------------------------------------------------------

    def _send(self, request: msgspec.Struct, connect_wait_s: float = 0.0) -> int:
        """Send now; with connect_wait_s, first wait that long for a connection to exist."""
        now = time.monotonic()
        if now < self._down_until:
            raise ServerUnavailable(0, f"the cache server at {self.endpoint} is not answering")
        self._give_back_strays()
        req_id = next(self._ids)
        request.req_id = req_id  # type: ignore[attr-defined]
        if connect_wait_s and not self._socket.poll(int(connect_wait_s * 1000), zmq.POLLOUT):
            raise ServerUnavailable(0, f"cannot connect to the cache server at {self.endpoint}")
        try:
            self._socket.send(p.encode(request), zmq.NOBLOCK)
        except zmq.Again:
            raise ServerUnavailable(0, f"no connection to the cache server at {self.endpoint}") from None
        self._last_send = now
        return req_id

    def _timed_out(self, req_id: int) -> ServerUnavailable:
        """Forget the request and back off, so a hung server costs one deadline, not many."""
        self._forget(req_id)
        self._backoff_s = min(max(2 * self._backoff_s, 0.5), 10.0)
        self._down_until = time.monotonic() + self._backoff_s
        return ServerUnavailable(0, "the cache server did not answer in time")

    def _collect(self, req_id: int, deadline: float) -> p.Reply | None:
        """The reply to req_id if it arrives before deadline (0: don't wait), else None."""
        with self._lock:
            while True:
                reply = self._parked.pop(req_id, None)
                if reply is not None:
                    return reply
                remaining = max(0.0, deadline - time.monotonic()) if deadline else 0.0
                if not self._poller.poll(int(remaining * 1000) if remaining else 0):
                    return None
                frame = self._socket.recv()
                try:
                    reply = p.decode_reply(frame)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    log.warning("Ignored an undecodable reply from the cache server")
                    continue
                if reply.req_id == req_id:
                    return reply
                if reply.req_id in self._abandoned:
                    self._abandoned.discard(reply.req_id)
                    self._reclaim(reply)
                elif reply.req_id:
                    self._parked[reply.req_id] = reply

    def _reclaim(self, reply: p.Reply) -> None:
        """(under _lock) Note what an unwanted reply holds on the server, to give it back."""
        for r in reply.replies if isinstance(reply, p.BatchReply) else (reply,):
            if isinstance(r, (p.LookupReply, p.AcquireReply)) and r.lease:
                self._stray_leases.append(r.lease)
            elif isinstance(r, p.ReserveReply) and r.reservation:
                self._stray_reservations.append(r.reservation)

    def _give_back_strays(self) -> None:
        """(under _lock) Release stray leases and abort stray reservations; their replies are
        not awaited (a failure leaves them to their TTL, as before)."""
        if not (self._stray_leases or self._stray_reservations) or self.boot_id is None:
            return
        requests: list[msgspec.Struct] = []
        if self._stray_leases:
            requests.append(p.Release(req_id=0, leases=self._stray_leases))
        requests += [p.Abort(req_id=0, reservation=r) for r in self._stray_reservations]
        self._stray_leases, self._stray_reservations = [], []
        for request in requests:
            req_id = next(self._ids)
            request.req_id = req_id  # type: ignore[attr-defined]
            try:
                self._socket.send(p.encode(request), zmq.NOBLOCK)
            except zmq.Again:
                return
            self._abandoned.add(req_id)

    def _forget(self, req_id: int) -> None:
        with self._lock:
            self._abandoned.add(req_id)
            if len(self._abandoned) > 10000:
                self._abandoned.clear()

    def _call_raw(self, request: msgspec.Struct) -> p.Reply:
        """For the handshake and registrations: may wait for the connection to come up, within
        the same one deadline as the reply."""
        with self._lock:
            deadline = time.monotonic() + self.timeout_s
            req_id = self._send(request, connect_wait_s=self.timeout_s)
            reply = self._collect(req_id, deadline)
            if reply is None:
                raise self._timed_out(req_id)
            self._backoff_s = 0.0
            return self._check_error(reply)

    @staticmethod
    def _check_error(reply: p.Reply) -> p.Reply:
        if isinstance(reply, p.ErrorReply):
            raise KVDepotError(reply.code, reply.message)
        return reply

    def _check(self, reply: p.Reply) -> p.Reply:
        """Error replies become exceptions; a lost session triggers the restart handling."""
        if isinstance(reply, p.ErrorReply) and reply.code == p.ErrorCode.NO_SESSION:
            self._after_lost_session()
        return self._check_error(reply)

    def _after_lost_session(self) -> None:
        """The server forgot us (restart, or our session timed out): handshake again."""
        with self._lock:
            self._handshake()  # raises ServerRestarted when the boot id changed
            raise ServerUnavailable(
                int(p.ErrorCode.NO_SESSION), "session was dropped by the server; reconnected"
            )

    def _call(self, request: msgspec.Struct) -> p.Reply:
        with self._lock:
            self._ensure_session()
            req_id = self._send(request)
            reply = self._collect(req_id, time.monotonic() + self.timeout_s)
            if reply is None:
                raise self._timed_out(req_id)
            self._backoff_s = 0.0
            return self._check(reply)

    # --- API --------------------------------------------------------------------------------

    def register(
        self, model: str, geometry: p.KVGeometry, world_size: int = 1, salt: str = ""
    ) -> Namespace:
        with self._lock:
            self._ensure_session()
            for ns in self._namespaces:
                if (ns.model, ns.geometry, ns.world_size, ns.salt) == (model, geometry, world_size, salt):
                    return ns
            ns = Namespace(0, b"", 0, 0, model, geometry, world_size, salt)
            self._register_call(ns)
            self._namespaces.append(ns)
            return ns

    def _register_call(self, ns: Namespace) -> None:
        reply = self._call_raw(
            p.Register(req_id=0, model=ns.model, geometry=ns.geometry,
                       world_size=ns.world_size, salt=ns.salt)
        )
        assert isinstance(reply, p.RegisterReply)
        if ns.digest and ns.digest != reply.namespace_digest:
            raise KVDepotError(int(p.ErrorCode.INTERNAL), "namespace digest changed across boots")
        ns.id, ns.digest = reply.namespace, reply.namespace_digest
        ns.slot_bytes, ns.chunk_tokens = reply.slot_bytes, reply.chunk_tokens

    def chunk_keys(self, ns: Namespace, tokens: Sequence[int]) -> list[bytes]:
        return chunk_keys(ns.digest, tokens, ns.chunk_tokens)

    def lookup(self, ns: Namespace, keys: Sequence[bytes], lease_ms: int = 0) -> LookupResult:
        return self.send_lookup(ns, keys, lease_ms).result()

    def send_lookup(self, ns: Namespace, keys: Sequence[bytes], lease_ms: int = 0) -> PendingReply:
        with self._lock:
            self._ensure_session()
            epoch = self.epoch
            req_id = self._send(p.Lookup(req_id=0, namespace=ns.id, keys=b"".join(keys), lease_ms=lease_ms))
        return PendingReply(
            self, req_id, time.monotonic() + self.timeout_s,
            lambda r: LookupResult(r.hit_chunks, r.lease, epoch, r.offsets, r.pending),
        )

    def reserve(
        self, ns: Namespace, rank: int, keys: Sequence[bytes], ttl_ms: int = 0, parent: bytes = b""
    ) -> Reservation:
        """Phase one of a store of consecutive chunks of one chain. ``parent``: the key of the
        chunk before ``keys[0]`` (b"" when ``keys[0]`` is the chain's first chunk); the server
        keeps a chain's head while its later chunks stay, and answers NO_PARENT for every key
        when ``parent`` is not in the cache. Status and offsets per key: see ReserveReply."""
        with self._lock:
            epoch = self.epoch
            r = self._call(p.Reserve(req_id=0, namespace=ns.id, rank=rank, keys=b"".join(keys),
                                     ttl_ms=ttl_ms, parent=parent))
        assert isinstance(r, p.ReserveReply)
        return Reservation(r.reservation, r.status, r.offsets, epoch)

    def commit(self, reservation: int) -> int:
        r = self._call(p.Commit(req_id=0, reservation=reservation))
        assert isinstance(r, p.CommitReply)
        return r.committed

    def abort(self, reservation: int) -> None:
        self._call(p.Abort(req_id=0, reservation=reservation))

    def acquire(self, ns: Namespace, rank: int, keys: Sequence[bytes], lease_ms: int = 0) -> Acquired:
        with self._lock:
            epoch = self.epoch
            r = self._call(p.Acquire(req_id=0, namespace=ns.id, rank=rank, keys=b"".join(keys), lease_ms=lease_ms))
        assert isinstance(r, p.AcquireReply)
        return Acquired(r.lease, r.offsets, epoch)

    def release(self, leases: Sequence[int], retrieved: Sequence[int] = ()) -> None:
        """End ``leases``; ``retrieved`` names those of them whose chunks were read, so the
        server counts the retrieval (Lookup leases; an Acquire lease counts anyway)."""
        if leases or retrieved:  # a stray retrieved id alone still reaches the server's check
            self._call(p.Release(req_id=0, leases=list(leases), retrieved=list(retrieved)))

    def stats(self) -> p.ServerStats:
        r = self._call(p.GetStats(req_id=0))
        assert isinstance(r, p.StatsReply)
        return r.stats

    def batch(self, ops: Sequence[msgspec.Struct]) -> list[p.Reply]:
        """Several requests in one round trip; per-op errors come back as ErrorReply items."""
        r = self._call(p.Batch(req_id=0, ops=list(ops)))
        assert isinstance(r, p.BatchReply)
        return r.replies

    # --- arena ------------------------------------------------------------------------------

    def arena(self, epoch: int | None = None) -> ArenaMapping:
        """The arena of the current boot; with ``epoch``, only if still that boot's."""
        with self._lock:
            self._ensure_session()
            if epoch is not None and epoch != self.epoch:
                raise ServerRestarted(int(p.ErrorCode.NO_SESSION), "offsets from an earlier server boot")
            assert self._arena is not None
            return self._arena

    def arena_tensor(self):
        return self.arena().tensor()

    def arena_array(self):
        return self.arena().array

    # --- liveness ---------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._closed:
            time.sleep(min(self.heartbeat_s, 1.0) / 2)
            if self._closed or self.boot_id is None:
                continue
            if time.monotonic() - self._last_send < self.heartbeat_s:
                continue
            try:
                with self._lock:
                    if self._closed:
                        return
                    req_id = self._send(p.Heartbeat(req_id=0))
                    reply = self._collect(req_id, time.monotonic() + self.timeout_s)
                    if reply is None:
                        self._timed_out(req_id)
                    elif isinstance(reply, p.ErrorReply) and reply.code == p.ErrorCode.NO_SESSION:
                        self._handshake()
            except KVDepotError:
                pass  # the next real call reports it
            except zmq.ZMQError:
                return

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            if self.boot_id is not None:
                try:
                    req_id = self._send(p.Goodbye(req_id=0))
                    self._collect(req_id, time.monotonic() + min(self.timeout_s, 0.2))
                except KVDepotError:
                    pass
            self._closed = True
            self._socket.close(linger=0)
            self._ctx.term()
            if self._arena is not None:
                self._arena.close()
                self._arena = None

    def __enter__(self) -> "KVDepotClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
