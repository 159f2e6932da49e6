"""Prometheus metrics of the storage tiers below the buffer (a local disk, a remote store),
one series per tier (label ``tier``; a remote store's servers also by ``node``), all taken from the stats snapshot at scrape time (``TierStats``):
gauges of what a tier holds, counters that follow its running totals, and an info series
whose labels are its settings. Part of ServerMetrics (metrics.py), in its registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvdepot.protocol import TierStats

# TierStats running totals exported as counters: metric name (without _total), help, and
# the TierStats field per label set ({} for none).
TIER_COUNTERS: tuple[tuple[str, str, tuple[str, ...], dict[tuple[str, ...], str]], ...] = (
    ("kvdepot_tier_writes", "Chunk files a tier wrote.", (), {(): "writes"}),
    ("kvdepot_tier_written_bytes", "Payload bytes a tier wrote.", (), {(): "written_bytes"}),
    ("kvdepot_tier_reads", "Chunk files a tier read back into the buffer, verified.", (),
     {(): "reads"}),
    ("kvdepot_tier_read_bytes", "Payload bytes a tier read back.", (), {(): "read_bytes"}),
    ("kvdepot_tier_checksum_failures",
     "Chunk files whose payload CRC32C did not match on read (a miss; the file deleted).", (),
     {(): "checksum_failures"}),
    ("kvdepot_tier_bad_files",
     "Chunk files deleted as unreadable: short, another format version, a bad header.", (),
     {(): "bad_files"}),
    ("kvdepot_tier_temp_files_removed",
     "Temporary files of interrupted writes removed at start.", (), {(): "temp_files_removed"}),
    ("kvdepot_tier_io_errors", "Tier reads and writes that failed, by operation.", ("op",),
     {("read",): "read_errors", ("write",): "write_errors"}),
    ("kvdepot_tier_dropped_writes",
     "Chunk writes never started because the tier's queue was full.", (),
     {(): "dropped_writes"}),
    ("kvdepot_tier_not_admitted",
     "Chunks that left the buffer unwritten: fewer hits than --disk-admit-hits.", (),
     {(): "not_admitted"}),
    ("kvdepot_tier_prefetch_chunks",
     "Chunks loaded from a tier for lookups, by outcome: started, landed, timeout (still "
     "loading at the deadline: missed), skipped (slower than recomputing).", ("outcome",),
     {("started",): "prefetch_started", ("landed",): "prefetch_landed",
      ("timeout",): "prefetch_timeouts", ("skipped",): "prefetch_skipped"}),
    ("kvdepot_tier_probes",
     "Lookups that asked a shared tier for chunks the index did not know, by outcome: asked, "
     "failed (the store could not answer: a miss).", ("outcome",),
     {("asked",): "probes", ("failed",): "probe_errors"}),
    ("kvdepot_tier_probe_found_chunks", "Chunks a shared tier held when asked.", (),
     {(): "probe_found"}),
    ("kvdepot_tier_already_stored",
     "Writes that found the chunk stored already (by another node): only its TTL renewed.", (),
     {(): "already_stored"}),
)
# Per node of a remote store: (metric name, help, TierNode field); counters end in _total.
NODE_COUNTERS = (
    ("kvdepot_remote_node_sent_bytes", "Bytes sent to a node of the remote store.", "bytes_sent"),
    ("kvdepot_remote_node_received_bytes", "Bytes received from a node of the remote store.",
     "bytes_received"),
    ("kvdepot_remote_node_calls", "Pipelines run on a node of the remote store.", "calls"),
    ("kvdepot_remote_node_errors", "Failed calls to a node of the remote store.", "errors"),
)
TIER_GAUGES = (
    ("kvdepot_tier_capacity_bytes", "Bytes a tier may hold at most (--disk-size).", "capacity_bytes"),
    ("kvdepot_tier_used_bytes", "Bytes a tier holds now, temporary files in flight included.",
     "used_bytes"),
    ("kvdepot_tier_files", "Chunk files in a tier (one per chunk and rank).", "files"),
    ("kvdepot_tier_waiting_files",
     "Chunk files found at start waiting for an engine to register their namespace.",
     "waiting_files"),
    ("kvdepot_tier_copies_in_flight", "Writes and loads of a tier in flight.", "copies_in_flight"),
    ("kvdepot_tier_queue_depth", "Writes and loads a tier may have in flight at once.",
     "queue_depth"),
    ("kvdepot_tier_read_bytes_per_second",
     "The load speed the server expects of a tier (measured on its reads).", "read_bytes_per_s"),
)
TIER_INFO_LABELS = ("path", "write_policy", "admit_hits", "direct_io")


class TierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._gauges = [
            (Gauge(name, doc, ("tier",), registry=registry), field) for name, doc, field in TIER_GAUGES
        ]
        self._counters = [
            (name, Counter(name, doc, ("tier", *labels), registry=registry), fields)
            for name, doc, labels, fields in TIER_COUNTERS
        ]
        self._info = Gauge(
            "kvdepot_tier_info", "A tier's settings as labels (constant 1).",
            ("tier", *TIER_INFO_LABELS), registry=registry,
        )
        self._node_up = Gauge(
            "kvdepot_remote_node_up", "1 while a node of the remote store is connected.",
            ("tier", "node", "role"), registry=registry,
        )
        self._node_counters = [
            (name, Counter(name, doc, ("tier", "node"), registry=registry), field)
            for name, doc, field in NODE_COUNTERS
        ]
        self._node_labels: dict[tuple[str, str], tuple[str, ...]] = {}
        self._totals: dict[tuple[str, ...], int] = {}
        self._info_labels: dict[str, tuple[str, ...]] = {}

    def update(self, tier: TierStats) -> None:
        """Follow one tier's snapshot; the caller serializes calls (ServerMetrics' lock)."""
        for gauge, field in self._gauges:
            gauge.labels(tier.name).set(getattr(tier, field))
        for name, counter, fields in self._counters:
            for labels, field in fields.items():
                total, key = getattr(tier, field), (name, tier.name, *labels)
                last = self._totals.get(key, 0)
                counter.labels(tier.name, *labels).inc(max(0, total - last))
                self._totals[key] = max(last, total)
        labels = (tier.name, *(tier.settings.get(k, "") for k in TIER_INFO_LABELS))
        old = self._info_labels.get(tier.name)
        if old != labels:
            if old is not None:
                self._info.remove(*old)  # one series per tier, never a stale setting beside
            self._info.labels(*labels).set(1)
            self._info_labels[tier.name] = labels
        for node in tier.nodes:
            self._follow(self._node_counters, (tier.name, node.address), node)
            up_labels = (tier.name, node.address, node.role)
            old_up = self._node_labels.get((tier.name, node.address))
            if old_up is not None and old_up != up_labels:
                self._node_up.remove(*old_up)  # its role changed (a failover)
            self._node_up.labels(*up_labels).set(1 if node.connected else 0)
            self._node_labels[(tier.name, node.address)] = up_labels

    def _follow(self, counters, labels: tuple[str, ...], source) -> None:
        for name, counter, field in counters:
            total, key = getattr(source, field), (name, *labels)
            last = self._totals.get(key, 0)
            counter.labels(*labels).inc(max(0, total - last))
            self._totals[key] = max(last, total)
