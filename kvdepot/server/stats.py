"""The stats snapshot a server publishes (/stats, kvdepot status, GetStats)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kvdepot import __version__
from kvdepot import protocol as p
from kvdepot.server.cache import CacheCore
from kvdepot.server.tiers import Tier

if TYPE_CHECKING:
    from kvdepot.server.partition import CachePartition


def collect_stats(
    partitions: Sequence[CachePartition], *, boot_id: str, uptime_s: float, ready: bool,
    errors: dict[str, int], tenants: bool = False,
) -> p.ServerStats:
    """What the partitions hold and did, summed; RPC thread (other threads read the published
    copy). ``tenants``: the partitions are tenants': each gets a TenantStats row, and its
    tiers' rows are named ``TENANT/TIER``."""
    totals = dict.fromkeys(_SUMMED, 0)
    tier_rows: list[p.TierStats] = []
    tenant_rows: list[p.TenantStats] = []
    for partition in partitions:
        core, alloc, c = partition.core, partition.core.allocator, partition.core.counters
        own = {
            "arena_bytes": alloc.capacity, "used_bytes": alloc.used_bytes,
            "free_bytes": alloc.free_bytes, "chunks": len(core.index),
            "namespaces": len(core.index.namespaces), "engines_connected": partition.sessions,
            "leases_held": len(core.leases), "reservations_open": len(core.reservations),
            **{name: getattr(c, name) for name in _COUNTERS},
        }
        for name, value in own.items():
            totals[name] += value
        rows = tier_stats(core, partition.tiers)
        if tenants:
            for row in rows:
                row.name = f"{partition.name}/{row.name}"
            tenant = partition.tenant
            tenant_rows.append(p.TenantStats(
                name=partition.name,
                **{f: own[f] for f in _TENANT_FIELDS},
                disk_quota_bytes=tenant.disk_bytes if tenant is not None else 0,
                remote_quota_bytes=tenant.remote_bytes if tenant is not None else 0,
            ))
        tier_rows.extend(rows)
    return p.ServerStats(
        version=__version__,
        boot_id=boot_id,
        uptime_s=uptime_s,
        ready=ready,
        chunk_tokens=partitions[0].core.chunk_tokens,
        errors=dict(errors),
        tiers=tier_rows,
        tenants=tenant_rows,
        **totals,
    )


_COUNTERS = (
    "lookups", "hit_chunks", "miss_chunks", "hit_tokens", "miss_tokens", "stored_chunks",
    "stored_tokens", "stored_bytes", "retrieved_chunks", "retrieved_tokens", "retrieved_bytes",
    "evicted_chunks", "expired_leases", "expired_reservations",
)
_SUMMED = (
    "arena_bytes", "used_bytes", "free_bytes", "chunks", "namespaces", "engines_connected",
    "leases_held", "reservations_open", *_COUNTERS,
)
_TENANT_FIELDS = (
    "arena_bytes", "used_bytes", "chunks", "namespaces", "engines_connected", "leases_held",
    "reservations_open", "hit_chunks", "miss_chunks", "stored_bytes", "evicted_chunks",
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
