"""The workers' half of the vLLM connector: one per tensor-parallel rank.

- ``register_kv_caches`` reads the paged layout from the tensors' shapes and strides
  (kvdepot.transfer.layout: any order of layers, blocks, heads and tokens, K/V split or side
  by side, MLA, CPU or GPU) and keeps the namespace spec for the scheduler's handshake.
- The loads and stores themselves are kvdepot.connector.transfers' (a TransferWorker: an I/O
  thread, loads enqueued on the engine thread on a GPU, reserve-copy-commit stores,
  preemptions, shutdown); this class hands it vLLM's per-step metadata and answers vLLM.
- ``get_finished`` (see docs/request-lifecycle.md): a request is in ``finished_recving`` once
  its asynchronous load is over, its failed blocks reported through
  ``get_block_ids_with_load_errors`` no later than that step, so vLLM recomputes them; a
  finished request whose blocks the scheduler kept for its stores (``held_for_stores``) is in
  ``finished_sending`` once, after every store of it is over.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable

import torch

from kvdepot.client import KVDepotClient
from kvdepot.connector.settings import ConnectorSettings
from kvdepot.connector.specs import NamespaceSpec
from kvdepot.connector.transfers import TransferWorker
from kvdepot.integrations.vllm.metadata import KVDepotMetadata
from kvdepot.transfer.layout import LayoutError, PagedLayout, describe_layout

log = logging.getLogger("vllm.kvdepot")


def _layer_sort_key(name: str) -> tuple:
    # "model.layers.10.self_attn.attn" after "model.layers.9...": numbers compare as numbers.
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


class WorkerSide:
    def __init__(
        self,
        settings: ConnectorSettings,
        *,
        model: str,
        rank: int,
        world_size: int,
        block_size: int,
        num_blocks: int | None = None,
        is_mla: bool = False,
        engine_id: str = "",
        client_factory: Callable[..., KVDepotClient] = KVDepotClient,
    ):
        self.settings = settings
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.is_mla = is_mla
        self.engine_id = engine_id or f"vllm-{os.getpid()}"
        self.layout: PagedLayout | None = None
        self.spec: NamespaceSpec | None = None
        self.layout_error = ""
        self.transfers = TransferWorker(
            settings, rank=rank, block_size=block_size, engine_id=f"{self.engine_id}-rank{rank}",
            client_factory=client_factory, log=log,
        )
        # Finished requests whose blocks vLLM keeps for their stores (the scheduler said so):
        # reported in finished_sending once their stores are done.
        self._finishing: set[str] = set()

    @property
    def counters(self) -> dict[str, int]:
        return self.transfers.counters

    # --- registration -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_sort_key)
        ordered = {n: kv_caches[n] for n in names}
        num_blocks = self.num_blocks or _guess_num_blocks(ordered)
        try:
            self.layout = describe_layout(ordered, num_blocks, self.block_size, is_mla=self.is_mla)
        except (LayoutError, ValueError) as exc:
            self.layout_error = str(exc)
            log.warning(
                "kvdepot: cannot read the KV cache layout (%s); the cache is off for this engine", exc
            )
            return
        g = self.layout.geometry
        self.spec = NamespaceSpec(self.model, g, self.world_size, self.settings.salt)
        log.info(
            "kvdepot: rank %d/%d KV layout: %d layers, %s, %d blocks on %s",
            self.rank, self.world_size, g.num_layers, g.describe(), num_blocks, self.layout.device,
        )
        self.transfers.start(self.layout, self.spec)

    # --- the step hooks (engine thread) -----------------------------------------------------

    def handle_preemptions(self, meta: KVDepotMetadata | None) -> None:
        """Before a step that may hand preempted requests' blocks to others: settle the stores
        still reading them (TransferWorker.handle_preemptions)."""
        if meta is not None:
            self.transfers.handle_preemptions(meta.preempted)

    def start_load_kv(self, meta: KVDepotMetadata | None) -> None:
        if meta is not None and meta.loads:
            self.transfers.start_loads(meta.loads, meta.chunk_tokens)

    def wait_for_save(self, meta: KVDepotMetadata | None) -> None:
        if meta is not None and meta.stores:
            self.transfers.queue_stores(meta.stores, meta.chunk_tokens)

    def get_finished(
        self, finished_req_ids: set[str], meta: KVDepotMetadata | None = None
    ) -> tuple[set[str] | None, set[str] | None]:
        # A step that computes nothing (its requests wait for their loads) waits a little for
        # loads in flight; a step with work never waits.
        recving = self.transfers.take_finished_loads(wait=meta is None or meta.idle_step)
        if meta is not None:
            self._finishing.update(meta.held_for_stores)
        sending = self._finishing - self.transfers.storing(self._finishing)
        self._finishing -= sending
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.transfers.take_load_errors()

    def add_counter(self, name: str, value: int) -> None:
        self.transfers.add_counter(name, value)

    def take_counters(self) -> dict[str, int]:
        return self.transfers.take_counters()

    def shutdown(self) -> None:
        self.transfers.shutdown()


def _guess_num_blocks(kv_caches: dict[str, torch.Tensor]) -> int:
    """Without vLLM's number: the largest dimension shared by every layer is the block count."""
    shapes = [set(t.shape) for t in kv_caches.values()]
    common = set.intersection(*shapes) if shapes else set()
    if not common:
        raise LayoutError("cannot tell the number of blocks from the KV tensors")
    return max(common)
