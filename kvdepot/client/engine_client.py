"""The engine's side of the control plane: one DEALER socket to the node's cache server.

Guarantees to the engine:
- no call blocks longer than its deadline (``timeout_ms``); a silent server raises
  ServerUnavailable, which callers treat as a miss; a server that refuses this client
  (CURVE: no key, an unknown key, the wrong server key) raises AuthenticationFailed, a
  ServerUnavailable that says why, as soon as the handshake fails;
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

import msgspec
import zmq

from kvdepot import protocol as p
from kvdepot.client.arena import ArenaMapping
from kvdepot.client.channel import Channel
from kvdepot.client.curve import ClientCurve
from kvdepot.client.errors import (
    ArenaMismatch,
    AuthenticationFailed,
    KVDepotError,
    ServerRestarted,
    ServerUnavailable,
)
from kvdepot.client.liveness import heartbeat_loop
from kvdepot.client.results import Acquired, LookupResult, Namespace, PendingReply, Reservation
from kvdepot.client.strays import Strays
from kvdepot.keys import chunk_keys

log = logging.getLogger("kvdepot.client")


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
        curve: ClientCurve | None = None,
    ):
        """``curve``: the keys for a server that requires CURVE (ClientCurve.from_files);
        None speaks to a server without authentication only."""
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
        self._strays = Strays()
        self._last_send = 0.0
        self._down_until = 0.0  # after a silent server, fail fast until then
        self._backoff_s = 0.0
        self._closed = False
        self.last_error: KVDepotError | None = None  # why the latest connect() failed
        self._channel = Channel(self.endpoint, curve)
        self._socket, self._poller = self._channel.socket, self._channel.poller
        self._heartbeat_thread = None
        if heartbeat:
            self._heartbeat_thread = threading.Thread(
                target=heartbeat_loop, args=(self,), name="kvdepot-heartbeat", daemon=True
            )
            self._heartbeat_thread.start()

    # --- connection -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.boot_id is not None

    def connect(self) -> bool:
        """Handshake within the deadline; False (never raises) if the server is unreachable
        or refuses this client (``last_error`` says why: an AuthenticationFailed, or a
        ServerUnavailable, ...)."""
        try:
            self._handshake()
            self.last_error = None
            return True
        except KVDepotError as exc:
            log.debug("kvdepot server at %s not reachable: %s", self.endpoint, exc)
            self.last_error = exc
            return False

    def _handshake(self) -> None:
        with self._lock:
            hello = p.Hello(req_id=0, protocol_version=p.PROTOCOL_VERSION,
                            engine_id=self.engine_id, pid=os.getpid())
            try:
                reply = self._call_raw(hello)
            except KVDepotError as exc:
                # A Hello is refused only for its CURVE key: no longer allowed (BAD_REQUEST),
                # or in no tenant (UNAUTHORIZED).
                if exc.code not in (int(p.ErrorCode.BAD_REQUEST), int(p.ErrorCode.UNAUTHORIZED)):
                    raise
                raise AuthenticationFailed(exc.code, f"the cache server at {self.endpoint} "
                                                     f"refused a session: {exc.message}") from None
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
        self._strays.void()
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
        if connect_wait_s:  # raises AuthenticationFailed at once when the server refuses us
            self._channel.wait_connected(connect_wait_s)
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
                if not self._strays.take(reply) and reply.req_id:
                    self._parked[reply.req_id] = reply

    def _give_back_strays(self) -> None:
        """(under _lock) Release stray leases and abort stray reservations; their replies are
        not awaited (a failure leaves them to their TTL, as before)."""
        if self.boot_id is None:
            return
        for request in self._strays.requests():
            req_id = next(self._ids)
            request.req_id = req_id  # type: ignore[attr-defined]
            try:
                self._socket.send(p.encode(request), zmq.NOBLOCK)
            except zmq.Again:
                return
            self._strays.abandon(req_id)

    def _forget(self, req_id: int) -> None:
        with self._lock:
            self._strays.abandon(req_id)

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
            self._channel.close()
            if self._arena is not None:
                self._arena.close()
                self._arena = None

    def __enter__(self) -> "KVDepotClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
