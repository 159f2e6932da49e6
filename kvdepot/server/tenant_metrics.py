"""Prometheus metrics per tenant (a server with --tenants), label ``tenant``, taken from the
stats snapshot at scrape time (``TenantStats``): gauges of what its partition holds and its
quotas, counters that follow its running totals. Part of ServerMetrics (metrics.py).
Tenant names are the operator's, never key material."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvdepot.protocol import TenantStats

# (metric name, help, TenantStats field)
TENANT_GAUGES = (
    ("kvdepot_tenant_buffer_capacity_bytes", "A tenant's own buffer (its segment): its quota.",
     "arena_bytes"),
    ("kvdepot_tenant_buffer_used_bytes", "Bytes of a tenant's buffer in slots.", "used_bytes"),
    ("kvdepot_tenant_chunks", "Chunks in a tenant's index.", "chunks"),
    ("kvdepot_tenant_engines_connected", "Engine sessions of a tenant.", "engines_connected"),
    ("kvdepot_tenant_leases_held", "Leases a tenant's engines hold.", "leases_held"),
    ("kvdepot_tenant_reservations_open", "Reservations a tenant's engines hold open.",
     "reservations_open"),
    ("kvdepot_tenant_disk_quota_bytes", "A tenant's disk-tier quota (0: none).",
     "disk_quota_bytes"),
    ("kvdepot_tenant_remote_quota_bytes",
     "Bytes this node may write or renew for a tenant in the remote tier per TTL (0: none).",
     "remote_quota_bytes"),
)
# Counters (names end in _total in the exposition).
TENANT_COUNTERS = (
    ("kvdepot_tenant_hit_chunks", "Chunks a tenant's lookups hit.", "hit_chunks"),
    ("kvdepot_tenant_miss_chunks", "Chunks a tenant's lookups missed.", "miss_chunks"),
    ("kvdepot_tenant_stored_bytes", "Bytes a tenant's engines stored.", "stored_bytes"),
    ("kvdepot_tenant_evicted_chunks", "Chunks that left a tenant's buffer.", "evicted_chunks"),
)


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._gauges = [(Gauge(name, doc, ("tenant",), registry=registry), field)
                        for name, doc, field in TENANT_GAUGES]
        self._counters = [(name, Counter(name, doc, ("tenant",), registry=registry), field)
                          for name, doc, field in TENANT_COUNTERS]
        self._totals: dict[tuple[str, str], int] = {}

    def update(self, tenant: TenantStats) -> None:
        """Follow one tenant's snapshot; the caller serializes calls (ServerMetrics' lock)."""
        for gauge, field in self._gauges:
            gauge.labels(tenant.name).set(getattr(tenant, field))
        for name, counter, field in self._counters:
            total, key = getattr(tenant, field), (name, tenant.name)
            last = self._totals.get(key, 0)
            counter.labels(tenant.name).inc(max(0, total - last))
            self._totals[key] = max(last, total)
