"""The stats snapshot a server publishes (/stats, kvdepot status, GetStats)."""

from __future__ import annotations

from collections.abc import Mapping

from kvdepot import __version__
from kvdepot import protocol as p
from kvdepot.server.cache import CacheCore
from kvdepot.server.tiers import Tier


def collect_stats(
    core: CacheCore, *, boot_id: str, uptime_s: float, ready: bool, engines_connected: int,
    errors: dict[str, int], tiers: Mapping[str, Tier] | None = None,
) -> p.ServerStats:
    """What ``core`` holds and did; RPC thread (other threads read the published copy).
    ``tiers``: the lower tiers the core keeps books of, by name (their I/O figures)."""
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
        tiers=tier_stats(core, tiers or {}),
    )


def tier_stats(core: CacheCore, tiers: Mapping[str, Tier]) -> list[p.TierStats]:
    """One TierStats per lower tier: the core's books and the tier's own I/O figures."""
    lower = core.places.lower
    if lower is None:
        return []
    out = []
    for name, books in lower.books.items():
        io, k = tiers[name].io, books.counters  # a server runs every tier the core books
        out.append(p.TierStats(
            name=name,
            settings=dict(io.settings),
            capacity_bytes=books.spec.capacity_bytes,
            used_bytes=io.used_bytes,  # the medium's count: temporary files in flight too
            files=io.files,
            waiting_files=len(books.orphans),
            copies_in_flight=books.in_flight,
            queue_depth=books.spec.queue_depth,
            writes=io.writes,
            written_bytes=io.written_bytes,
            reads=io.reads,
            read_bytes=io.read_bytes,
            checksum_failures=io.checksum_failures,
            bad_files=io.bad_files,
            temp_files_removed=io.temp_files_removed,
            write_errors=io.write_errors,
            read_errors=io.read_errors,
            dropped_writes=k.dropped_writes,
            not_admitted=k.not_admitted,
            prefetch_started=k.prefetch_started,
            prefetch_landed=k.prefetch_landed,
            prefetch_timeouts=k.prefetch_timeouts,
            prefetch_skipped=k.prefetch_skipped,
            read_bytes_per_s=books.read_bytes_per_s,
            last_error=io.last_error,
            probes=k.probes,
            probe_found=k.probe_found,
            probe_errors=k.probe_errors,
            already_stored=io.already_stored,
            nodes=tiers[name].nodes(),
        ))
    return out
