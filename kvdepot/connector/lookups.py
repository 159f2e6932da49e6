"""The scheduler half's lookups and the leases they hold.

A lookup asks the server which of a request's chunks it has, with a lease so that a hit
cannot be evicted before it is loaded. Per request (``RequestLookups``):

- One lookup in flight at most. Its reply is awaited inline for lookup_wait_ms only (a local
  round trip is far less); a late one is collected on a later call ("ask again" meanwhile),
  and after the client's deadline it counts as a miss. It is never abandoned while the
  request lives: its lease would be held until it expired.
- Its result is kept (``LookupRecord``), so the engine's repeated questions (a request may
  wait for free blocks) cost nothing and take no second lease: a hit while its lease is
  surely alive (half of lease_ms) and the engine's own prefix hit does not shrink, a miss for
  MISS_TTL_S and the same prefix hit. Nothing obtained from an earlier server boot is valid.
- A hit the engine takes hands its lease to the load: an asynchronous load's lease ends
  when the load is reported finished; a synchronous load's when the request is preempted or
  finishes (its slots were read within its first step). Both are released marked as read
  ("retrieved"), so the server counts the hit. A hit the engine does not take gives its lease
  back at once, unread.
- A request that finishes while its asynchronous load is in flight leaves an orphan load:
  its lease goes when the load is reported, at once (no step may follow to release it in).
- A request that finishes with a lookup in flight abandons it: the client gives back its
  lease when the reply arrives, however late.
- Chunks still on their way into the buffer from a lower tier (the reply's ``pending``: the
  server prefetches them under the lease, within its own deadline) make the answer "ask
  again"; every later question looks up afresh (the kept lease goes only after the new lookup
  took its own) until nothing is pending, or until settings.pending_wait_ms have passed since
  the first such answer: then the hit is what is in the buffer.

Releases are batched: one Release per scheduler step (``flush``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from kvdepot.client import KVDepotError, PendingReply, ServerRestarted, ServerUnavailable
from kvdepot.connector.link import ServerLink, session_dropped
from kvdepot.connector.logs import CONNECTOR_LOG

# A miss is remembered this long for a request that waits (for blocks, for its turn): the
# engine asks again every step, and a fresh lookup per step would cost a round trip each time.
MISS_TTL_S = 0.5


class _AskAgain:
    def __repr__(self) -> str:
        return "ASK_AGAIN"


# ``LookupBook.find``'s answer while the reply is not in yet.
ASK_AGAIN = _AskAgain()


@dataclass
class LookupRecord:
    """What one lookup found for a request, kept while it is valid."""

    first: int  # chunk index the lookup started at
    hit: int  # chunks hit from ``first``
    lease: int
    epoch: int  # the client's epoch (server boot) of the reply
    at: float  # time.monotonic() when it came
    offsets: list[int] = field(default_factory=list)  # rank-major slot offsets of the hits
    boot_id: str = ""  # the server boot the offsets belong to
    pending: int = 0  # chunks after the hits that the server is bringing up from a lower tier

    def offsets_of(self, world_size: int, c_lo: int, c_hi: int) -> list[int]:
        """Every rank's offsets of chunks [c_lo, c_hi), rank-major; [] when the reply had none."""
        hit = self.hit
        if not self.offsets or len(self.offsets) != world_size * hit:
            return []
        return [
            self.offsets[r * hit + (c - self.first)] for r in range(world_size) for c in range(c_lo, c_hi)
        ]


@dataclass
class RequestLookups:
    """One request's lookup in flight, its kept result, and the leases its loads hold."""

    pending: PendingReply | None = None
    pending_first: int = 0
    pending_sent: float = 0.0
    result: LookupRecord | None = None
    pending_since: float = 0.0  # when a reply first said chunks were on their way (0: none)
    load_lease: int = 0  # an asynchronous load's: held until the load is reported finished
    sync_leases: list[int] = field(default_factory=list)  # held until the request ends or is preempted


