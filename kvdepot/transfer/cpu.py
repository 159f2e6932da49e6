"""Moving chunks between a paged KV cache in CPU memory and arena slots.

Pieces are moved as 8-byte words where alignment allows (a byte-wise gather ran at a fraction
of memcpy speed), one numpy slice assignment per piece: a plain memcpy, measured faster than
torch's index_copy_ on strided destinations, and free of torch's OpenMP pool, which inside a
vLLM CPU worker is pinned to the cores the model uses. numpy releases the GIL while copying, so
``threads`` > 1 splits the planes over a small pool (one memcpy stream rarely fills a socket's
memory bandwidth).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvdepot.transfer.base import ChunkCopy, Completed, check_engine_args
from kvdepot.transfer.layout import PagedLayout


def _word_dtype(*sizes: int) -> torch.dtype:
    """The widest integer type that every byte size/offset/stride given is a multiple of."""
    for dtype, width in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if all(s % width == 0 for s in sizes):
            return dtype
    return torch.uint8


def _as_words(view: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a [rows, bytes] uint8 view (unit inner stride) as [rows, words]."""
    return view.view(dtype) if dtype is not torch.uint8 else view


class CpuTransfer:
    name = "cpu"

    def __init__(
        self, layout: PagedLayout, arena: torch.Tensor, chunk_tokens: int, threads: int | None = None
    ):
        check_engine_args(type(self).__name__, "cpu", layout, arena, chunk_tokens)
        self.layout = layout
        self.arena = arena
        self.blocks_per_chunk = layout.blocks_per_chunk(chunk_tokens)
        self.slot_bytes = layout.slot_bytes(chunk_tokens)
        # Each unit is one contiguous run per block: the whole block (block_major) or one plane.
        if layout.block_major:
            assert layout.blocks is not None
            units = [layout.blocks]
        else:
            units = list(layout.planes)
        geometry = [u.stride(0) for u in units] + [u.storage_offset() for u in units]
        self._dtype = _word_dtype(layout.piece_bytes, self.slot_bytes, *geometry)
        self._width = torch.empty(0, dtype=self._dtype).element_size()
        # Word views for aligned slots (every slot the server hands out), bytes for the rest.
        words = [_as_words(u, self._dtype) for u in units]
        self._views = {
            True: (words, [w.numpy() for w in words]),
            False: (units, [u.numpy() for u in units]),
        }
        self._units = units
        threads = min(4, os.cpu_count() or 1) if threads is None else threads
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="kvdepot-cpu-copy")
            if threads > 1 and len(self._units) > 1
            else None
        )
        self.threads = threads if self._pool is not None else 1

    def _run(self, job: Callable[[range], None]) -> None:
        """Run job over all unit indices, split over the pool when there is one."""
        n = len(self._units)
        if self._pool is None:
            job(range(n))
            return
        step = -(-n // self.threads)
        for future in [self._pool.submit(job, range(i, min(i + step, n))) for i in range(0, n, step)]:
            future.result()

    def _slot(self, chunk: ChunkCopy, allow_skip: bool) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        ids = list(chunk.block_ids)
        if len(ids) != self.blocks_per_chunk:
            raise ValueError(f"a chunk needs {self.blocks_per_chunk} block ids, got {len(ids)}")
        low = -1 if allow_skip else 0
        if any(not low <= b < self.layout.num_blocks for b in ids):
            raise ValueError("block id out of range")
        end = chunk.slot_offset + self.slot_bytes
        if chunk.slot_offset < 0 or end > self.arena.numel():
            raise ValueError(f"slot [{chunk.slot_offset}, {end}) is outside the arena")
        aligned = (self.arena.data_ptr() + chunk.slot_offset) % self._width == 0
        slot = self.arena[chunk.slot_offset : end]
        slot = _as_words(slot, self._dtype) if aligned else slot
        # [unit, block in chunk, words]: the slot format of layout.py.
        return slot.view(len(self._units), len(ids), -1).numpy(), ids, self._views[aligned][1]

    def _copy(self, chunks: Sequence[ChunkCopy], to_slot: bool) -> Completed:
        work = [self._slot(chunk, allow_skip=not to_slot) for chunk in chunks]

        def copy(units: range) -> None:
            for slot, ids, views in work:
                for u in units:
                    unit, pieces = views[u], slot[u]
                    for j, block in enumerate(ids):
                        if block < 0:
                            continue
                        if to_slot:
                            pieces[j] = unit[block]
                        else:
                            unit[block] = pieces[j]

        self._run(copy)
        return Completed()

    def store(self, chunks: Sequence[ChunkCopy]) -> Completed:
        return self._copy(chunks, to_slot=True)

    def load(self, chunks: Sequence[ChunkCopy]) -> Completed:
        """Block id -1 marks a block the engine already holds (shared through its own prefix
        cache): that piece of the slot is not written to it."""
        return self._copy(chunks, to_slot=False)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
