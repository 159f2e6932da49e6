"""The stats snapshot a server publishes (/stats, kvdepot status, GetStats)."""

from __future__ import annotations

from kvdepot import __version__
from kvdepot import protocol as p
from kvdepot.server.cache import CacheCore


def collect_stats(
    core: CacheCore, *, boot_id: str, uptime_s: float, ready: bool, engines_connected: int,
    errors: dict[str, int],
) -> p.ServerStats:
    """What ``core`` holds and did; RPC thread (other threads read the published copy)."""
    alloc, c = core.allocator, core.counters
    return p.ServerStats(
        version=__version__,
        boot_id=boot_id,
        uptime_s=uptime_s,
        ready=ready,
        arena_bytes=alloc.capacity,
        used_bytes=alloc.used_bytes,
        free_bytes=alloc.free_bytes,
        chunk_tokens=core.chunk_tokens,
        chunks=len(core.index),
        namespaces=len(core.index.namespaces),
        engines_connected=engines_connected,
        leases_held=len(core.leases),
        reservations_open=len(core.reservations),
        lookups=c.lookups,
        hit_chunks=c.hit_chunks,
        miss_chunks=c.miss_chunks,
        hit_tokens=c.hit_tokens,
        miss_tokens=c.miss_tokens,
        stored_chunks=c.stored_chunks,
        stored_tokens=c.stored_tokens,
        stored_bytes=c.stored_bytes,
        retrieved_chunks=c.retrieved_chunks,
        retrieved_tokens=c.retrieved_tokens,
        retrieved_bytes=c.retrieved_bytes,
        evicted_chunks=c.evicted_chunks,
        expired_leases=c.expired_leases,
        expired_reservations=c.expired_reservations,
        errors=dict(errors),
    )
