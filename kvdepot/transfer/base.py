"""What the transfer engines (CPU, GPU DMA, GPU Triton) share: a chunk copy, the handle of a
copy done at once, the checks of their arguments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kvdepot.transfer.layout import PagedLayout


@dataclass(frozen=True)
class ChunkCopy:
    """One chunk of one rank: its arena slot and the engine blocks that hold its tokens."""

    slot_offset: int  # byte offset of the slot in the arena
    block_ids: Sequence[int]  # blocks_per_chunk engine block ids, in token order


class Completed:
    """The handle of a copy that finished before it was returned (synchronous engines)."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def stream_wait(self, stream=None) -> None:
        return None


def check_engine_args(
    engine: str, device_type: str, layout: "PagedLayout", arena: "torch.Tensor", chunk_tokens: int
) -> None:
    """What every engine needs: a cache on its device, a flat uint8 host arena, whole blocks."""
    if layout.device.type != device_type:
        raise ValueError(f"{engine} needs a {device_type.upper()} KV cache, got {layout.device}")
    if str(arena.dtype) != "torch.uint8" or arena.dim() != 1 or arena.device.type != "cpu":
        raise ValueError("the arena must be a flat uint8 tensor in host memory")
    if chunk_tokens % layout.geometry.block_size:
        raise ValueError(
            f"block size {layout.geometry.block_size} does not divide chunk size {chunk_tokens}"
        )
