"""What travels between the scheduler's and the workers' halves of the vLLM connector.

Scheduler -> workers, once per step (``KVDepotMetadata``, vLLM's connector metadata): the
loads and stores of that step, batched (kvdepot.connector.specs), and what the workers must
know of the step's requests.

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

from kvdepot.connector.specs import LoadSpec, NamespaceSpec, StoreSpec


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
class KVDepotHandshake(KVConnectorHandshakeMetadata):
    rank: int
    spec: NamespaceSpec | None  # None: the worker could not read its KV layout
    error: str = ""
