"""The RPC loop: a ZMQ ROUTER socket in front of the cache's partitions (partition.py).

One thread runs this loop and owns the partitions' cores and allocators, and the sessions;
nothing else touches them. Each session belongs to one partition: the only one without
tenants, else its tenant's (tenants.py), decided by its CURVE key at Hello. Every frame gets exactly one reply: the typed reply or an ErrorReply. A bad
frame costs its sender an error reply and one log line per minute, never the server.
"""

from __future__ import annotations

import logging
import queue
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from kvdepot import protocol as p
from kvdepot.server.cache import CacheCore, CacheError
from kvdepot.server.arena import SharedArena
from kvdepot.server.auth import CurveAuthenticator
from kvdepot.server.handlers import RequestHandlers
from kvdepot.server.metrics import ServerMetrics
from kvdepot.server.partition import CachePartition, NamespaceHandles, PartitionPlan
from kvdepot.server.sessions import Complaints, Session
from kvdepot.server.stats import collect_stats
from kvdepot.server.tenants import TenantDirectory
from kvdepot.server.tiers import Tier
from kvdepot.server.workers import Completions, TierWorkers, count_evictions

log = logging.getLogger("kvdepot.server")

_MAINTENANCE_S = 0.1
# Plain ints: pyzmq's flag enums cost microseconds per use on the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK


