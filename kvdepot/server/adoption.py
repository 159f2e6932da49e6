"""Re-adoption: the chunks a lower tier found at start (a restarted server's disk) join the
index once an engine registers their namespace.

Namespaces are known by their digest on disk and only get a run-time id at Register, so what
a tier's scan found waits by digest (``LowerTiers.waiting``), counted in the tier's bytes
from the start (its cap holds) and evicted first, oldest first, when the tier needs room: it
is older than anything this run wrote. At Register, the namespace's chunks are checked
(payload size, rank, every rank present in some tier, a chain that reaches a head) and
linked into chains again from the parent keys the files carry; whatever fails a check is
deleted. Adopted chunks go into the tier's eviction order oldest first: a lookup then finds
them below the arena and prefetches them like any other.

Part of LowerTiers (tiering.py): pure, on the RPC thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvdepot.server.locations import Location, State

if TYPE_CHECKING:
    from kvdepot.server.index import NamespaceInfo
    from kvdepot.server.tiering import LowerTiers, TierBooks
    from kvdepot.server.tiers import StoredChunk


class Adoption:
    def adopt(self: LowerTiers, tier: str, found: Iterable[StoredChunk]) -> None:
        """Take what tier ``tier`` found at start; the chunks of namespaces registered
        already join the index now, the others wait for their Register."""
        books = self.books[tier]
        for chunk in sorted(found, key=lambda c: c.last_used):
            books.orphans[chunk.where] = chunk
            books.used_bytes += books.spec.footprint(chunk.nbytes)
            self.waiting.setdefault(chunk.namespace, {})[chunk.where] = tier
        while books.used_bytes > books.spec.capacity_bytes and books.orphans:
            self._drop_orphan(books, next(iter(books.orphans.values())))  # oldest first
        for digest in list(self.waiting):
            ns = self.index.namespace_for_digest(digest)
            if ns is not None:
                self.adopt_namespace(ns)

    def adopt_namespace(self: LowerTiers, ns: NamespaceInfo) -> int:
        """``ns`` was registered: its waiting chunks join the index; how many did."""
        found = self.waiting.pop(ns.digest, None)
        if not found:
            return 0
        chunks: dict[bytes, list[tuple[TierBooks, StoredChunk]]] = {}
        parents: dict[bytes, bytes] = {}
        entries = self.index.entries
        for where, tier in found.items():
            books = self.books[tier]
            chunk = books.orphans.pop(where)
            fits = (
                chunk.nbytes == ns.slot_bytes and 0 <= chunk.rank < ns.world_size
                and chunk.key not in entries and parents.setdefault(chunk.key, chunk.parent) == chunk.parent
            )
            if fits:
                chunks.setdefault(chunk.key, []).append((books, chunk))
            else:
                self._drop_found(books, chunk)
        whole = {
            key for key, copies in chunks.items()
            if {c.rank for _, c in copies} == set(range(ns.world_size))
        }
        order = _reachable_in_order(whole, parents, lambda k: _in_namespace(self, k, ns.id))
        adopted = set(order)
        for key, copies in chunks.items():
            if key not in adopted:
                for books, chunk in copies:
                    self._drop_found(books, chunk)
        for key in order:
            parent = entries.get(parents[key]) if parents[key] else None
            entry = self.index.create(key, ns, parent=parent)
            for books, chunk in chunks[key]:
                name = books.spec.name
                if entry.places_in(name)[chunk.rank] is not None:
                    self._drop_found(books, chunk)  # a second copy in one tier
                    continue
                self.index.place_lower(entry, name, chunk.rank, Location(name, chunk.where, State.READY))
        # Into each tier's eviction order oldest first (the policy's insertion order).
        newest = {key: max(c.last_used for _, c in chunks[key]) for key in order}
        for key in sorted(order, key=newest.__getitem__):
            entry = entries[key]
            for books in self.books.values():
                if entry.lower and books.spec.name in entry.lower:
                    books.evictor.refresh(entry)
        return len(order)

    def _drop_orphan(self: LowerTiers, books: TierBooks, chunk: StoredChunk) -> None:
        del books.orphans[chunk.where]
        waiting = self.waiting[chunk.namespace]
        del waiting[chunk.where]
        if not waiting:
            del self.waiting[chunk.namespace]
        self._drop_found(books, chunk)


def _in_namespace(lower: LowerTiers, key: bytes, ns_id: int) -> bool:
    entry = lower.index.entries.get(key)
    return entry is not None and entry.namespace == ns_id


def _reachable_in_order(keys: set[bytes], parents: dict[bytes, bytes], indexed) -> list[bytes]:
    """The keys a lookup could reach (each of their ancestors is among ``keys`` or
    ``indexed``, up to a head), every parent before its children."""
    reachable: dict[bytes, bool] = {}
    order: list[bytes] = []
    for start in keys:
        path: list[bytes] = []
        key, ok = start, False
        while True:
            if key in reachable:
                ok = reachable[key]
                break
            if key not in keys:
                ok = indexed(key)
                break
            if key in path:  # keys cannot loop; a file that says so is not trusted
                break
            path.append(key)
            key = parents[key]
            if not key:
                ok = True
                break
        for key in reversed(path):
            reachable[key] = ok
            if ok:
                order.append(key)
    return order
