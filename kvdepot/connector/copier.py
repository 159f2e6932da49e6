"""Moving whole and partial chunks between an engine's paged KV cache and arena slots.

Whole chunks go through the project's transfer engines (kvdepot.transfer: CPU, or the GPU
DMA / Triton engines). A load may also need a *partial* chunk: when the engine's own prefix
cache already holds the first blocks of a chunk, those blocks are shared with other requests and
must not be written, so only the chunk's remaining blocks are copied (block id -1 marks the
others): by the CPU engine itself, or on a GPU block by block with plain torch indexing over
the same byte views (at most one such chunk per request).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from kvdepot.connector.logs import CONNECTOR_LOG
from kvdepot.transfer.base import ChunkCopy, Completed
from kvdepot.transfer.cpu import CpuTransfer
from kvdepot.transfer.layout import PagedLayout


class _Handles:
    """Completion of several copies."""

    def __init__(self, handles: Sequence[object]):
        self._handles = [h for h in handles if h is not None]

    def done(self) -> bool:
        return all(h.done() for h in self._handles)  # type: ignore[attr-defined]

    def wait(self) -> None:
        for h in self._handles:
            h.wait()  # type: ignore[attr-defined]

    def stream_wait(self, stream=None) -> None:
        """Order the current (or ``stream``'s) later GPU work after every copy; no host wait."""
        for h in self._handles:
            h.stream_wait(stream)  # type: ignore[attr-defined]


class _EventHandle:
    def __init__(self, event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()

    def stream_wait(self, stream=None) -> None:
        (stream or torch.cuda.current_stream(self.event.device)).wait_event(self.event)


def stream_event(device: torch.device):
    """A CUDA event after the work queued so far on ``device``'s current stream (the
    model's); None on a CPU, where every copy runs after the forward anyway."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class BlockCopier:
    def __init__(self, layout: PagedLayout, arena: torch.Tensor, chunk_tokens: int, *,
                 log: logging.Logger = CONNECTOR_LOG):
        self.layout = layout
        self.arena = arena
        self.chunk_tokens = chunk_tokens
        self.bpc = layout.blocks_per_chunk(chunk_tokens)
        self.slot_bytes = layout.slot_bytes(chunk_tokens)
        self.device = layout.device
        self.engine = None
        if self.device.type == "cpu":
            # One copy thread: an engine's CPU backend (vLLM's) pins its OpenMP threads to the
            # cores, and a second team of copy threads there only competes with the model.
            self.engine = CpuTransfer(layout, arena, chunk_tokens, threads=1)
        elif self.device.type == "cuda":
            try:
                from kvdepot.transfer.gpu import make_gpu_transfer

                self.engine = make_gpu_transfer(layout, arena, chunk_tokens)
            except Exception as exc:  # no triton, no CUDA runtime symbols, ...
                log.warning("kvdepot: no GPU transfer engine (%s); using plain torch copies", exc)
        self._side_stream = (
            torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        )

    @property
    def name(self) -> str:
        return getattr(self.engine, "name", "torch")

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    # -- stores: always whole chunks -----------------------------------------------------------

    def store(self, chunks: Sequence[ChunkCopy], after=None):
        """Cache blocks -> slots. ``after``: a CUDA event the copy must follow (GPU only)."""
        if not chunks:
            return Completed()
        if self.engine is not None:
            if self.device.type == "cuda":
                return self.engine.store(chunks, after=self._stream_after(after))
            return self.engine.store(chunks)
        return self._torch_copy(chunks, to_slot=True, after=after)

    # -- loads: whole chunks, and partial ones (block id -1 = leave alone) ---------------------

    def load(self, chunks: Sequence[tuple[int, Sequence[int]]], after=None):
        whole = [ChunkCopy(off, list(ids)) for off, ids in chunks if all(b >= 0 for b in ids)]
        partial = [(off, ids) for off, ids in chunks if not all(b >= 0 for b in ids)]
        handles = []
        if whole:
            if self.engine is not None:
                if self.device.type == "cuda":
                    handles.append(self.engine.load(whole, after=self._stream_after(after)))
                else:
                    handles.append(self.engine.load(whole))
            else:
                handles.append(self._torch_copy(whole, to_slot=False, after=after))
        if partial:
            if isinstance(self.engine, CpuTransfer):  # it skips block id -1 itself
                handles.append(self.engine.load([ChunkCopy(off, list(ids)) for off, ids in partial]))
            else:
                handles.append(self._torch_partial_load(partial, after))
        return _Handles(handles)

    # -- plain torch paths ---------------------------------------------------------------------

    def _stream_after(self, event):
        if event is None or self._side_stream is None:
            return None
        self._side_stream.wait_event(event)
        return self._side_stream

    def _slot(self, offset: int) -> torch.Tensor:
        end = offset + self.slot_bytes
        if offset < 0 or end > self.arena.numel():
            raise ValueError(f"slot [{offset}, {end}) is outside the arena")
        return self.arena[offset:end]

    def _torch_copy(self, chunks: Sequence[ChunkCopy], to_slot: bool, after):
        return self._torch_partial(
            [(c.slot_offset, list(c.block_ids)) for c in chunks], to_slot, after
        )

    def _torch_partial_load(self, chunks, after):
        return self._torch_partial(chunks, False, after)

    def _torch_partial(self, chunks, to_slot: bool, after):
        layout = self.layout
        cuda = self.device.type == "cuda"
        ctx = torch.cuda.stream(self._side_stream) if cuda else _null()
        with ctx:
            if cuda and after is not None:
                self._side_stream.wait_event(after)
            for offset, ids in chunks:
                slot = self._slot(offset)
                pos = [j for j, b in enumerate(ids) if b >= 0]
                if not pos:
                    continue
                dst_ids = torch.tensor([ids[j] for j in pos], dtype=torch.long, device=self.device)
                pos_t = torch.tensor(pos, dtype=torch.long)
                if layout.block_major:
                    assert layout.blocks is not None
                    rows = slot.view(self.bpc, -1)
                    if to_slot:
                        rows[pos_t] = layout.blocks.index_select(0, dst_ids).to("cpu")
                    else:
                        layout.blocks.index_copy_(
                            0, dst_ids, rows[pos_t].to(self.device, non_blocking=True)
                        )
                else:
                    per_plane = slot.view(layout.num_planes, self.bpc, layout.piece_bytes)
                    for p, plane in enumerate(layout.planes):
                        if to_slot:
                            per_plane[p, pos_t] = plane.index_select(0, dst_ids).to("cpu")
                        else:
                            plane.index_copy_(
                                0, dst_ids, per_plane[p, pos_t].to(self.device, non_blocking=True)
                            )
            if cuda:
                event = torch.cuda.Event()
                event.record(self._side_stream)
                return _EventHandle(event)
        return Completed()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
