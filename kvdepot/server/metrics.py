"""Prometheus metrics of one cache server.

Two kinds of figures live here, fed two ways:

* Events, observed by the RPC thread as they happen (``observe_*``, ``count_*``): latency
  histograms and the counters of what moved. These sit on the request path, so every call is
  cheap: counters are pre-bound prometheus-client children (no ``.labels()`` lookup, which
  alone costs more than an increment), and histograms are ``_Histogram``s, bucket counts in a
  list that a scrape turns into samples (an observation is one bisect and two additions; a
  prometheus-client histogram took ~3 us of the ~35 us a lookup costs the server).
* State, copied from a ``ServerStats`` snapshot by the HTTP thread right before a scrape
  (``update_from_stats``): gauges such as buffer use and connected engines. Reading them at
  scrape time costs the request path nothing.

Each ``ServerMetrics`` owns its own ``CollectorRegistry`` rather than the process-wide default,
so several servers can live in one process (the tests start many) without name clashes.

The metric names are an interface: deploy/grafana/kvdepot-dashboard.json and docs/deploy.md
use them, and tests/test_deploy_manifests.py checks that the dashboard names only these.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from kvdepot.protocol import Batch, ErrorCode, ServerStats, SingleRequest, wire_tag
from kvdepot.server.tenant_metrics import TenantMetrics
from kvdepot.server.tier_metrics import TierMetrics

# Server-side lookups are an index walk: tens of microseconds, a millisecond when the RPC
# thread is busy. The buckets span that range and a long tail for a stalled server.
LOOKUP_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
)  # fmt: skip

# A store spans Reserve..Commit and a retrieve Acquire..Release, so they include the engine's
# copy of the bytes: one 40 MiB chunk takes ~1 ms at 50 GB/s, a 32k-token prompt ~100 ms,
# pageable or CPU copies ten times that.
TRANSFER_BUCKETS = (
    250e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

# Any one request, as the RPC thread handled it (decode, state change, encode).
REQUEST_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3, 250e-3, 1.0,
)  # fmt: skip

# Label values created up front, so that every series exists (at 0) from the first scrape:
# rate() and dashboards then work before the first error or request of a kind.
KNOWN_REQUEST_TYPES = tuple(wire_tag(t) for t in SingleRequest.__args__) + (wire_tag(Batch),)
KNOWN_ERROR_CODES = tuple(code.name for code in ErrorCode)


class _Series:
    """One histogram series: per-bucket counts (the last one past every bound) and the sum.
    Written by one thread; a scrape on another reads a copy, at worst an observation short."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: "le"
        self.sum += value


class _Histogram:
    """A Prometheus histogram family of ``_Series``, exported as _bucket/_sum/_count samples
    when the registry collects it."""

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...],
                 label_names: tuple[str, ...], registry: CollectorRegistry) -> None:
        self.name, self.doc, self.bounds, self.label_names = name, doc, bounds, label_names
        self._series: dict[tuple[str, ...], _Series] = {}
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]
        if not label_names:
            self.observe = self.labels().observe
        registry.register(self)

    def labels(self, *values: str) -> _Series:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = _Series(self.bounds)
        return series

    def describe(self):
        return [HistogramMetricFamily(self.name, self.doc, labels=self.label_names)]

    def collect(self):
        family = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        for values, series in list(self._series.items()):
            total, buckets = 0, []
            for le, count in zip(self._les, list(series.counts)):
                total += count
                buckets.append((le, total))
            family.add_metric(list(values), buckets, series.sum)
        return [family]


