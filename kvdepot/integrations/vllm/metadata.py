"""What travels between the scheduler's and the workers' halves of the connector.

Scheduler -> workers, once per step (``KVDepotMetadata``): the loads and stores of that step,
batched, each naming the chunk keys and the engine blocks. Keys are computed once, by the
scheduler, so every TP rank uses the very same keys. A block id of -1 in a load means "this
block of the chunk is already computed locally; do not write it" (a local prefix-cache hit
that ends inside a chunk). A load also carries every rank's arena offsets from the
scheduler's leased lookup, so a worker starts its copy without asking the server again.

Workers -> scheduler, once at start-up (``KVDepotHandshake``, through vLLM's handshake
metadata channel): the namespace the workers registered, read from their real KV tensors, so
the scheduler hashes keys in exactly the workers' namespace without having KV tensors itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

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
    # get_finished report); else vLLM waits for the request in get_finished.
    sync: bool = False

    @property
    def num_chunks(self) -> int:
        return len(self.keys) // KEY_BYTES

    def rank_offsets(self, rank: int) -> list[int] | None:
        """This rank's offsets, one per chunk, or None when the scheduler sent none."""
        n = self.num_chunks
        mine = self.offsets[rank * n : (rank + 1) * n]
        return mine if n and len(mine) == n else None


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
class KVDepotMetadata(KVConnectorMetadata):
    chunk_tokens: int = 0
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    # Requests preempted in this step: their blocks may be reused by this very step, so any
    # store still reading them must finish first. None: this vLLM does not say (wait for all).
    preempted: set[str] | None = None
    # Nothing is computed in this step (every scheduled request waits for its loads): the
    # workers may wait a little for loads in flight instead of letting the engine spin.
    idle_step: bool = False
    # Finished requests whose blocks vLLM keeps because stores may still read them: each
    # worker reports each of them in finished_sending once its stores are done, exactly once.
    held_for_stores: list[str] = field(default_factory=list)


@dataclass
class NamespaceSpec:
    """What a namespace is registered from; equal on every rank of one engine."""

    model: str
    geometry: KVGeometry
    world_size: int
    salt: str


@dataclass
class KVDepotHandshake(KVConnectorHandshakeMetadata):
    rank: int
    spec: NamespaceSpec | None  # None: the worker could not read its KV layout
    error: str = ""


def split_keys(blob: bytes) -> list[bytes]:
    return [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]
