"""The chunk index: what is stored, for which rank, and in which state.

One entry per chunk key. A chunk of a model served with tensor parallelism ``world_size`` has
one slot per rank; each rank's slot is first *pending* (reserved, being written, unreadable)
and then *committed*. A chunk is a hit only when every rank has committed its slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvdepot.protocol import KVGeometry


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    id: int
    digest: bytes
    model: str
    geometry: KVGeometry
    world_size: int
    salt_set: bool
    slot_bytes: int
    chunk_tokens: int


@dataclass(slots=True)
class ChunkEntry:
    key: bytes
    namespace: int
    world_size: int
    slot_bytes: int
    committed: list[int | None]  # per rank: arena offset once committed
    pending: list[int | None]  # per rank: arena offset while reserved
    committed_ranks: int = 0
    pending_ranks: int = 0
    leases: int = 0  # live leases covering this chunk
    pins: int = 0  # transient protection inside one request

    @property
    def complete(self) -> bool:
        return self.committed_ranks == self.world_size

    @property
    def evictable(self) -> bool:
        return (
            self.committed_ranks > 0
            and self.pending_ranks == 0
            and self.leases == 0
            and self.pins == 0
        )

    def offsets(self) -> list[int]:
        return [o for o in (*self.committed, *self.pending) if o is not None]


class ChunkIndex:
    """Key -> entry, plus the registered namespaces. Plain data, no policy."""

    def __init__(self) -> None:
        self.entries: dict[bytes, ChunkEntry] = {}
        # Per namespace, the keys every rank has committed: the lookup path is then one set
        # probe per key, with no entry attributes to read.
        self.complete: dict[int, set[bytes]] = {}
        self.namespaces: dict[int, NamespaceInfo] = {}
        self._namespace_by_digest: dict[bytes, int] = {}

    def namespace_for_digest(self, digest: bytes) -> NamespaceInfo | None:
        ns_id = self._namespace_by_digest.get(digest)
        return None if ns_id is None else self.namespaces[ns_id]

    def add_namespace(self, info: NamespaceInfo) -> None:
        self.namespaces[info.id] = info
        self._namespace_by_digest[info.digest] = info.id
        self.complete[info.id] = set()

    def get(self, key: bytes) -> ChunkEntry | None:
        return self.entries.get(key)

    def create(self, key: bytes, ns: NamespaceInfo) -> ChunkEntry:
        entry = ChunkEntry(
            key=key,
            namespace=ns.id,
            world_size=ns.world_size,
            slot_bytes=ns.slot_bytes,
            committed=[None] * ns.world_size,
            pending=[None] * ns.world_size,
        )
        self.entries[key] = entry
        return entry

    def remove(self, key: bytes) -> ChunkEntry | None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.complete[entry.namespace].discard(key)
        return entry

    def mark_complete(self, entry: ChunkEntry) -> None:
        self.complete[entry.namespace].add(entry.key)

    def __len__(self) -> int:
        return len(self.entries)
