"""Moving chunks between a paged KV cache in CPU memory and arena slots.

Each plane's pieces for a chunk are gathered (store) or scattered (load) with one
index_select / index_copy_ over uint8 views, so the per-piece Python cost stays out of the
copy and torch's own memcpy does the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvdepot.transfer.base import ChunkCopy, Completed
from kvdepot.transfer.layout import PagedLayout


class CpuTransfer:
    name = "cpu"

    def __init__(self, layout: PagedLayout, arena: torch.Tensor, chunk_tokens: int):
        if layout.device.type != "cpu":
            raise ValueError(f"CpuTransfer needs a CPU KV cache, got {layout.device}")
        if arena.dtype != torch.uint8 or arena.dim() != 1:
            raise ValueError("arena must be a flat uint8 tensor")
        if chunk_tokens % layout.geometry.block_size:
            raise ValueError(
                f"block size {layout.geometry.block_size} does not divide chunk size {chunk_tokens}"
            )
        self.layout = layout
        self.arena = arena
        self.blocks_per_chunk = layout.blocks_per_chunk(chunk_tokens)
        self.slot_bytes = layout.slot_bytes(chunk_tokens)

    def _slot(self, chunk: ChunkCopy) -> tuple[torch.Tensor, torch.Tensor]:
        if len(chunk.block_ids) != self.blocks_per_chunk:
            raise ValueError(
                f"a chunk needs {self.blocks_per_chunk} block ids, got {len(chunk.block_ids)}"
            )
        end = chunk.slot_offset + self.slot_bytes
        if chunk.slot_offset < 0 or end > self.arena.numel():
            raise ValueError(f"slot [{chunk.slot_offset}, {end}) is outside the arena")
        ids = torch.as_tensor(chunk.block_ids, dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= self.layout.num_blocks:
            raise ValueError("block id out of range")
        return self.arena[chunk.slot_offset : end], ids

    def store(self, chunks: Sequence[ChunkCopy]) -> Completed:
        layout = self.layout
        for chunk in chunks:
            slot, ids = self._slot(chunk)
            if layout.block_major:
                assert layout.blocks is not None
                torch.index_select(layout.blocks, 0, ids, out=slot.view(len(ids), -1))
            else:
                per_plane = slot.view(layout.num_planes, len(ids), layout.piece_bytes)
                for plane, dst in zip(layout.planes, per_plane):
                    torch.index_select(plane, 0, ids, out=dst)
        return Completed()

    def load(self, chunks: Sequence[ChunkCopy]) -> Completed:
        layout = self.layout
        for chunk in chunks:
            slot, ids = self._slot(chunk)
            if layout.block_major:
                assert layout.blocks is not None
                layout.blocks.index_copy_(0, ids, slot.view(len(ids), -1))
            else:
                per_plane = slot.view(layout.num_planes, len(ids), layout.piece_bytes)
                for plane, src in zip(layout.planes, per_plane):
                    plane.index_copy_(0, ids, src)
        return Completed()
