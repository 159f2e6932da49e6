"""The request handlers of the RPC loop: one method per request type, each turning a decoded
request into the core's call and its typed reply.

A mixin of CacheServer (rpc.py), on its loop thread: it uses the server's partitions,
sessions, namespace handles, authenticator, metrics and clock. A request goes to its session's
partition (its tenant's cache); namespaces travel as handles that only that partition can
resolve. A handler raises CacheError for anything the client got wrong; the loop turns it into
an ErrorReply.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvdepot import __version__
from kvdepot import protocol as p
from kvdepot.server.cache import CacheError
from kvdepot.server.partition import CachePartition
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
        partition = self._partition_of(client_key)
        engine_id = req.engine_id[:200] or identity.hex()
        old = self.sessions.get(identity)
        if old is not None and (old.engine_id != engine_id or old.client_key != client_key):
            # Another engine, or another key under this routing id: nothing of the old
            # session's passes to it.
            self._end_session(old, "re-introduced itself")
            old = None
        if old is None:
            key = f", key {self.auth.name_of(client_key)}" if self.auth is not None else ""
            tenant = f", tenant {partition.name}" if partition.name else ""
            log.info("Engine %s connected (pid %d%s%s)", engine_id, req.pid, key, tenant)
            partition.sessions += 1
        self.sessions[identity] = Session(identity, engine_id, req.pid, fd, now, client_key,
                                          partition)
        return p.HelloReply(
            req_id=req.req_id,
            protocol_version=p.PROTOCOL_VERSION,
            boot_id=self.boot_id,
            server_version=__version__,
            shm_name=partition.arena.name,
            arena_bytes=partition.arena.size,
            chunk_tokens=partition.core.chunk_tokens,
            heartbeat_ms=int(self.heartbeat_s * 1000),
            session_timeout_ms=int(self.session_timeout_s * 1000),
            arena_identity=True,
        )

    def _partition_of(self: CacheServer, client_key: str) -> CachePartition:
        """The partition a client's session belongs to; CacheError(UNAUTHORIZED) when its key
        belongs to no tenant."""
        if self.directory is None:
            return self.partitions[""]
        assert self.auth is not None  # tenants require CURVE (CacheServer)
        name = self.auth.name_of(client_key)
        tenant = self.directory.tenant_of(name)
        if tenant is None:
            raise CacheError(p.ErrorCode.UNAUTHORIZED,
                             f"unauthorized: client key {name!r} belongs to no tenant")
        return self.partitions[tenant.name]

    def _register(self: CacheServer, identity: bytes, req: p.Register, now: float) -> p.Reply:
        session = self.sessions[identity]
        partition = session.partition
        salt, tenant = req.salt, partition.tenant
        if tenant is not None:
            # The tenant's salt, whatever the client says; a claim of another one is refused.
            if salt and salt != tenant.namespace_salt:
                raise CacheError(p.ErrorCode.UNAUTHORIZED,
                                 "unauthorized: this salt is not your tenant's (send none, or "
                                 "your tenant's)")
            if not tenant.allows_model(req.model):
                raise CacheError(p.ErrorCode.UNAUTHORIZED,
                                 f"unauthorized: tenant {tenant.name} may not cache model "
                                 f"{req.model[:200]!r}")
            salt = tenant.namespace_salt
        core = partition.core
        known = len(core.index.namespaces)
        info = core.register(req.model, req.geometry, req.world_size, salt)
        handle = self.handles.issue(partition, info.id)
        log.info(
            "Registered KV cache for engine %s (%d layers, %s) model %s, TP %d%s: "
            "namespace %d%s, %d bytes per chunk per rank%s",
            session.engine_id, req.geometry.num_layers, req.geometry.describe(), req.model,
            req.world_size, ", salted" if salt else "", info.id,
            f" of tenant {partition.name}" if partition.name else "", info.slot_bytes,
            "" if len(core.index.namespaces) > known else " (existing)",
        )
        return p.RegisterReply(
            req_id=req.req_id,
            namespace=handle,
            namespace_digest=info.digest,
            slot_bytes=info.slot_bytes,
            chunk_tokens=info.chunk_tokens,
        )

    def _lookup(self: CacheServer, identity: bytes, req: p.Lookup, now: float) -> p.Reply:
        partition = self.sessions[identity].partition
        namespace = self.handles.resolve(partition, req.namespace)
        hits, lease, offsets, pending = partition.core.lookup_and_prefetch(
            identity, namespace, req.keys, req.lease_ms, now
        )
        if self.metrics is not None:
            self.metrics.observe_lookup_latency(self.clock() - now)
        return p.LookupReply(
            req_id=req.req_id, hit_chunks=hits, lease=lease, offsets=offsets, pending=pending
        )

    def _reserve(self: CacheServer, identity: bytes, req: p.Reserve, now: float) -> p.Reply:
        partition = self.sessions[identity].partition
        namespace = self.handles.resolve(partition, req.namespace)
        rid, status, offsets = partition.core.reserve(
            identity, namespace, req.rank, req.keys, req.ttl_ms, now, parent=req.parent
        )
        return p.ReserveReply(req_id=req.req_id, reservation=rid, status=status, offsets=offsets)

    def _commit(self: CacheServer, identity: bytes, req: p.Commit, now: float) -> p.Reply:
        n = self.sessions[identity].partition.core.commit(identity, req.reservation, now)
        return p.CommitReply(req_id=req.req_id, committed=n)

    def _abort(self: CacheServer, identity: bytes, req: p.Abort, now: float) -> p.Reply:
        self.sessions[identity].partition.core.abort(identity, req.reservation)
        return p.OkReply(req_id=req.req_id)

    def _acquire(self: CacheServer, identity: bytes, req: p.Acquire, now: float) -> p.Reply:
        partition = self.sessions[identity].partition
        namespace = self.handles.resolve(partition, req.namespace)
        lease, offsets = partition.core.acquire(
            identity, namespace, req.rank, req.keys, req.lease_ms, now
        )
        return p.AcquireReply(req_id=req.req_id, lease=lease, offsets=offsets)

    def _release(self: CacheServer, identity: bytes, req: p.Release, now: float) -> p.Reply:
        if len(req.leases) > p.MAX_KEYS_PER_REQUEST or len(req.retrieved) > p.MAX_KEYS_PER_REQUEST:
            raise CacheError(p.ErrorCode.TOO_LARGE, "too many leases in one release")
        self.sessions[identity].partition.core.release(identity, req.leases, now, req.retrieved)
        return p.OkReply(req_id=req.req_id)

    def _heartbeat(self: CacheServer, identity: bytes, req: p.Heartbeat, now: float) -> p.Reply:
        return p.OkReply(req_id=req.req_id)

    def _get_stats(self: CacheServer, identity: bytes, req: p.GetStats, now: float) -> p.Reply:
        if self.directory is None:
            return p.StatsReply(req_id=req.req_id, stats=self.stats(now))
        # A tenant's engine sees its own partition only: nothing of the other tenants.
        return p.StatsReply(req_id=req.req_id,
                            stats=self.stats(now, [self.sessions[identity].partition]))

    def _goodbye(self: CacheServer, identity: bytes, req: p.Goodbye, now: float) -> p.Reply:
        session = self.sessions.get(identity)
        if session is not None:
            self._end_session(session, "said goodbye")
        return p.OkReply(req_id=req.req_id)
