"""Probe: asking a shared tier (a store other nodes write too) for what the index does not know.

The index knows the chunks this server stored, loaded or found at start; a shared tier (a
Redis/Valkey Cluster) also holds what other nodes stored. A leased lookup whose prefix ends at a
key the index has never seen asks the first shared tier for the chunks from there
(``Probe``, at most ``MAX_PREFETCH_CHUNKS``) and answers them as pending: the engine asks
again. When the answer comes (``ProbeDone``), the chunks it found join the index with their
places in that tier and start loading into the arena at once, exactly as chunks found on a
disk: the engine's next lookup finds them pending (leased) or landed (hits).

- One probe per prefix at a time: a lookup of a prefix being probed waits for that probe; its
  answer stands for ``PROBE_MEMORY_S`` (a miss is not asked again by every engine step), and
  a probe past the prefetch deadline counts its chunks as misses.
- Probes have their own queue (``TierSpec.queue_depth`` of them in flight), so writes never
  hold a lookup up; more lookups than that are misses until one ends.

Part of LowerTiers (tiering.py): pure, on the RPC thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvdepot.server.effects import Probe, ProbeDone
from kvdepot.server.locations import Location, State

if TYPE_CHECKING:
    from kvdepot.server.index import ChunkEntry, NamespaceInfo
    from kvdepot.server.tiering import LowerTiers, TierBooks

# How long a probe's answer stands for lookups of the same prefix: long enough that the steps
# of one engine's scheduler (milliseconds apart) do not ask again, short enough that a prefix
# another node stores now is a hit here in a moment.
PROBE_MEMORY_S = 2.0
_MEMORY_CAP = 65_536  # prefixes remembered at most (oldest answers forgotten first)


@dataclass(slots=True)
class ProbeJob:
    tier: str
    namespace: int
    parent: bytes  # the key before keys[0] in the lookup, b"" for a chain's head
    keys: list[bytes]
    deadline: float


class ProbePath:
    def probe(self: LowerTiers, ns: NamespaceInfo, parent: bytes, keys: list[bytes], now: float) -> int:
        """``keys``: a leased lookup's keys after the chunks the index holds or brings in
        (``parent``: the key before them, b"" when they start the chain).
        Returns how many of them the lookup should wait for: those a probe (started now, or
        by an earlier lookup and still within its deadline) is asking a shared tier about."""
        if not self._shared or not keys or keys[0] in self.index.entries:
            return 0
        first = keys[0]
        known = self.probed.get(first)
        if known is not None:
            job_id, until = known
            if now <= until:
                return _shared_prefix(keys, self.probes[job_id].keys) if job_id else 0
            if job_id:
                return 0  # past its deadline: a miss; one probe of a prefix at a time
            del self.probed[first]
        books = next((b for b in self._shared if self.probes_in_flight(b) < b.spec.queue_depth), None)
        if books is None:
            return 0
        asked = keys[: self._max_probe]
        job_id = self._next_job
        self._next_job += 1
        deadline = now + self.settings.deadline_base_s
        self.probes[job_id] = ProbeJob(books.spec.name, ns.id, parent, asked, deadline)
        self._remember(first, job_id, deadline)
        books.counters.probes += 1
        self.placement.effects.append(
            Probe(job_id, books.spec.name, ns.digest, ns.world_size, ns.slot_bytes, asked)
        )
        return len(asked)

    def probes_in_flight(self: LowerTiers, books: TierBooks) -> int:
        return sum(1 for p in self.probes.values() if p.tier == books.spec.name)

    def _remember(self: LowerTiers, first: bytes, job_id: int, until: float) -> None:
        probed = self.probed
        probed.pop(first, None)
        probed[first] = (job_id, until)
        while len(probed) > _MEMORY_CAP:
            oldest = next(iter(probed))
            if probed[oldest][0]:
                break  # in flight: kept until it ends
            del probed[oldest]

    def probe_done(self: LowerTiers, done: ProbeDone, now: float) -> bool:
        """A probe ended: what it found joins the index and starts loading into the arena."""
        job = self.probes.pop(done.job, None)
        if job is None:
            return False
        books = self.books[job.tier]
        first = job.keys[0]
        if self.probed.get(first, (0,))[0] == done.job:
            self._remember(first, 0, now + PROBE_MEMORY_S)
        if 0 < done.found < len(job.keys):  # where the store's copy of the prefix ends
            self._remember(job.keys[done.found], 0, now + PROBE_MEMORY_S)
        if done.error:
            books.counters.probe_errors += 1
        ns = self.index.namespaces.get(job.namespace)
        found = job.keys[: max(0, min(done.found, len(job.keys)))]
        if ns is None or not found:
            return True
        joined = self._join_found(ns, books, job.parent, found)
        books.counters.probe_found += len(joined)
        if joined:
            self._start_loads(ns, joined, now)
        return True

    def _join_found(
        self: LowerTiers, ns: NamespaceInfo, books: TierBooks, parent_key: bytes, keys: list[bytes]
    ) -> list[bytes]:
        """Index the chunks a probe found (those the index does not hold meanwhile), each
        rank placed READY in the tier, linked after the chunk before it; the keys to load."""
        entries, name = self.index.entries, books.spec.name
        footprint = books.spec.footprint(ns.slot_bytes) * ns.world_size
        parent: ChunkEntry | None = entries.get(parent_key) if parent_key else None
        if parent is not None and parent.namespace != ns.id:
            parent = None
        joined: list[bytes] = []
        for key in keys:
            entry = entries.get(key)
            if entry is not None:
                if entry.namespace != ns.id:
                    break
                parent = entry  # stored or found meanwhile: the chain goes on through it
                joined.append(key)
                continue
            if not self._make_room(books, footprint, None):
                break
            entry = self.index.create(key, ns, parent=parent)
            for rank in range(ns.world_size):
                where = books.spec.locate(ns.digest, key, rank)
                self.index.place_lower(entry, name, rank, Location(name, where, State.READY))
            books.used_bytes += footprint
            books.evictor.refresh(entry)
            joined.append(key)
            parent = entry
        return joined


def _shared_prefix(keys: list[bytes], asked: list[bytes]) -> int:
    """How many of ``keys`` (a lookup's) the probe of ``asked`` answers: their common start."""
    n = 0
    for mine, theirs in zip(keys, asked):
        if mine != theirs:
            break
        n += 1
    return n
