"""What every transfer engine (CPU, GPU DMA, GPU Triton) offers the connector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ChunkCopy:
    """One chunk of one rank: its arena slot and the engine blocks that hold its tokens."""

    slot_offset: int  # byte offset of the slot in the arena
    block_ids: Sequence[int]  # blocks_per_chunk engine block ids, in token order


class TransferHandle(Protocol):
    def done(self) -> bool:
        """True once every byte has landed (never blocks)."""

    def wait(self) -> None:
        """Block the calling host thread until done."""


class TransferEngine(Protocol):
    name: str

    def store(self, chunks: Sequence[ChunkCopy]) -> TransferHandle:
        """Copy the chunks' blocks from the engine's paged cache into their slots."""

    def load(self, chunks: Sequence[ChunkCopy]) -> TransferHandle:
        """Copy the chunks' slots into the engine's blocks."""


class Completed:
    """The handle of a copy that finished before it was returned (synchronous engines)."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None