class LookupBook:
    """``counters``: the half's dict ("lookups", "lookup_errors", "queried_tokens"), counted
    into in place."""

    def __init__(self, link: ServerLink, counters: dict[str, int], *, log: logging.Logger = CONNECTOR_LOG):
        self._link = link
        self._counters = counters
        self._log = log
        self._to_release: list[int] = []
        self._retrieved: list[int] = []  # of _to_release: leases whose chunks were loaded
        self._orphan_loads: dict[str, int] = {}  # finished requests' loads still in flight

    # --- finding ----------------------------------------------------------------------------

    def find(
        self, entry: RequestLookups, first: int, keys: Callable[[], list[bytes]]
    ) -> LookupRecord | None | _AskAgain:
        """The request's valid lookup result for its chunks from ``first`` on, looking them up
        (``keys()``, from chunk ``first``) when there is none. ASK_AGAIN while a reply is not
        in; None when the lookup failed (a miss: the engine recomputes)."""
        link = self._link
        ns, client = link.ns, link.client
        assert ns is not None and client is not None
        if entry.pending is not None:
            collected = self._collect(entry)
            if collected is not True:
                return collected
            if self._still_arriving(entry):
                return ASK_AGAIN
        valid = self._valid_result(entry, first)
        if valid is not None:
            return valid
        self.drop(entry)

        wanted = keys()
        settings = link.settings
        try:
            entry.pending = client.send_lookup(ns, wanted, lease_ms=settings.lease_ms)
        except KVDepotError as exc:
            return self._failed(exc)
        now = time.monotonic()
        entry.pending_first, entry.pending_sent = first, now
        self._counters["lookups"] += 1
        self._counters["queried_tokens"] += len(wanted) * ns.chunk_tokens
        # A local round trip takes ~0.1-0.3 ms: wait that long inline rather than costing the
        # request a scheduler step, but never longer than lookup_wait_ms.
        wait_until = now + settings.lookup_wait_ms / 1000.0
        while not entry.pending.ready() and time.monotonic() < wait_until:
            time.sleep(20e-6)
        collected = self._collect(entry)
        if collected is not True:
            return collected
        if self._still_arriving(entry):
            return ASK_AGAIN
        return self._valid_result(entry, first)

    def _still_arriving(self, entry: RequestLookups) -> bool:
        """The fresh result says chunks are on their way: ask again (within pending_wait_ms)."""
        res = entry.result
        if res is None or not res.pending:
            return False
        now = time.monotonic()
        if not entry.pending_since:
            entry.pending_since = now
        if now - entry.pending_since < self._link.settings.pending_wait_ms / 1000.0:
            return True
        res.pending = 0  # waited long enough: the hit is what is in the buffer
        return False

    def _valid_result(self, entry: RequestLookups, first: int) -> LookupRecord | None:
        res, client = entry.result, self._link.client
        if res is None or client is None or not self._still_valid(res, first, time.monotonic(), client.epoch):
            return None
        return res

    def _still_valid(self, res: LookupRecord, first: int, now: float, epoch: int) -> bool:
        if res.epoch != epoch:
            return False  # the server restarted: the lease is void, the hit may be gone
        if res.pending:
            return False  # more may have landed since: look up again
        if res.hit == 0:
            return res.first == first and now - res.at < MISS_TTL_S
        # A later call may come with a longer local hit; a shorter one needs a new lookup.
        return res.first <= first and now - res.at < self._link.settings.lease_ms / 2000.0

    def _collect(self, entry: RequestLookups) -> bool | None | _AskAgain:
        """Take a finished lookup's reply into entry.result: True. ASK_AGAIN while it is in
        flight (the client's deadline bounds this); None when it failed."""
        pending = entry.pending
        assert pending is not None
        if not pending.ready():
            return ASK_AGAIN
        entry.pending = None
        try:
            result = pending.result()
        except KVDepotError as exc:
            return self._failed(exc)
        self._link.back()
        self.drop(entry)
        client = self._link.client
        boot = client.boot_id if client is not None and client.epoch == result.epoch else None
        entry.result = LookupRecord(
            entry.pending_first, result.hit_chunks, result.lease, result.epoch, time.monotonic(),
            offsets=list(getattr(result, "offsets", ()) or ()) if boot else [],
            boot_id=boot or "",
            pending=int(getattr(result, "pending", 0) or 0),
        )
        if not entry.result.pending:
            entry.pending_since = 0.0
        return True

    def _failed(self, exc: KVDepotError) -> None:
        """A lookup that could not be sent or answered is a miss; note why."""
        self._counters["lookup_errors"] += 1
        if isinstance(exc, ServerRestarted):
            # Keys and namespace are unchanged across boots; only leases died, and the server
            # is evidently back.
            self._link.back()
        elif isinstance(exc, ServerUnavailable) and not session_dropped(exc):
            self._link.away(f"is not answering ({exc.message})")
        else:  # e.g. the server dropped our session and the client opened a new one
            self._log.debug("kvdepot: lookup failed: %s", exc)
        return None

    # --- leases -----------------------------------------------------------------------------

    def drop(self, entry: RequestLookups) -> None:
        """Forget the kept result; its lease goes back unread (at the next flush: after a
        lookup sent meanwhile has taken its own)."""
        if entry.result is not None and entry.result.lease:
            self._to_release.append(entry.result.lease)
        entry.result = None

    def hand_to_load(self, entry: RequestLookups, sync: bool) -> LookupRecord:
        """The engine loads the kept hit: its lease now belongs to the load."""
        res = entry.result
        assert res is not None
        if sync:
            if res.lease:
                entry.sync_leases.append(res.lease)
        else:
            entry.load_lease = res.lease
        entry.result = None
        return res

    def load_reported(self, entry: RequestLookups) -> None:
        """The request's asynchronous load is over: its lease goes, marked as read."""
        if entry.load_lease:
            self._release_read(entry.load_lease)
            entry.load_lease = 0

    def sync_loads_read(self, entry: RequestLookups) -> None:
        """The request's synchronous loads were read in their own steps, long ago (it is
        preempted now, or finished): their leases go, marked as read."""
        for lease in entry.sync_leases:
            self._release_read(lease)
        entry.sync_leases = []

    def request_gone(self, req_id: str, entry: RequestLookups, loading: bool) -> None:
        """The request finished. ``loading``: its asynchronous load is still in flight (the
        workers may be copying out of the leased slots): the lease goes when it is reported
        (``orphan_load_reported``), or expires by its TTL."""
        if entry.pending is not None:
            entry.pending.abandon()  # its lease, if any, is given back when the reply comes
            entry.pending = None
        self.drop(entry)
        self.sync_loads_read(entry)
        if loading:
            self._orphan_loads[req_id] = entry.load_lease

    def orphan_load_reported(self, req_id: str) -> bool:
        """A finished request's load is over: its lease goes, marked as read. True when one
        did: release it now (``flush``), for an idle engine has no step to do it in."""
        lease = self._orphan_loads.pop(req_id, 0)
        if lease:
            self._release_read(lease)
        return bool(lease)

    def _release_read(self, lease: int) -> None:
        self._to_release.append(lease)
        self._retrieved.append(lease)

    def flush(self) -> None:
        """Release every lease given up since the last flush, in one call."""
        client = self._link.client
        if not self._to_release or client is None:
            return
        leases, self._to_release = self._to_release, []
        retrieved, self._retrieved = self._retrieved, []
        try:
            client.release(leases, retrieved=retrieved)
        except KVDepotError as exc:
            # Leases of a restarted server are void anyway; others expire by their TTL.
            self._log.debug("kvdepot: releasing %d leases failed: %s", len(leases), exc)

    def close(self) -> None:
        """Shutting down: every lease still held goes, orphan loads' too (unread)."""
        self._to_release.extend(lease for lease in self._orphan_loads.values() if lease)
        self._orphan_loads.clear()
        self.flush()
