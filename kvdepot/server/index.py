"""The chunk index: what is stored, for which rank, and in which state.

One entry per chunk key. A chunk of a model served with tensor parallelism ``world_size`` has
one slot per rank; each rank's slot is first *pending* (reserved, being written, unreadable)
and then *committed*. A chunk is a hit only when every rank has committed its slot.

Entries are linked into chains: an entry knows the entry of the chunk before it (its parent,
as the storing engine named it) and counts the entries after it (its children), so eviction
can take a chain from its tail and never leave a chunk that no lookup could reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # The chunk before this one in its chain, or None (a chain's head, or not known); only
    # trusted while it is itself in the index (see ChunkIndex.resident_parent).
    parent: ChunkEntry | None = field(default=None, repr=False, compare=False)
    children: int = 0  # entries in the index whose resident parent this is

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

    def create(self, key: bytes, ns: NamespaceInfo, parent: ChunkEntry | None = None) -> ChunkEntry:
        """A new entry, linked after ``parent`` (an entry in the index, of the same namespace)."""
        entry = ChunkEntry(
            key=key,
            namespace=ns.id,
            world_size=ns.world_size,
            slot_bytes=ns.slot_bytes,
            committed=[None] * ns.world_size,
            pending=[None] * ns.world_size,
        )
        self.entries[key] = entry
        if parent is not None:
            entry.parent = parent
            parent.children += 1
        return entry

    def resident_parent(self, entry: ChunkEntry) -> ChunkEntry | None:
        """The entry before ``entry`` in its chain while that is in the index, else None."""
        parent = entry.parent
        if parent is not None and self.entries.get(parent.key) is not parent:
            # It left while this entry stayed (its store was aborted): forget the link. A key
            # stored again later gets a new entry, which this one is not counted in.
            entry.parent = parent = None
        return parent

    def link(self, entry: ChunkEntry, parent: ChunkEntry) -> None:
        """Record ``parent`` before an existing ``entry`` that has no resident parent (stored
        as a head by an older client, or its parent's store was aborted). Ignored across
        namespaces, and where it would close a loop (keys named out of chain order)."""
        if parent.namespace != entry.namespace or self.resident_parent(entry) is not None:
            return
        node: ChunkEntry | None = parent
        while node is not None:  # a forest stays a forest: entry must not be above parent
            if node is entry:
                return
            node = self.resident_parent(node)
        entry.parent = parent
        parent.children += 1

    def remove(self, key: bytes) -> ChunkEntry | None:
        """Forget a chunk. Returns its parent when that has no child left (it may go now)."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return None
        self.complete[entry.namespace].discard(key)
        parent = self.resident_parent(entry)
        if parent is None:
            return None
        parent.children -= 1
        return None if parent.children else parent

    def check_links(self) -> None:
        """Expensive consistency check of the chains, for tests: counts match, no loops."""
        children: dict[bytes, int] = {}
        for entry in self.entries.values():
            parent = self.resident_parent(entry)
            if parent is not None:
                assert parent.namespace == entry.namespace, entry
                children[parent.key] = children.get(parent.key, 0) + 1
            depth = 0
            while parent is not None:
                depth += 1
                assert depth <= len(self.entries), f"a loop above {entry}"
                parent = self.resident_parent(parent)
        for key, entry in self.entries.items():
            assert entry.children == children.get(key, 0), entry

    def mark_complete(self, entry: ChunkEntry) -> None:
        self.complete[entry.namespace].add(entry.key)

    def __len__(self) -> int:
        return len(self.entries)
