"""Partitions: one cache per tenant, side by side in one server process.

A partition is a core (index, allocator, eviction order, lower tiers' books), the shared-memory
arena its slots are in, and the workers that copy between that arena and its lower tiers. A
server without tenants has one partition, named ""; with a tenant file (tenants.py), one per
tenant, each with its own segment (its own owner and mode: an engine can map only its
tenant's KV), its own buffer size (its quota), its own disk directory and quota, and its own
remote-tier budget. Nothing is shared between partitions but the RPC thread and the worker
pool, so one tenant's stores can evict only its own chunks, and a lookup of another tenant's
prefix takes the same path as any miss.

Namespace handles are what engines name a namespace by on the wire: random 62-bit numbers, not
ordinals, bound to the partition that issued them (``NamespaceHandles``), so a client can
neither guess another tenant's handle nor use one it learnt.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvdepot.protocol import ErrorCode
from kvdepot.server.arena import SharedArena
from kvdepot.server.cache import CacheCore
from kvdepot.server.errors import CacheError
from kvdepot.server.tenants import TenantSpec
from kvdepot.server.tiers import Tier
from kvdepot.server.workers import TierWorkers

_HANDLE_BITS = 62  # a msgpack int of 8 bytes; 2^62 candidates leave nothing to guess


@dataclass(frozen=True)
class PartitionPlan:
    """What a partition is made of before the server runs it: its core, its arena (whose
    boot id must be the server's), the lower tiers its core keeps books of, by name, and its
    tenant (None: the server without tenants)."""

    core: CacheCore
    arena: SharedArena
    tiers: Mapping[str, Tier] = field(default_factory=dict)
    tenant: TenantSpec | None = None


@dataclass(eq=False)
class CachePartition:
    """One tenant's cache (``name`` "" and ``tenant`` None: the server without tenants)."""

    name: str
    core: CacheCore
    arena: SharedArena
    workers: TierWorkers
    tenant: TenantSpec | None = None
    sessions: int = 0  # engines connected to it now
    # Its namespaces' wire handles by the core's namespace id.
    handles: dict[int, int] = field(default_factory=dict)

    @property
    def tiers(self) -> dict[str, Tier]:
        return self.workers.tiers

    def start_effects(self) -> None:
        """Hand what the core asks for to the workers; RPC thread."""
        effects = self.core.take_effects()
        if effects:
            self.workers.start(effects)


class NamespaceHandles:
    """Wire handle -> (partition, the core's namespace id); RPC thread only."""

    def __init__(self) -> None:
        self._owners: dict[int, tuple[CachePartition, int]] = {}

    def issue(self, partition: CachePartition, namespace: int) -> int:
        """The handle of ``namespace`` of ``partition``: the same one every time it is asked
        (engines of one model share a namespace), a new random one the first time."""
        handle = partition.handles.get(namespace)
        if handle is None:
            handle = secrets.randbits(_HANDLE_BITS)
            while handle in self._owners:
                handle = secrets.randbits(_HANDLE_BITS)
            self._owners[handle] = (partition, namespace)
            partition.handles[namespace] = handle
        return handle

    def resolve(self, partition: CachePartition, handle: int) -> int:
        """The core's namespace id behind ``handle``, which must be ``partition``'s. Raises
        CacheError(UNKNOWN_NAMESPACE) otherwise, with the same message whether the handle is
        another partition's or nobody's: nothing is revealed."""
        owner = self._owners.get(handle)
        if owner is None or owner[0] is not partition:
            raise CacheError(ErrorCode.UNKNOWN_NAMESPACE, f"unknown namespace {handle}")
        return owner[1]
