"""The plans the scheduler's half hands the workers, and what a namespace is registered from.

A load or store names its chunks by key and the engine blocks that hold them. Keys are
computed once, by the scheduler, so every tensor-parallel rank uses the very same keys. A
block id of -1 in a load means "this block of the chunk is already computed locally; do not
write it" (a local prefix-cache hit that ends inside a chunk). A load also carries every
rank's arena offsets from the scheduler's leased lookup, so a worker starts its copy without
asking the server again. An engine adapter carries these in its own per-step message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvdepot.protocol import KEY_BYTES, KVGeometry


@dataclass
class LoadSpec:
    req_id: str
    keys: bytes  # KEY_BYTES per chunk, in prefix order
    block_ids: list[int]  # blocks_per_chunk per chunk; -1: leave that block alone
    # Arena offsets of the chunks' slots, rank-major (rank r: [r * n, (r + 1) * n)), valid in
    # the server boot ``boot_id`` while the scheduler's lease holds. Empty: the worker asks the
    # server itself (Acquire).
    offsets: list[int] = field(default_factory=list)
    boot_id: str = ""
    # Synchronous: the copy must land before this step's forward reads the blocks (no
    # finished-load report); else the engine waits for the request's load to be reported.
    sync: bool = False

    @property
    def num_chunks(self) -> int:
        return len(self.keys) // KEY_BYTES

    def rank_offsets(self, rank: int) -> list[int] | None:
        """This rank's offsets, one per chunk, or None when the scheduler sent none."""
        n = self.num_chunks
        mine = self.offsets[rank * n : (rank + 1) * n]
        return mine if n and len(mine) == n else None

    def writable_blocks(self) -> list[int]:
        """The blocks the load writes (every one fails if the load does)."""
        return [b for b in self.block_ids if b >= 0]


@dataclass
class StoreSpec:
    req_id: str
    keys: bytes
    block_ids: list[int]  # blocks_per_chunk per chunk
    # The key of the chunk before the first one (b"": the first is the prefix's chunk 0): the
    # server links the chain across stores, so eviction keeps every prefix reachable.
    parent: bytes = b""

    @property
    def num_chunks(self) -> int:
        return len(self.keys) // KEY_BYTES


@dataclass
class NamespaceSpec:
    """What a namespace is registered from; equal on every rank of one engine."""

    model: str
    geometry: KVGeometry
    world_size: int
    salt: str
