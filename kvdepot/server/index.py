"""The chunk index: what is stored, for which rank, where, and in which state.

One entry per chunk key. A chunk of a model served with tensor parallelism ``world_size`` has
one place per rank in each tier that holds it (see locations.py): in the arena, a rank's place
is first WRITING (reserved, being written, unreadable) and then READY; a copy between tiers
makes its source COPYING_OUT and its target LOADING_IN. A chunk is a hit only when every rank
has a readable arena place.

Entries are linked into chains: an entry knows the entry of the chunk before it (its parent,
as the storing engine named it) and counts the entries after it (its children, and those of
them with an arena place), so eviction can take a chain from its tail and never leave a chunk
that no lookup could reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvdepot.protocol import ErrorCode, KVGeometry
from kvdepot.server.errors import CacheError
from kvdepot.server.locations import Location, State

READY, WRITING, COPYING_OUT = State.READY, State.WRITING, State.COPYING_OUT


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    # The handle engines name this namespace by, for this server's life only; anything that
    # outlives a boot (a tier's files, another node) names it by ``digest``.
    id: int
    digest: bytes
    model: str
    geometry: KVGeometry
    world_size: int
    slot_bytes: int
    chunk_tokens: int


@dataclass(slots=True)
class ChunkEntry:
    key: bytes
    namespace: int
    world_size: int
    slot_bytes: int
    arena: list[Location | None]  # per rank: its arena place, or None
    # Per lower tier holding any rank of it: per rank, its place there (None: no lower tier).
    lower: dict[str, list[Location | None]] | None = None
    # Counts of arena places by state, kept by ChunkIndex.place_arena.
    committed_ranks: int = 0  # readable: READY or COPYING_OUT
    pending_ranks: int = 0  # WRITING
    loading_ranks: int = 0  # LOADING_IN
    copying_ranks: int = 0  # COPYING_OUT
    leases: int = 0  # live leases covering this chunk (hit, or loading for a lookup)
    pins: int = 0  # transient protection inside one request
    hits: int = 0  # lookups that hit it (counted only for admission to a lower tier)
    # The chunk before this one in its chain, or None (a chain's head, or not known); only
    # trusted while it is itself in the index (see ChunkIndex.resident_parent).
    parent: ChunkEntry | None = field(default=None, repr=False, compare=False)
    children: int = 0  # entries in the index whose resident parent this is
    arena_children: int = 0  # those of them with an arena place

    @property
    def complete(self) -> bool:
        return self.committed_ranks == self.world_size

    @property
    def in_arena(self) -> bool:
        return self.committed_ranks + self.pending_ranks + self.loading_ranks > 0

    @property
    def evictable(self) -> bool:
        """May its arena places go now (nobody reads, writes or copies them)?"""
        return (
            self.committed_ranks > 0
            and self.pending_ranks == 0
            and self.loading_ranks == 0
            and self.copying_ranks == 0
            and self.leases == 0
            and self.pins == 0
        )

    def offsets(self) -> list[int]:
        """Arena byte offsets of its places, whatever their state."""
        return [loc.where.offset for loc in self.arena if loc is not None]  # type: ignore[union-attr]

    def places_in(self, tier: str) -> list[Location | None]:
        """Per rank, its place in a lower tier (all None when the tier holds none)."""
        places = self.lower.get(tier) if self.lower else None
        return places if places is not None else [None] * self.world_size


class ChunkIndex:
    """Key -> entry, plus the registered namespaces. Plain data, no policy."""

    def __init__(self) -> None:
        self.entries: dict[bytes, ChunkEntry] = {}
        # Per namespace, the keys every rank has a readable arena place of: the lookup path
        # is then one set probe per key, with no entry attributes to read.
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
        """A new entry with no place yet, linked after ``parent`` (an entry in the index, of
        the same namespace)."""
        entry = ChunkEntry(
            key=key,
            namespace=ns.id,
            world_size=ns.world_size,
            slot_bytes=ns.slot_bytes,
            arena=[None] * ns.world_size,
        )
        self.entries[key] = entry
        if parent is not None:
            entry.parent = parent
            parent.children += 1
        return entry

    def place_arena(self, entry: ChunkEntry, rank: int, place: Location | None) -> ChunkEntry | None:
        """Set (or clear, with None) ``rank``'s arena place, keeping the counts and the
        complete set. Returns the resident parent when this took away its last child with an
        arena place (it may leave the arena now)."""
        # Every store and eviction passes here, per rank: the counts inline, no helpers.
        was_in_arena = entry.committed_ranks + entry.pending_ranks + entry.loading_ranks > 0
        old = entry.arena[rank]
        entry.arena[rank] = place
        was_readable = False
        if old is not None:
            state = old.state
            if state is READY:
                entry.committed_ranks -= 1
                was_readable = True
            elif state is WRITING:
                entry.pending_ranks -= 1
            elif state is COPYING_OUT:
                entry.committed_ranks -= 1
                entry.copying_ranks -= 1
                was_readable = True
            else:
                entry.loading_ranks -= 1
        if place is not None:
            state = place.state
            if state is READY:
                entry.committed_ranks += 1
            elif state is WRITING:
                entry.pending_ranks += 1
            elif state is COPYING_OUT:
                entry.committed_ranks += 1
                entry.copying_ranks += 1
            else:
                entry.loading_ranks += 1
        if entry.committed_ranks == entry.world_size:
            self.complete[entry.namespace].add(entry.key)
        elif was_readable:
            self.complete[entry.namespace].discard(entry.key)
        if was_in_arena == (entry.committed_ranks + entry.pending_ranks + entry.loading_ranks > 0):
            return None
        parent = self.resident_parent(entry)
        if parent is None:
            return None
        if not was_in_arena:
            parent.arena_children += 1
            return None
        parent.arena_children -= 1
        return None if parent.arena_children else parent

    def place_lower(self, entry: ChunkEntry, tier: str, rank: int, place: Location | None) -> None:
        """Set (or clear, with None) ``rank``'s place in the lower tier ``tier``."""
        if entry.lower is None:
            entry.lower = {}
        places = entry.lower.get(tier)
        if places is None:
            places = entry.lower[tier] = [None] * entry.world_size
        places[rank] = place
        if place is None and not any(places):
            del entry.lower[tier]
            if not entry.lower:
                entry.lower = None

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
        if entry.in_arena:
            parent.arena_children += 1

    def remove(self, key: bytes) -> ChunkEntry | None:
        """Forget a chunk that has no place left. Returns its parent when that has no child
        left (it may go now)."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return None
        assert not entry.in_arena and not entry.lower, entry
        self.complete[entry.namespace].discard(key)
        parent = self.resident_parent(entry)
        if parent is None:
            return None
        parent.children -= 1
        return None if parent.children else parent

    def check_links(self) -> None:
        """Expensive consistency check of the chains, for tests: counts match, no loops."""
        children: dict[bytes, int] = {}
        arena_children: dict[bytes, int] = {}
        for entry in self.entries.values():
            parent = self.resident_parent(entry)
            if parent is not None:
                assert parent.namespace == entry.namespace, entry
                children[parent.key] = children.get(parent.key, 0) + 1
                if entry.in_arena:
                    arena_children[parent.key] = arena_children.get(parent.key, 0) + 1
            depth = 0
            while parent is not None:
                depth += 1
                assert depth <= len(self.entries), f"a loop above {entry}"
                parent = self.resident_parent(parent)
        for key, entry in self.entries.items():
            assert entry.children == children.get(key, 0), entry
            assert entry.arena_children == arena_children.get(key, 0), entry

    def __len__(self) -> int:
        return len(self.entries)


def validate_geometry(g: KVGeometry, chunk_tokens: int) -> None:
    """CacheError GEOMETRY_MISMATCH unless a namespace of this geometry can be served."""
    problems = []
    if not 1 <= g.num_layers <= 4096:
        problems.append("num_layers")
    if not 1 <= g.num_kv_heads <= 4096 or g.head_size_k < 1 or g.head_size_v < 0:
        problems.append("heads")
    if g.block_size < 1 or chunk_tokens % g.block_size:
        problems.append(f"block_size {g.block_size} must divide the chunk size {chunk_tokens}")
    if not 1 <= g.num_planes <= 1 << 16 or not 1 <= g.piece_bytes <= 1 << 34:
        problems.append("planes/piece_bytes")
    if not g.dtype or len(g.dtype) > 64 or len(g.layout) > 256:
        problems.append("dtype/layout")
    if problems:
        raise CacheError(ErrorCode.GEOMETRY_MISMATCH, "invalid KV geometry: " + ", ".join(problems))