class ServerMetrics:
    """The metrics of one server, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, lookup_totals_from_stats: bool = False) -> None:
        """lookup_totals_from_stats: the server calls observe_lookup_latency on its hot path
        and lets the hit/miss counters follow its snapshots instead of observe_lookup."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._lookup_totals_from_stats = lookup_totals_from_stats
        self._last_lookup_totals: dict[str, int] = {}
        self._define_event_metrics()
        self._define_state_metrics()
        # update_from_stats may run on several HTTP threads at once (two scrapers); the lock
        # keeps the counter deltas it derives from snapshots from being applied twice.
        self._stats_lock = threading.Lock()
        self._last_expired_leases = 0
        self._last_expired_reservations = 0
        self._info_labels: tuple[str, str] | None = None

    # --- definitions -------------------------------------------------------------------------

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def _histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
    ) -> _Histogram:
        return _Histogram(name, doc, buckets, labels, self.registry)

    def _define_event_metrics(self) -> None:
        self.lookup_seconds = self._histogram(
            "kvdepot_lookup_duration_seconds",
            "Server-side time to answer one Lookup.",
            LOOKUP_BUCKETS,
        )
        lookup_chunks = self._counter(
            "kvdepot_lookup_chunks",
            "Chunks asked for by lookups, by result (hit: a leading chunk every rank has).",
            ("result",),
        )
        lookup_tokens = self._counter(
            "kvdepot_lookup_tokens",
            "Tokens asked for by lookups, by result.",
            ("result",),
        )
        self._hit_chunks = lookup_chunks.labels("hit")
        self._miss_chunks = lookup_chunks.labels("miss")
        self._hit_tokens = lookup_tokens.labels("hit")
        self._miss_tokens = lookup_tokens.labels("miss")

        self.store_seconds = self._histogram(
            "kvdepot_store_duration_seconds",
            "Time from Reserve to Commit of one store, engine copy included.",
            TRANSFER_BUCKETS,
        )
        self._stored_chunks = self._counter("kvdepot_stored_chunks", "Chunks committed.")
        self._stored_tokens = self._counter("kvdepot_stored_tokens", "Tokens committed.")
        self._stored_bytes = self._counter("kvdepot_stored_bytes", "Bytes committed.")

        self.retrieve_seconds = self._histogram(
            "kvdepot_retrieve_duration_seconds",
            "Time from Acquire to Release of one retrieve, engine copy included.",
            TRANSFER_BUCKETS,
        )
        self._retrieved_chunks = self._counter("kvdepot_retrieved_chunks", "Chunks read.")
        self._retrieved_tokens = self._counter("kvdepot_retrieved_tokens", "Tokens read.")
        self._retrieved_bytes = self._counter("kvdepot_retrieved_bytes", "Bytes read.")

        request_seconds = self._histogram(
            "kvdepot_request_duration_seconds",
            "Server-side handling time of one request, by request type.",
            REQUEST_BUCKETS,
            ("type",),
        )
        self._request_seconds = request_seconds
        self._request_children = {kind: request_seconds.labels(kind) for kind in KNOWN_REQUEST_TYPES}

        self._evicted_chunks = self._counter(
            "kvdepot_evicted_chunks", "Chunks evicted to make room for new ones."
        )
        errors = self._counter("kvdepot_errors", "Error replies sent, by ErrorCode name.", ("code",))
        self._errors = errors
        self._error_children = {code: errors.labels(code) for code in KNOWN_ERROR_CODES}

        # Kept by the server as running totals; turned into counters from the snapshots.
        self._expired_leases = self._counter(
            "kvdepot_expired_leases",
            "Read leases that ran out before Release (an engine died or stalled mid-load).",
        )
        self._expired_reservations = self._counter(
            "kvdepot_expired_reservations",
            "Reservations that ran out before Commit (an engine died or stalled mid-store).",
        )

    def _define_state_metrics(self) -> None:
        self._capacity_bytes = self._gauge(
            "kvdepot_buffer_capacity_bytes", "Size of the shared-memory arena."
        )
        self._used_bytes = self._gauge(
            "kvdepot_buffer_used_bytes", "Arena bytes held by stored or reserved chunks."
        )
        self._free_bytes = self._gauge("kvdepot_buffer_free_bytes", "Arena bytes free.")
        self._chunks = self._gauge("kvdepot_chunks", "Chunks stored now.")
        self._namespaces = self._gauge(
            "kvdepot_namespaces", "Registered namespaces (model, geometry, TP size, salt)."
        )
        self._engines = self._gauge("kvdepot_engines_connected", "Engine sessions connected.")
        self._leases = self._gauge("kvdepot_leases_held", "Read leases held now.")
        self._reservations = self._gauge(
            "kvdepot_reservations_open", "Reservations not yet committed or aborted."
        )
        self._hit_ratio = self._gauge(
            "kvdepot_hit_ratio",
            "Hit chunks over looked-up chunks since the server started (0 before any lookup).",
        )
        self._uptime = self._gauge("kvdepot_uptime_seconds", "Seconds since the server started.")
        self._ready = self._gauge("kvdepot_ready", "1 when the arena is ready to serve, else 0.")
        self._chunk_tokens = self._gauge("kvdepot_chunk_size_tokens", "Tokens per chunk.")
        # Constant 1; the labels tell a restart (new boot_id) apart from a counter reset.
        self._info = self._gauge(
            "kvdepot_server_info", "Server version and boot id.", ("version", "boot_id")
        )
        self._tiers = TierMetrics(self.registry)  # storage tiers below the buffer
        self._tenants = TenantMetrics(self.registry)  # per tenant, with --tenants

    # --- events, from the RPC thread --------------------------------------------------------

    def observe_lookup(
        self, seconds: float, hit_chunks: int, miss_chunks: int, chunk_tokens: int
    ) -> None:
        self.lookup_seconds.observe(seconds)
        self._hit_chunks.inc(hit_chunks)
        self._miss_chunks.inc(miss_chunks)
        self._hit_tokens.inc(hit_chunks * chunk_tokens)
        self._miss_tokens.inc(miss_chunks * chunk_tokens)

    def observe_lookup_latency(self, seconds: float) -> None:
        """The hot-path form: the hit and miss counters follow the core's own totals at
        scrape time (update_from_stats), so a lookup pays for one histogram update only."""
        self.lookup_seconds.observe(seconds)

    def observe_store(self, seconds: float, chunks: int, tokens: int, nbytes: int) -> None:
        self.store_seconds.observe(seconds)
        self._stored_chunks.inc(chunks)
        self._stored_tokens.inc(tokens)
        self._stored_bytes.inc(nbytes)

    def observe_retrieve(self, seconds: float, chunks: int, tokens: int, nbytes: int) -> None:
        self.retrieve_seconds.observe(seconds)
        self._retrieved_chunks.inc(chunks)
        self._retrieved_tokens.inc(tokens)
        self._retrieved_bytes.inc(nbytes)

    def observe_request(self, kind: str, seconds: float) -> None:
        child = self._request_children.get(kind)
        if child is None:  # a request type added after this module: still counted
            child = self._request_children[kind] = self._request_seconds.labels(kind)
        child.observe(seconds)

    def count_evictions(self, n: int) -> None:
        self._evicted_chunks.inc(n)

    def count_error(self, code: str) -> None:
        child = self._error_children.get(code)
        if child is None:
            child = self._error_children[code] = self._errors.labels(code)
        child.inc()

    # --- state, from the HTTP thread ---------------------------------------------------------

    def update_from_stats(self, stats: ServerStats) -> None:
        with self._stats_lock:
            self._capacity_bytes.set(stats.arena_bytes)
            self._used_bytes.set(stats.used_bytes)
            self._free_bytes.set(stats.free_bytes)
            self._chunks.set(stats.chunks)
            self._namespaces.set(stats.namespaces)
            self._engines.set(stats.engines_connected)
            self._leases.set(stats.leases_held)
            self._reservations.set(stats.reservations_open)
            looked_up = stats.hit_chunks + stats.miss_chunks
            self._hit_ratio.set(stats.hit_chunks / looked_up if looked_up else 0.0)
            self._uptime.set(stats.uptime_s)
            self._ready.set(1 if stats.ready else 0)
            self._chunk_tokens.set(stats.chunk_tokens)
            self._set_info(stats.version, stats.boot_id)
            if self._lookup_totals_from_stats:
                for name, child in (
                    ("hit_chunks", self._hit_chunks), ("miss_chunks", self._miss_chunks),
                    ("hit_tokens", self._hit_tokens), ("miss_tokens", self._miss_tokens),
                ):
                    total = getattr(stats, name)
                    child.inc(max(0, total - self._last_lookup_totals.get(name, 0)))
                    self._last_lookup_totals[name] = max(self._last_lookup_totals.get(name, 0), total)
            self._expired_leases.inc(max(0, stats.expired_leases - self._last_expired_leases))
            self._last_expired_leases = max(self._last_expired_leases, stats.expired_leases)
            self._expired_reservations.inc(
                max(0, stats.expired_reservations - self._last_expired_reservations)
            )
            self._last_expired_reservations = max(
                self._last_expired_reservations, stats.expired_reservations
            )
            for tier in stats.tiers:
                self._tiers.update(tier)
            for tenant in stats.tenants:
                self._tenants.update(tenant)

    def _set_info(self, version: str, boot_id: str) -> None:
        labels = (version, boot_id)
        if labels != self._info_labels:
            self._info.clear()  # one series only, never a stale boot id beside the new one
            self._info.labels(*labels).set(1)
            self._info_labels = labels

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric, for GET /metrics."""
        return generate_latest(self.registry)
