"""The remote tier: chunks shared by the servers of many nodes through a Redis/Valkey Cluster.

The cluster does the hard parts: it shards keys over its masters (hash slots), replicates
them, fails over, evicts under ``maxmemory`` and expires keys (every key is written with the
tier's TTL). This tier only lays chunks out (manifest.py), moves their bytes between the
arena and the cluster through kvdepot's own RESP client (resp/: straight from and into
the arena's pages), and checks everything it reads.

- Writes (``write``): if the chunk's manifest is there already (another node stored the same
  prefix), only the TTL of its keys is renewed; else the parts, then the manifest. A part that
  fails leaves no manifest, so nothing half-written is ever read.
- Reads (``read``): the manifest and every part in one pipeline, the parts straight into the
  arena slot; the manifest must name this chunk and rank, the parts' lengths and CRC32Cs must
  match it. Anything else (evicted, expired, overwritten, another format) is a miss, and the
  debris of our format is deleted.
- Lookups (``probe``): the manifests of every rank of up to 64 consecutive chunks, one
  pipeline per node; the chunks from the first on whose every rank has a readable manifest of
  the right size.
- ``delete`` deletes nothing: the core forgetting a place is no reason to take a chunk from
  other nodes; the cluster's TTL and maxmemory policy decide.
- A node down or slow: its calls fail at once (backoff) or at their deadline; a failed call is
  a miss for the engine (a probe finding nothing, a load that fails), never an engine error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator

import crc32c

from kvdepot import protocol as p
from kvdepot.server.effects import Delete, Demote, Prefetch, Probe
from kvdepot.server.locations import RemoteKey
from kvdepot.server.tiers.base import StoredChunk, TierError, TierIO, TierSpec
from kvdepot.server.tiers.resp import Call, Filled, RemoteClient, RemoteError
from kvdepot.server.tiers.manifest import (
    PART_BYTES, BadManifest, ChunkKeys, Manifest, OtherVersion, chunk_keys, part_spans, unpack,
)

log = logging.getLogger("kvdepot.server")

WRITE_POLICIES = ("write-through", "on-evict", "off")
_RETRY_START_S = 5.0  # a tier whose cluster was unreachable at start tries again this often
_LOG_EVERY_S = 60.0
_OK = b"OK"


class RemoteTier:
    """A ``Tier`` (base.py) on a Redis/Valkey Cluster or server, shared with other nodes.

    ``known_bytes``: how many bytes of chunks in the cluster the core keeps places of (what
    this node wrote or found there); a place forgotten past it is only forgotten. ``timeout_s``:
    the deadline of a write, and of a read beyond the prefetch deadline's own. ``quota_bytes``:
    a tenant's quota (None: none): the bytes this node writes or renews within one TTL, so the
    bytes it keeps alive in the cluster never exceed it (every key expires a TTL after its last
    write); a write past it fails ("over quota") and is counted as a write error."""

    def __init__(
        self, client: RemoteClient, *, key_prefix: str, ttl_s: int, write_policy: str,
        known_bytes: int, queue_depth: int = 16, timeout_s: float = 2.0,
        probe_timeout_s: float = 1.0, name: str = "remote", settings: dict[str, str] | None = None,
        quota_bytes: int | None = None,
    ):
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"remote write policy {write_policy!r}: one of {WRITE_POLICIES}")
        if ttl_s < 1 or queue_depth < 1 or timeout_s <= 0 or probe_timeout_s <= 0:
            raise ValueError("the remote TTL, queue depth and timeouts must be positive")
        if not key_prefix or any(c in key_prefix for c in "{} \r\n"):
            raise ValueError(f"remote key prefix {key_prefix!r}: no braces, spaces or newlines")
        self.client = client
        self.prefix = key_prefix.encode()
        self.ttl_ms = b"%d" % (ttl_s * 1000)
        self.ttl_s = ttl_s
        self.quota_bytes = quota_bytes
        self._charged: deque[tuple[float, int]] = deque()  # (when, bytes) of the last TTL
        self._charged_bytes = 0
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        self._lock = threading.Lock()
        self._started = False
        self._next_start = 0.0
        self._logged: dict[str, float] = {}
        self.io = TierIO(settings={
            "write_policy": write_policy, "ttl_s": str(ttl_s), "key_prefix": key_prefix,
            **(settings or {}),
        })
        self.spec = TierSpec(
            name, known_bytes, queue_depth, self._locate,
            write_through=write_policy == "write-through", writes=write_policy != "off",
            shared=True,
        )

    def start(self) -> None:
        """Connect, authenticate, learn the topology. A failure is logged with its reason and
        the tier answers misses, trying again every few seconds; the server serves on."""
        with self._lock:
            self._connect_locked(first=True)

    def close(self) -> None:
        self.client.close()

    # --- Tier -------------------------------------------------------------------------------

    def _locate(self, digest: bytes, key: bytes, rank: int) -> RemoteKey:
        return RemoteKey(chunk_keys(self.prefix, digest, key, rank).manifest)

    def write(self, job: Demote, source: memoryview) -> None:
        keys = chunk_keys(self.prefix, job.namespace, job.key, job.rank)
        deadline = time.monotonic() + self.timeout_s
        try:
            self._charge(job.nbytes)
            self._ensure_started()
            if self._renew_if_stored(keys, job, deadline):
                return
            spans = part_spans(job.nbytes)
            crcs = tuple(crc32c.crc32c(source[off : off + n]) for off, n in spans)
            parts = [
                Call((b"SET", keys.part(i), source[off : off + n], b"PX", self.ttl_ms))
                for i, (off, n) in enumerate(spans)
            ]
            self._expect_ok(self.client.run(parts, deadline), "part")
            manifest = Manifest(job.namespace, job.key, job.rank, job.nbytes, crcs).pack()
            self._expect_ok(
                self.client.run([Call((b"SET", keys.manifest, manifest, b"PX", self.ttl_ms))], deadline),
                "manifest",
            )
        except (RemoteError, TierError) as exc:
            with self._lock:
                self.io.write_errors += 1
            raise self._error("write", exc) from exc
        with self._lock:
            self.io.writes += 1
            self.io.written_bytes += job.nbytes

    def read(self, job: Prefetch, target: memoryview) -> None:
        keys = chunk_keys(self.prefix, job.namespace, job.key, job.rank)
        spans = part_spans(job.nbytes)
        calls = [Call((b"GET", keys.manifest))] + [
            Call((b"GET", keys.part(i)), into=target[off : off + n], checksum=True)
            for i, (off, n) in enumerate(spans)
        ]
        deadline = time.monotonic() + self.timeout_s
        try:
            self._ensure_started()
            replies = self.client.run(calls, deadline)
        except (RemoteError, TierError) as exc:
            with self._lock:
                self.io.read_errors += 1
            raise self._error("read", exc) from exc
        finally:
            del calls  # the views into the arena slot go now
        try:
            self._check_read(job, spans, replies)
        except BadManifest as exc:
            counter = "read_errors" if isinstance(exc, _Gone) else "bad_files"
            if isinstance(exc, _CorruptPart):
                counter = "checksum_failures"
            with self._lock:
                setattr(self.io, counter, getattr(self.io, counter) + 1)
            if not isinstance(exc, OtherVersion):
                self._delete_debris(keys, len(spans))
            raise self._error("read", exc) from exc
        with self._lock:
            self.io.reads += 1
            self.io.read_bytes += job.nbytes

    def probe(self, job: Probe) -> int:
        """TierError when the store could not answer for the first chunk (a miss, counted as
        a failed probe); a failure after some were found answers those."""
        deadline = time.monotonic() + self.probe_timeout_s
        self._ensure_started()
        batches = [
            [Call((b"GET", chunk_keys(self.prefix, job.namespace, key, rank).manifest))
             for rank in range(job.world_size)]
            for key in job.keys
        ]
        results = self.client.run_many(batches, deadline)
        found = 0
        for key, replies in zip(job.keys, results):
            if isinstance(replies, RemoteError):
                error = self._error("probe", replies)
                if not found:
                    raise error
                break
            if not all(_names(r, job, key, rank) for rank, r in enumerate(replies)):
                break
            found += 1
        return found

    def delete(self, job: Delete) -> None:
        """Nothing: see the module's docstring."""

    def scan(self) -> Iterator[StoredChunk]:
        return iter(())

    def nodes(self) -> list[p.TierNode]:
        return [
            p.TierNode(
                address=n.address, role=n.role, connected=n.connected, bytes_sent=n.bytes_sent,
                bytes_received=n.bytes_received, calls=n.calls, errors=n.errors,
                last_error=n.last_error or "",
            )
            for n in self.client.nodes()
        ]

    # --- helpers ----------------------------------------------------------------------------

    def _charge(self, nbytes: int) -> None:
        """Count a write (or renewal) of ``nbytes`` against the quota; TierError past it."""
        if self.quota_bytes is None:
            return
        with self._lock:
            now = time.monotonic()
            charged = self._charged
            while charged and charged[0][0] <= now - self.ttl_s:
                self._charged_bytes -= charged.popleft()[1]
            if self._charged_bytes + nbytes > self.quota_bytes:
                raise TierError(f"over quota: {self.quota_bytes} bytes written per "
                                f"{self.ttl_s} s TTL")
            charged.append((now, nbytes))
            self._charged_bytes += nbytes

    def _ensure_started(self) -> None:
        if self._started:
            return
        with self._lock:
            if not self._started and time.monotonic() >= self._next_start:
                self._connect_locked(first=False)
            if not self._started:
                raise TierError(f"the remote store is not connected: {self.io.last_error}")

    def _connect_locked(self, first: bool) -> None:
        try:
            self.client.start()
        except RemoteError as exc:
            self._next_start = time.monotonic() + _RETRY_START_S
            self.io.last_error = f"connect: {exc}"
            if first:
                log.error(
                    "Remote tier: cannot use %s (%s); serving from memory%s without it, "
                    "trying again every %.0f s", self.io.settings.get("urls", "the cluster"),
                    str(exc).rstrip(". "), " and disk" if self.io.settings.get("beside_disk") else "",
                    _RETRY_START_S,
                )
            return
        self._started = True
        if not first:
            log.info("Remote tier: connected to %s", self.io.settings.get("urls", "the cluster"))

    def _renew_if_stored(self, keys: ChunkKeys, job: Demote, deadline: float) -> bool:
        """Is the chunk stored already (by another node, or before a restart)? Then renew the
        TTL of its keys and report True."""
        (reply,) = self.client.run([Call((b"GET", keys.manifest))], deadline)
        if not isinstance(reply, bytes):
            return False
        try:
            stored = unpack(reply)
        except BadManifest:
            return False
        if (stored.namespace, stored.key, stored.rank, stored.payload_bytes) != (
            job.namespace, job.key, job.rank, job.nbytes
        ) or stored.part_bytes != PART_BYTES:
            return False
        renew = [Call((b"PEXPIRE", keys.part(i), self.ttl_ms)) for i in range(len(stored.part_crcs))]
        renew.append(Call((b"PEXPIRE", keys.manifest, self.ttl_ms)))
        replies = self.client.run(renew, deadline)
        if any(r != 1 for r in replies):
            return False  # a part is gone: write it all again
        with self._lock:
            self.io.already_stored += 1
        return True

    def _check_read(self, job: Prefetch, spans: list[tuple[int, int]], replies: list) -> None:
        head = replies[0]
        if head is None:
            raise _Gone("no manifest (expired, evicted, or never stored)")
        if not isinstance(head, bytes):
            raise BadManifest(f"the manifest key holds {type(head).__name__}")
        manifest = unpack(head)
        if (manifest.namespace, manifest.key, manifest.rank, manifest.payload_bytes) != (
            job.namespace, job.key, job.rank, job.nbytes
        ):
            raise BadManifest("the manifest names another chunk")
        if manifest.part_bytes != PART_BYTES or len(manifest.part_crcs) != len(spans):
            raise BadManifest("the manifest's parts do not match this chunk's size")
        # The parts' CRCs were computed as their bytes arrived (Call.checksum): the slot is
        # not read a second time.
        for i, ((_off, n), got, crc) in enumerate(zip(spans, replies[1:], manifest.part_crcs)):
            if got is None:
                raise _Gone(f"part {i} is gone (evicted)")
            if not isinstance(got, Filled):
                raise _CorruptPart(f"part {i} holds {got!r} bytes, the manifest says {n}")
            if got.crc32c != crc:
                raise _CorruptPart(f"part {i} checksum (CRC32C) mismatch")

    def _delete_debris(self, keys: ChunkKeys, parts: int) -> None:
        try:
            calls = [Call((b"DEL", keys.manifest))]
            calls += [Call((b"DEL", keys.part(i))) for i in range(parts)]
            self.client.run(calls, time.monotonic() + self.timeout_s)
        except RemoteError as exc:
            self._error("delete", exc)

    def _expect_ok(self, replies: list, what: str) -> None:
        for reply in replies:
            if reply != _OK:
                raise TierError(f"{what} SET answered {reply!r}")

    def _error(self, op: str, exc: BaseException) -> TierError:
        self.io.last_error = f"{op}: {exc}"
        what = f"{op}: {type(exc).__name__}"
        now = time.monotonic()
        if now - self._logged.get(what, -_LOG_EVERY_S) >= _LOG_EVERY_S:  # once a minute a kind
            self._logged[what] = now
            log.warning("Remote tier: %s", self.io.last_error)
        return TierError(self.io.last_error)


class _Gone(BadManifest):
    """A key of the chunk is missing: a miss, not corruption."""


class _CorruptPart(BadManifest):
    """A part of the wrong length or CRC."""


def _names(reply: object, job: Probe, key: bytes, rank: int) -> bool:
    """Is ``reply`` a readable manifest of this rank of this chunk, of the right size?"""
    if not isinstance(reply, bytes):
        return False
    try:
        m = unpack(reply)
    except BadManifest:
        return False
    return (m.namespace, m.key, m.rank, m.payload_bytes) == (job.namespace, key, rank, job.slot_bytes)
