"""What travels between the scheduler's and the workers' halves of the connector.

Scheduler -> workers, once per step (``KVDepotMetadata``): the loads and stores of that step,
batched, each naming the chunk keys and the engine blocks. Keys are computed once, by the
scheduler, so every TP rank uses the very same keys. A block id of -1 in a load means "this
block of the chunk is already computed locally; do not write it" (a local prefix-cache hit
that ends inside a chunk).

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

    @property
    def num_chunks(self) -> int:
        return len(self.keys) // KEY_BYTES


@dataclass
class StoreSpec:
    req_id: str
    keys: bytes
    block_ids: list[int]  # blocks_per_chunk per chunk

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
