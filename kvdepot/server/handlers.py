"""The request handlers of the RPC loop: one method per request type, each turning a decoded
request into the core's call and its typed reply.

A mixin of CacheServer (rpc.py), on its loop thread: it uses the server's core, sessions,
arena, authenticator, metrics and clock. A handler raises CacheError for anything the client
got wrong; the loop turns it into an ErrorReply.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvdepot import __version__
from kvdepot import protocol as p
from kvdepot.server.cache import CacheError
from kvdepot.server.sessions import Session

if TYPE_CHECKING:
    from kvdepot.server.rpc import CacheServer

log = logging.getLogger("kvdepot.server")


class RequestHandlers:
    def _hello(
        self: CacheServer, identity: bytes, req: p.Hello, now: float, fd: int = -1,
        client_key: str = "",
    ) -> p.Reply:
        if req.protocol_version != p.PROTOCOL_VERSION:
            raise CacheError(
                p.ErrorCode.BAD_VERSION,
                f"protocol version {req.protocol_version} is not supported; "
                f"this server speaks {p.PROTOCOL_VERSION} (kvdepot {__version__})",
            )
        if self.auth is not None and not self.auth.allows(client_key):
            # Its connection passed the handshake, but a reload has removed its key since.
            raise CacheError(p.ErrorCode.BAD_REQUEST,
                             "unauthorized: this client's CURVE key is no longer allowed")
        engine_id = req.engine_id[:200] or identity.hex()
        old = self.sessions.get(identity)
        if old is not None and old.engine_id != engine_id:
            self._end_session(old, "re-introduced itself")
        if old is None:
            key = f", key {self.auth.name_of(client_key)}" if self.auth is not None else ""
            log.info("Engine %s connected (pid %d%s)", engine_id, req.pid, key)
        self.sessions[identity] = Session(identity, engine_id, req.pid, fd, now, client_key)
        return p.HelloReply(
            req_id=req.req_id,
            protocol_version=p.PROTOCOL_VERSION,
            boot_id=self.boot_id,
            server_version=__version__,
            shm_name=self.arena.name,
            arena_bytes=self.arena.size,
            chunk_tokens=self.core.chunk_tokens,
            heartbeat_ms=int(self.heartbeat_s * 1000),
            session_timeout_ms=int(self.session_timeout_s * 1000),
            arena_identity=True,
        )

    def _register(self: CacheServer, identity: bytes, req: p.Register, now: float) -> p.Reply:
        known = len(self.core.index.namespaces)
        info = self.core.register(req.model, req.geometry, req.world_size, req.salt)
        session = self.sessions[identity]
        log.info(
            "Registered KV cache for engine %s (%d layers, %s) model %s, TP %d%s: "
            "namespace %d, %d bytes per chunk per rank%s",
            session.engine_id, req.geometry.num_layers, req.geometry.describe(), req.model,
            req.world_size, ", salted" if req.salt else "", info.id, info.slot_bytes,
            "" if len(self.core.index.namespaces) > known else " (existing)",
        )
        return p.RegisterReply(
            req_id=req.req_id,
            namespace=info.id,
            namespace_digest=info.digest,
            slot_bytes=info.slot_bytes,
            chunk_tokens=info.chunk_tokens,
        )

    def _lookup(self: CacheServer, identity: bytes, req: p.Lookup, now: float) -> p.Reply:
        hits, lease, offsets, pending = self.core.lookup_and_prefetch(
            identity, req.namespace, req.keys, req.lease_ms, now
        )
        if self.metrics is not None:
            self.metrics.observe_lookup_latency(self.clock() - now)
        return p.LookupReply(
            req_id=req.req_id, hit_chunks=hits, lease=lease, offsets=offsets, pending=pending
        )

    def _reserve(self: CacheServer, identity: bytes, req: p.Reserve, now: float) -> p.Reply:
        rid, status, offsets = self.core.reserve(
            identity, req.namespace, req.rank, req.keys, req.ttl_ms, now, parent=req.parent
        )
        return p.ReserveReply(req_id=req.req_id, reservation=rid, status=status, offsets=offsets)

    def _commit(self: CacheServer, identity: bytes, req: p.Commit, now: float) -> p.Reply:
        n = self.core.commit(identity, req.reservation, now)
        return p.CommitReply(req_id=req.req_id, committed=n)

    def _abort(self: CacheServer, identity: bytes, req: p.Abort, now: float) -> p.Reply:
        self.core.abort(identity, req.reservation)
        return p.OkReply(req_id=req.req_id)

    def _acquire(self: CacheServer, identity: bytes, req: p.Acquire, now: float) -> p.Reply:
        lease, offsets = self.core.acquire(
            identity, req.namespace, req.rank, req.keys, req.lease_ms, now
        )
        return p.AcquireReply(req_id=req.req_id, lease=lease, offsets=offsets)

    def _release(self: CacheServer, identity: bytes, req: p.Release, now: float) -> p.Reply:
        if len(req.leases) > p.MAX_KEYS_PER_REQUEST or len(req.retrieved) > p.MAX_KEYS_PER_REQUEST:
            raise CacheError(p.ErrorCode.TOO_LARGE, "too many leases in one release")
        self.core.release(identity, req.leases, now, req.retrieved)
        return p.OkReply(req_id=req.req_id)

    def _heartbeat(self: CacheServer, identity: bytes, req: p.Heartbeat, now: float) -> p.Reply:
        return p.OkReply(req_id=req.req_id)

    def _get_stats(self: CacheServer, identity: bytes, req: p.GetStats, now: float) -> p.Reply:
        return p.StatsReply(req_id=req.req_id, stats=self.stats(now))

    def _goodbye(self: CacheServer, identity: bytes, req: p.Goodbye, now: float) -> p.Reply:
        session = self.sessions.get(identity)
        if session is not None:
            self._end_session(session, "said goodbye")
        return p.OkReply(req_id=req.req_id)