class CacheServer(RequestHandlers):
    def __init__(
        self,
        core: CacheCore | None = None,
        arena: SharedArena | None = None,
        *,
        host: str = "localhost",
        port: int = 5555,
        heartbeat_s: float = 1.0,
        session_timeout_s: float = 10.0,
        metrics: ServerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        executor: Executor | None = None,
        tiers: Mapping[str, Tier] | None = None,
        auth: CurveAuthenticator | None = None,
        tenants: Sequence[PartitionPlan] = (),
    ):
        """One cache (``core``, its ``arena`` and ``tiers``, the lower tiers by name whose
        books the core keeps) or, with ``tenants``, one partition per tenant (then CURVE
        ``auth`` is required: a session's key names its tenant). ``executor`` runs tier I/O
        (the --max-workers pool; a one-thread pool of its own when None); ``auth``: CURVE on
        the port, every session knowing its client's key (None: no authentication).
        ValueError for a core keeping books of a tier nobody runs, tenants without CURVE,
        arenas of different boots, or both a core and tenants."""
        if tenants:
            if core is not None or arena is not None or tiers:
                raise ValueError("a server has either one core or tenants, not both")
            if auth is None:
                raise ValueError("tenants need CURVE authentication: a key names its tenant")
            plans = list(tenants)
        else:
            if core is None or arena is None:
                raise ValueError("a server without tenants needs a core and its arena")
            plans = [PartitionPlan(core, arena, tiers or {})]
        for plan in plans:
            lower = plan.core.places.lower
            missing = set(lower.books if lower else ()) - set(plan.tiers)
            if missing:
                raise ValueError(f"the core keeps books of tiers {sorted(missing)} that nobody runs")
        # Written into every segment: engines check that they mapped this boot's.
        self.boot_id = plans[0].arena.boot_id
        if any(plan.arena.boot_id != self.boot_id for plan in plans):
            raise ValueError("every partition's arena must carry the server's boot id")
        # The one cache of a server without tenants (tests and tools reach it here).
        self.core = core
        self.arena = arena
        self.directory = (
            TenantDirectory([plan.tenant for plan in plans if plan.tenant is not None])
            if tenants else None
        )
        self.handles = NamespaceHandles()
        self.heartbeat_s = heartbeat_s
        self.session_timeout_s = session_timeout_s
        self.metrics = metrics
        self.clock = clock
        self.started_at = clock()
        self.sessions: dict[bytes, Session] = {}
        self._complaints = Complaints()
        self._errors: dict[str, int] = {}
        self._stopping = False
        self._admin: queue.Queue[tuple[Callable[[], object], Future]] = queue.Queue()
        self._snapshot: p.ServerStats | None = None
        self._snapshot_at = 0.0

        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 100000)
        self._socket.setsockopt(zmq.RCVHWM, 100000)
        self._socket.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES * 4)
        self.auth = auth
        if auth is not None:
            # Before any bind: no TCP peer gets a handshake the handler cannot decide.
            auth.start(self._ctx, on_revoked=self.end_sessions_of)
            auth.secure(self._socket)
        # The completions' pipe first: it takes its fixed routing id before any TCP peer can
        # connect (a peer claiming that id later is refused by the ROUTER).
        wake_address = f"inproc://kvdepot-rpc-{id(self):x}"
        self._socket.bind(wake_address)
        self.completions = Completions(self._ctx, wake_address)
        host_addr = "127.0.0.1" if host == "localhost" else host
        if host_addr == "0.0.0.0":
            host_addr = "*"
        if port == 0:
            port = self._socket.bind_to_random_port(f"tcp://{host_addr}")
        else:
            self._socket.bind(f"tcp://{host_addr}:{port}")
        self.port = port
        self.endpoint = f"tcp://{host}:{port}"
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="kvdepot-worker")
        self.partitions: dict[str, CachePartition] = {}
        for plan in plans:
            name = plan.tenant.name if plan.tenant is not None else ""
            workers = TierWorkers(
                self.executor,
                self.completions.poster(name),
                plan.tiers,
                plan.arena.view,
                count_evictions(metrics) if metrics is not None else None,
            )
            self.partitions[name] = CachePartition(name, plan.core, plan.arena, workers, plan.tenant)
        self._handlers: dict[type, Callable] = {
            p.Register: self._register,
            p.Lookup: self._lookup,
            p.Reserve: self._reserve,
            p.Commit: self._commit,
            p.Abort: self._abort,
            p.Acquire: self._acquire,
            p.Release: self._release,
            p.Heartbeat: self._heartbeat,
            p.GetStats: self._get_stats,
            p.Goodbye: self._goodbye,
        }

    # --- loop -------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        sock = self._socket
        next_maintenance = self.clock() + _MAINTENANCE_S
        # A blocking receive with a timeout, like a bare echo server: polling first cost a
        # large share of each request. Completions of tier work arrive on this socket too
        # (Completions), so they wake the loop at once; disconnect events wait for the tick.
        sock.setsockopt(zmq.RCVTIMEO, int(_MAINTENANCE_S * 1000))
        try:
            while not self._stopping:
                try:
                    # The routing-id frame as a Frame (it knows the peer's socket for Hello),
                    # the payload as bytes: cheaper than two Frame objects per request.
                    head = sock.recv(copy=False)
                except zmq.Again:
                    head = None
                if head is not None:
                    try:
                        self._on_message(head)
                    except Exception:  # noqa: BLE001 - no frame may stop the server
                        log.exception("Unexpected error while handling a frame")
                now = self.clock()
                if now >= next_maintenance:
                    self._on_monitor()
                    self._maintain(now)
                    next_maintenance = now + _MAINTENANCE_S
        finally:
            self._close_sockets()

    def _on_wake(self) -> None:
        """Apply what tier workers finished, and run admin jobs, now."""
        for owner, done in self.completions.take():
            try:
                self.partitions[owner].core.complete(done, self.clock())
            except Exception:  # noqa: BLE001 - a bug must cost one completion, never the server
                log.exception("Unexpected error while applying %r", done)
        self._run_admin_jobs()
        self._start_effects()

    def _start_effects(self) -> None:
        for partition in self.partitions.values():
            partition.start_effects()

    @property
    def ready(self) -> bool:
        """Is every partition's arena touched and ready (see SharedArena.ready)? Any thread."""
        return all(partition.arena.ready for partition in self.partitions.values())

    def stop(self) -> None:
        """Ask the loop to exit (safe from signal handlers and other threads)."""
        self._stopping = True

    def _close_sockets(self) -> None:
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.completions.close()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
        if self.auth is not None:
            self.auth.stop()  # closes its socket: the context cannot end before
        self._ctx.term()

    def _on_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, _NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                fd = event["value"]
                for session in [s for s in self.sessions.values() if s.fd == fd]:
                    self._end_session(session, "disconnected")

    def _maintain(self, now: float) -> None:
        for partition in self.partitions.values():
            leases, reservations = partition.core.expire(now)
            if leases or reservations:
                tenant = f" of tenant {partition.name}" if partition.name else ""
                log.info("Expired %d leases and %d reservations%s", leases, reservations, tenant)
        deadline = now - self.session_timeout_s
        for session in [s for s in self.sessions.values() if s.last_seen < deadline]:
            self._end_session(session, f"sent nothing for {self.session_timeout_s:.0f} s")
        self._run_admin_jobs()
        self._start_effects()
        self._publish_snapshot(now)

    def _run_admin_jobs(self) -> None:
        while not self._admin.empty():
            job, future = self._admin.get_nowait()
            try:
                future.set_result(job())
            except Exception as exc:  # noqa: BLE001 - handed back to the asking thread
                future.set_exception(exc)

    def _end_session(self, session: Session, why: str) -> None:
        self.sessions.pop(session.identity, None)
        partition = session.partition
        partition.sessions -= 1
        leases, reservations = partition.core.drop_session(session.identity, self.clock())
        log.info(
            "Engine %s %s: dropped %d leases and %d reservations",
            session.engine_id, why, leases, reservations,
        )

    # --- frames -----------------------------------------------------------------------------

    def _on_message(self, head: zmq.Frame) -> None:
        now = self.clock()
        identity = head.bytes
        sock = self._socket
        frame = sock.recv(_NOBLOCK) if head.more else None
        extra = 0
        while sock.getsockopt(_RCVMORE):
            sock.recv(_NOBLOCK)
            extra += 1
        if identity == Completions.identity:  # not a request: tier work ended, or admin work
            self._on_wake()
            return
        if frame is None or extra:
            self._reply_error(identity, 0, p.ErrorCode.BAD_FRAME, "expected exactly one frame", now)
            return
        if len(frame) > p.MAX_FRAME_BYTES:
            self._reply_error(
                identity, 0, p.ErrorCode.TOO_LARGE,
                f"frame of {len(frame)} bytes is over {p.MAX_FRAME_BYTES}", now,
            )
            return
        try:
            request = p.decode_request(frame)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            # ValueError covers what msgspec lets through, e.g. UnicodeDecodeError.
            self._reply_error(identity, 0, p.ErrorCode.BAD_FRAME, f"undecodable request: {exc}", now)
            return
        kind = type(request)
        session = self.sessions.get(identity)
        if kind is p.Hello:
            # The socket's file descriptor ties the session to its TCP connection, so a
            # disconnect (an engine killed) ends the session at once. The OS reuses fds: the
            # monitor is drained first, so a late disconnect of the fd's previous connection
            # (always queued before this connection's accept) cannot end the new session.
            self._on_monitor()
            # With CURVE, the client's public key, which the ZAP handler set as the
            # connection's user id; "" without authentication.
            key = head.get("User-Id") if self.auth is not None else ""
            reply = self._dispatch(identity, request, now, fd=head.get(zmq.SRCFD), client_key=key)
        elif session is None:
            reply = self._error(identity, request.req_id, p.ErrorCode.NO_SESSION,
                                "no session: send Hello first (the server may have restarted)", now)
        elif self.auth is not None and head.get("User-Id") != session.client_key:
            # Another connection under this session's routing id (ids are guessable, and a
            # peer may choose its own once the session's connection is gone): it is not the
            # session's client, whatever it claims.
            reply = self._error(identity, request.req_id, p.ErrorCode.NO_SESSION,
                                "no session for this connection: send Hello first", now)
        else:
            session.last_seen = now
            if kind is p.Batch:
                reply = self._batch(identity, request, now)
            else:
                reply = self._dispatch(identity, request, now)
        self._send(identity, reply)  # first: what the request started never delays its reply
        self._start_effects()
        if self.metrics is not None:
            self.metrics.observe_request(p.wire_tag(kind), self.clock() - now)

    def _batch(self, identity: bytes, batch: p.Batch, now: float) -> p.Reply:
        if len(batch.ops) > p.MAX_BATCH_OPS:
            return self._error(identity, batch.req_id, p.ErrorCode.TOO_LARGE,
                               f"batch of {len(batch.ops)} ops is over {p.MAX_BATCH_OPS}", now)
        replies = []
        key = self.sessions[identity].client_key  # a Hello in the batch: same connection
        for op in batch.ops:
            if type(op) is not p.Hello and identity not in self.sessions:  # after a Goodbye
                replies.append(self._error(identity, op.req_id, p.ErrorCode.NO_SESSION,
                                           "no session: send Hello first", now))
            else:
                replies.append(self._dispatch(identity, op, now, client_key=key))
        return p.BatchReply(req_id=batch.req_id, replies=replies)

    def _dispatch(
        self, identity: bytes, request, now: float, fd: int = -1, client_key: str = ""
    ) -> p.Reply:
        try:
            if type(request) is p.Hello:
                return self._hello(identity, request, now, fd, client_key)
            return self._handlers[type(request)](identity, request, now)
        except CacheError as exc:
            return self._error(identity, request.req_id, exc.code, exc.message, now)
        except Exception:  # noqa: BLE001 - a bug must cost one request, never the server
            self._complaints.report(identity, now, "internal error:\n" + traceback.format_exc())
            return self._error(identity, request.req_id, p.ErrorCode.INTERNAL,
                               "internal server error (logged)", now)

    def _error(self, identity: bytes, req_id: int, code: p.ErrorCode, message: str, now: float) -> p.ErrorReply:
        name = code.name
        self._errors[name] = self._errors.get(name, 0) + 1
        if self.metrics is not None:
            self.metrics.count_error(name)
        if code in (p.ErrorCode.BAD_FRAME, p.ErrorCode.BAD_VERSION, p.ErrorCode.BAD_REQUEST,
                    p.ErrorCode.TOO_LARGE, p.ErrorCode.GEOMETRY_MISMATCH):
            self._complaints.report(identity, now, f"{name}: {message}")
        return p.ErrorReply(req_id=req_id, code=int(code), message=message)

    def _reply_error(self, identity: bytes, req_id: int, code: p.ErrorCode, message: str, now: float) -> None:
        self._send(identity, self._error(identity, req_id, code, message, now))

    def _send(self, identity: bytes, reply: msgspec.Struct) -> None:
        payload = p.encode(reply)
        try:
            # Two sends with int flags: send_multipart combines pyzmq's flag enums per frame.
            self._socket.send(identity, _SNDMORE_NOBLOCK)
            self._socket.send(payload, _NOBLOCK)
        except zmq.Again:
            log.warning("Dropped a reply: the send queue of %s is full", identity.hex())

    # --- stats and admin (other threads) ----------------------------------------------------

    def stats(
        self, now: float | None = None, partitions: Sequence[CachePartition] | None = None
    ) -> p.ServerStats:
        """The server's stats (RPC thread): every partition's, or only ``partitions``'."""
        now = self.clock() if now is None else now
        return collect_stats(
            list(self.partitions.values()) if partitions is None else list(partitions),
            boot_id=self.boot_id, uptime_s=now - self.started_at, ready=self.ready,
            errors=self._errors, tenants=self.directory is not None,
        )

    def _publish_snapshot(self, now: float) -> None:
        self._snapshot = self.stats(now)
        self._snapshot_at = now

    def snapshot(self) -> p.ServerStats:
        """The latest stats the RPC thread published (at most ~0.1 s old); any thread."""
        snap = self._snapshot
        return snap if snap is not None else self.stats()

    def run_in_loop(self, job: Callable[[], object], timeout: float = 5.0) -> object:
        """Run job on the RPC thread (the only one allowed to change state); any thread."""
        future: Future = Future()
        self._admin.put((job, future))
        self.completions.post()  # wakes the loop: the job runs now, not at the next tick
        return future.result(timeout)

    def clear_cache(self) -> int:
        """Drop every chunk nobody holds, in every partition and tier; how many chunks left
        the arenas. Any thread."""

        def clear() -> int:
            return sum(partition.core.clear() for partition in self.partitions.values())

        return int(self.run_in_loop(clear))  # type: ignore[arg-type]

    def end_sessions_of(self, client_keys: frozenset[str]) -> None:
        """End the sessions of these CURVE client keys (no longer allowed): their leases and
        reservations go, and their connections can open no new session. Any thread; returns
        at once."""

        def end() -> None:
            for session in [s for s in self.sessions.values() if s.client_key in client_keys]:
                self._end_session(session, "lost its key's access")

        self._admin.put((end, Future()))
        self.completions.post()
