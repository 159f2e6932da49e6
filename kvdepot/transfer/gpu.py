"""Moving chunks between a paged KV cache on a CUDA GPU and arena slots in pinned host memory.

Engines, one contract (kvdepot.transfer.base):
- ``gpu-dma``: the copy engines move whole runs with cudaMemcpyBatchAsync (one API call for the
  batch, CUDA >= 12.8) or one cudaMemcpyAsync per run. No SM is used, so the model does not slow
  down, but each copy has a fixed cost: good for runs of about 1 MiB and more, such as a block
  of a cross-layer (block-outer) layout, useless for 8-72 KB per-layer pieces.
- ``gpu-triton-staged``: one fused Triton kernel gathers all layers and blocks of a group of
  chunks into a device staging buffer (scatters, for loads), and the copy engines move each
  40 MiB slot over PCIe. SMs work only for the device-to-device part.
- ``gpu-triton``: the same kernel reading or writing the arena directly over UVA, one launch
  per batch and no staging memory, but it holds SMs for the whole PCIe-bound copy (measured on
  an H200: a concurrent matmul loop ran 72% slower, against ~0% for the other two).
``make_gpu_transfer`` picks one from the layout (``choose_engine``).

Issue: the DMA and staged engines enqueue a whole transfer with one call into C
(native_issue.py; measured on the H200 machine, ~25-35 us of host time for a single chunk
against ~55-60 us op by op from Python, which delayed the first byte of a 0.8 ms copy). Where
no C compiler is found they issue the same operations from Python.

Ordering, without host synchronisation on the critical path:
- Each direction has its own streams, so stores and loads overlap (the link is full duplex).
- The work of store() and load() that touches the cache first waits for everything already
  enqueued on the caller's stream (the model's; ``after=None`` means the current stream): a
  store reads a layer's blocks only after the kernels that wrote them, a load does not
  overwrite blocks the model is still reading from a previous owner (a staged load's DMA into
  its staging buffer need not wait).
- The returned handle carries an event recorded after the copy. ``handle.stream_wait()``
  makes the model's stream wait for a load before it reads the blocks (no host block);
  ``handle.done()`` polls, ``handle.wait()`` blocks the host.
- A store reads the blocks asynchronously: the caller must not let the engine reuse them
  (vLLM: keep them out of the free list through request_finished/get_finished) until
  ``handle.done()``. Buffers the copy uses are kept alive by the handle.
- The arena is pinned on a background thread when the engine is built (``ready()`` tells);
  the first transfer waits for it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch

from kvdepot.transfer.base import ChunkCopy, check_engine_args
from kvdepot.transfer import native_issue
from kvdepot.transfer.layout import PagedLayout
from kvdepot.transfer.native_launch import KernelSpec, cuda_driver
from kvdepot.transfer.pinning import (
    MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE,
    SRC_ACCESS_ORDER_STREAM,
    ArenaPin,
    MemcpyAttributes,
    cuda_runtime,
    pin_arena,
    release_arena,
)

log = logging.getLogger(__name__)

# The current stream's raw handle, the way Triton's launcher gets it: torch.cuda.current_stream
# builds a Stream object, microseconds per call on the hot path.
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

# Below this run size one copy per run loses to a kernel (facts: 256 KB ~20 GB/s, 1 MB ~48,
# 2 MB+ 51-54 GB/s per cudaMemcpyAsync on the H200's PCIe Gen5 link).
DMA_MIN_RUN_BYTES = 1 << 20
ENGINES = ("gpu-dma", "gpu-triton", "gpu-triton-staged")


def triton_available() -> bool:
    """Triton is an optional extra (kvdepot[gpu]); without it only DMA runs."""
    return importlib.util.find_spec("triton") is not None


def choose_engine(layout: PagedLayout, *, triton_ok: bool | None = None) -> tuple[str, str]:
    """(engine name, reason). The rule: DMA when one copy moves at least DMA_MIN_RUN_BYTES
    (a block-major block, or a large plane piece); else the fused Triton gather with DMA of
    whole slots; else (no triton) DMA piece by piece, the fallback that works everywhere."""
    forced = os.environ.get("KVDEPOT_GPU_ENGINE", "").strip()
    if forced:
        if forced not in ENGINES:
            raise ValueError(f"KVDEPOT_GPU_ENGINE={forced!r}: expected one of {ENGINES}")
        return forced, "KVDEPOT_GPU_ENGINE"
    run = layout.num_planes * layout.piece_bytes if layout.block_major else layout.piece_bytes
    if run >= DMA_MIN_RUN_BYTES:
        return "gpu-dma", f"{run} B contiguous per block copy >= {DMA_MIN_RUN_BYTES}"
    if triton_ok is None:
        triton_ok = triton_available()
    if triton_ok:
        return "gpu-triton-staged", f"{run} B pieces < {DMA_MIN_RUN_BYTES}: fused gather + DMA"
    return "gpu-dma", f"{run} B pieces, triton not installed: DMA fallback (slow)"


class _EventPool:
    """Completion events, reused: creating and destroying one per transfer cost microseconds
    on the GPU machines. A handle gives its event back once it is garbage: nobody can ask about
    it any more, and waits already enqueued on it captured its state when they were."""

    def __init__(self, rt, device: torch.device):
        self.rt = rt
        self.device = device
        self.free: list[int] = []
        self.closed = False

    def take(self) -> int:
        try:
            return self.free.pop()
        except IndexError:
            with torch.cuda.device(self.device):
                return self.rt.event_create()

    def give(self, event: int) -> None:
        if self.closed:
            self.rt.event_destroy(event)
        else:
            self.free.append(event)

    def close(self) -> None:
        self.closed = True
        while self.free:
            self.rt.event_destroy(self.free.pop())


class GpuHandle:
    """Completion of one enqueued batch: a raw CUDA event recorded after its last operation
    (and, for engines built with timing=True, one at its start), owned by the handle."""

    def __init__(self, rt=None, event: int = 0, nbytes: int = 0,
                 device: torch.device | None = None, start: int = 0,
                 pool: _EventPool | None = None):
        self.rt = rt
        self.event = event
        self.nbytes = nbytes
        self.device = device
        self.start = start
        self._pool = pool

    def device_ms(self) -> float | None:
        """GPU time from the copy's turn on its stream to its end (engines built with
        timing=True; call once done)."""
        if not self.start or not self.event:
            return None
        return self.rt.elapsed_ms(self.start, self.event)

    def done(self) -> bool:
        return not self.event or self.rt.query(self.event)

    def wait(self) -> None:
        if self.event:
            self.rt.synchronize(self.event)

    def stream_wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Order ``stream``'s (default: the current stream's) later work after this copy."""
        if self.event:
            stream = stream or torch.cuda.current_stream(self.device)
            self.rt.wait(stream.cuda_stream, self.event)

    def __del__(self):
        try:
            if self.event and self._pool is not None:
                self._pool.give(self.event)
            elif self.event:
                self.rt.event_destroy(self.event)
            if self.start:
                self.rt.event_destroy(self.start)  # CUDA frees it once it has completed
        except Exception:  # interpreter shutdown
            pass
        self.event = self.start = 0


class _Plan:
    """Address arithmetic shared by the engines: the pieces the slots are made of."""

    def __init__(self, layout: PagedLayout, blocks_per_chunk: int):
        if layout.block_major:
            assert layout.blocks is not None
            views = (layout.blocks,)
            piece = layout.num_planes * layout.piece_bytes
            self.slot_plane_stride, self.slot_block_stride = piece, piece
        else:
            views = layout.planes
            piece = layout.piece_bytes
            self.slot_plane_stride = blocks_per_chunk * piece
            self.slot_block_stride = piece
        self.views = views
        self.piece = piece
        n = len(views)
        self.plane_ptr = np.array([v.data_ptr() for v in views], dtype=np.int64)[None, :, None]
        self.plane_stride = np.array([v.stride(0) for v in views], dtype=np.int64)[None, :, None]
        # Offset of each (plane, block) piece inside a slot: [1, n, bpc]
        self.slot_rel = (
            np.arange(n, dtype=np.int64)[:, None] * self.slot_plane_stride
            + np.arange(blocks_per_chunk, dtype=np.int64)[None, :] * self.slot_block_stride
        )[None]


class _GpuTransfer:
    name = "gpu"
    issues_natively = False  # whether transfers are issued from C (native_issue)

    def __init__(
        self,
        layout: PagedLayout,
        arena: torch.Tensor,
        chunk_tokens: int,
        *,
        pin: bool = True,
        background_pin: bool = True,
        timing: bool = False,
        native_issue: bool = True,
    ):
        check_engine_args(type(self).__name__, "cuda", layout, arena, chunk_tokens)
        self.layout = layout
        self.arena = arena
        self.device = layout.device
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.blocks_per_chunk = layout.blocks_per_chunk(chunk_tokens)
        self.slot_bytes = layout.slot_bytes(chunk_tokens)
        self.plan = _Plan(layout, self.blocks_per_chunk)
        self._pin: ArenaPin | None = (
            pin_arena(arena, self.device, background=background_pin) if pin else None
        )
        self.rt = cuda_runtime()
        with torch.cuda.device(self.device):
            self.store_stream = torch.cuda.Stream(self.device)
            self.load_stream = torch.cuda.Stream(self.device)
            # One per direction, re-recorded per call: a wait captures the event's state when
            # it is enqueued, so reuse is safe. Raw CUDA events: the hot path's few
            # records and waits cost ~1 us each through ctypes, ~5 us through torch.
            self._fence = {True: self.rt.event_create(), False: self.rt.event_create()}
        self._events = _EventPool(self.rt, self.device)
        self.timing = timing
        # Subclasses set up their C issue path when this allows it and it builds.
        self.use_native_issue = native_issue
        # Calls of one direction may come from two threads (vLLM's engine thread enqueues
        # loads, the connector's I/O thread its fallback loads): one at a time per direction.
        self._direction_lock = {True: threading.Lock(), False: threading.Lock()}
        self._pinned = False
        self._closed = False

    # -- state -----------------------------------------------------------------------------

    def ready(self) -> bool:
        """True once the arena is pinned (transfers before that block until it is)."""
        return self._pin is None or self._pin.ready()

    @property
    def pin_seconds(self) -> float | None:
        return None if self._pin is None else self._pin.seconds

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.store_stream.synchronize()
        self.load_stream.synchronize()
        for event in self._fence.values():
            self.rt.event_destroy(event)
        self._events.close()
        if self._pin is not None:
            release_arena(self._pin)
            self._pin = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the contract ----------------------------------------------------------------------

    def store(
        self, chunks: Sequence[ChunkCopy], *, after: torch.cuda.Stream | None = None
    ) -> GpuHandle:
        """Enqueue cache -> slots; starts after the work already on ``after`` (default: the
        current stream)."""
        return self._submit(chunks, True, after)

    def load(
        self, chunks: Sequence[ChunkCopy], *, after: torch.cuda.Stream | None = None
    ) -> GpuHandle:
        """Enqueue slots -> cache; call ``stream_wait()`` on the result before the model reads
        the blocks."""
        return self._submit(chunks, False, after)

    def _validate(self, chunks: Sequence[ChunkCopy]) -> tuple[np.ndarray, np.ndarray]:
        # Plain Python on the lists: for the usual few chunks it is several times cheaper than
        # numpy's reductions, and this runs before the first byte moves.
        bpc = self.blocks_per_chunk
        slots = [c.slot_offset for c in chunks]
        ids = []
        for chunk in chunks:
            if len(chunk.block_ids) != bpc:
                raise ValueError(f"a chunk needs {bpc} block ids, got {len(chunk.block_ids)}")
            ids.extend(chunk.block_ids)
        if min(slots) < 0 or max(slots) + self.slot_bytes > self.arena.numel():
            raise ValueError("a slot lies outside the arena")
        if min(ids) < 0 or max(ids) >= self.layout.num_blocks:
            raise ValueError("block id out of range")
        return (np.array(slots, dtype=np.int64),
                np.array(ids, dtype=np.int64).reshape(len(chunks), bpc))

    def _submit(
        self, chunks: Sequence[ChunkCopy], to_slot: bool, after: torch.cuda.Stream | None
    ) -> GpuHandle:
        if self._closed:
            raise RuntimeError("transfer engine is closed")
        if not chunks:
            return GpuHandle()
        slots, bids = self._validate(chunks)
        if not self._pinned:
            if self._pin is not None:
                self._pin.wait()
            self._pinned = True
        with self._direction_lock[to_slot]:
            return self._submit_locked(slots, bids, to_slot, after, len(chunks))

    def _submit_locked(self, slots, bids, to_slot: bool, after, n_chunks: int) -> GpuHandle:
        if after is not None:
            producer = after.cuda_stream
        elif _current_raw_stream is not None:
            producer = _current_raw_stream(self.device.index)
        else:
            producer = torch.cuda.current_stream(self.device).cuda_stream
        rt = self.rt
        if self.timing:
            done, start, pool = rt.event_create(timing=True), rt.event_create(timing=True), None
        else:
            done, start, pool = self._events.take(), 0, self._events
        handle = GpuHandle(rt, done, n_chunks * self.slot_bytes, self.device, start, pool)
        self._issue(to_slot, slots, bids, producer, self._fence[to_slot], start, done)
        return handle

    def _issue(self, to_slot: bool, slots, bids, producer: int, fence: int, start: int,
               done: int) -> None:
        """Enqueue the whole transfer after the work on ``producer`` (a stream handle),
        using the reusable event ``fence``; record ``start`` (if any) when the copy's turn
        comes and ``done`` after its end. This, Python's way, costs a few microseconds per
        CUDA call: engines with a native issue path override it."""
        rt = self.rt
        stream = self.store_stream if to_slot else self.load_stream
        rt.record(fence, producer)
        rt.wait(stream.cuda_stream, fence)
        if start:
            rt.record(start, stream.cuda_stream)
        last = self._enqueue(to_slot, slots, bids, stream, fence) or stream
        rt.record(done, last.cuda_stream)

    def _enqueue(self, to_slot: bool, slots, bids, stream, fence) -> torch.cuda.Stream | None:
        """Enqueue the copy on ``stream`` (already after ``fence``, the producer's work);
        returns the stream whose end covers all of it, None for ``stream``."""
        raise NotImplementedError

    def _native_call(self, fn, *args) -> None:
        failed = ctypes.c_int32(0)
        code = fn(*args, ctypes.addressof(failed))
        if code:
            native_issue.raise_failure(code, failed.value, self.rt, cuda_driver())


def _runs(plan: _Plan, arena_ptr: int, slots: np.ndarray, bids: np.ndarray):
    """(cache addresses, arena addresses, sizes) of the copies, adjacent pieces merged."""
    cache = (plan.plane_ptr + bids[:, None, :] * plan.plane_stride).reshape(-1)
    slot = ((arena_ptr + slots)[:, None, None] + plan.slot_rel).reshape(-1)
    step = plan.piece
    if len(cache) > 1:
        joins = (cache[1:] - cache[:-1] == step) & (slot[1:] - slot[:-1] == step)
        if joins.any():
            starts = np.concatenate(([0], np.flatnonzero(~joins) + 1))
            sizes = np.diff(np.append(starts, len(cache))) * step
            return cache[starts], slot[starts], sizes.astype(np.uint64)
    return cache, slot, np.full(len(cache), step, dtype=np.uint64)


class DmaTransfer(_GpuTransfer):
    """Copy engines only: the batch's runs in one cudaMemcpyBatchAsync, or a cudaMemcpyAsync
    loop where the runtime lacks it (each call overlaps the previous copy, so a loop costs
    little when runs are large)."""

    name = "gpu-dma"

    def __init__(self, *args, batch: bool | None = None, **kw):
        super().__init__(*args, **kw)
        self.use_batch = self.rt.has_batch_memcpy if batch is None else batch
        if self.use_batch and not self.rt.has_batch_memcpy:
            raise RuntimeError(f"cudaMemcpyBatchAsync needs CUDA >= 12.8 (runtime {self.rt.version})")
        self._attrs = MemcpyAttributes()
        self._attrs.srcAccessOrder = SRC_ACCESS_ORDER_STREAM
        self._attrs.flags = MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE
        self._arena_ptr = self.arena.data_ptr()
        self._native = self._build_native() if self.use_native_issue else None
        self.issues_natively = self._native is not None

    def _build_native(self):
        lib = native_issue.library()
        if lib is None:
            return None
        plan = self.plan
        ptrs = np.ascontiguousarray(plan.plane_ptr.reshape(-1))
        strides = np.ascontiguousarray(plan.plane_stride.reshape(-1))
        batch = native_issue.function_address(self.rt.batch_function) if self.use_batch else 0
        c = native_issue.DmaPlan(
            plane_ptr=ptrs.ctypes.data, plane_stride=strides.ctypes.data, piece=plan.piece,
            slot_plane_stride=plan.slot_plane_stride, slot_block_stride=plan.slot_block_stride,
            arena=self._arena_ptr, batch=batch or None,
            batch_attrs=ctypes.addressof(self._attrs),
            batch_has_fail_idx=int(self.rt.batch_has_fail_idx),
            n_planes=len(plan.views), bpc=self.blocks_per_chunk,
        )
        api = native_issue.make_api(self.rt, cuda_driver())
        return lib.kvd_dma, (ctypes.addressof(api), ctypes.addressof(c)), (ptrs, strides, c, api)

    def _issue(self, to_slot, slots, bids, producer, fence, start, done):
        if self._native is None:
            return super()._issue(to_slot, slots, bids, producer, fence, start, done)
        fn, (api, plan), _ = self._native
        stream = self.store_stream if to_slot else self.load_stream
        self._native_call(fn, api, plan, slots.ctypes.data, bids.ctypes.data, len(slots),
                          int(to_slot), producer, stream.cuda_stream, fence, start, done)

    def _enqueue(self, to_slot, slots, bids, stream, fence):
        cache, slot, sizes = _runs(self.plan, self._arena_ptr, slots, bids)
        dst, src = (slot, cache) if to_slot else (cache, slot)
        copy_stream = stream.cuda_stream
        if self.use_batch and len(sizes) > 1:
            dst = np.ascontiguousarray(dst, dtype=np.uint64)
            src = np.ascontiguousarray(src, dtype=np.uint64)
            sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
            # The arrays are read during the call only (the API copies the descriptors).
            self.rt.memcpy_batch(
                dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, len(sizes), self._attrs,
                copy_stream,
            )
            return None
        memcpy = self.rt.memcpy_async
        for d, s, n in zip(dst.tolist(), src.tolist(), sizes.tolist()):
            code = memcpy(d, s, n, 4, copy_stream)
            if code:
                self.rt.check(code, "cudaMemcpyAsync")
        return None


class TritonTransfer(_GpuTransfer):
    """One fused kernel per batch, reading or writing the arena over UVA.

    16 programs keep the link as busy as 64 or 264 did on an H200 (51 GB/s store, 49 load at
    16 chunks) while a concurrent matmul loop slowed by 12% instead of 79%."""

    name = "gpu-triton"

    def __init__(self, *args, max_programs: int = 16, num_warps: int = 4,
                 table_on_host: bool = True, native_launch: bool = True, **kw):
        if not triton_available():
            raise RuntimeError("the fused-kernel engine needs triton (pip install kvdepot[gpu])")
        from kvdepot.transfer import triton_copy  # lazily: triton is optional

        super().__init__(*args, **kw)
        self.table_on_host = table_on_host
        if self._pin is None and type(self) is TritonTransfer:
            raise ValueError("the UVA kernel needs the arena pinned (pin=True)")
        # A block-major layout comes as one view of whole blocks, so slot order is plain
        # (plane, block) order either way.
        with torch.cuda.device(self.device):
            self.copier = triton_copy.FusedCopier(
                self.plan.views,
                self.plan.piece,
                max_programs=max_programs,
                num_warps=num_warps,
                table_on_host=table_on_host,
                native_launch=native_launch,
            )

    def _enqueue(self, to_slot, slots, bids, stream, fence):
        # The host address: the launch maps it to the device address of the mapped
        # registration (the same value under UVA).
        self.copier.launch(
            to_slot=to_slot,
            slot_base=self.arena.data_ptr(),
            slot_owner=self.arena,
            slot_offsets=slots,
            block_ids=bids,
            stream=stream,
        )
        return None

    def close(self) -> None:
        if not self._closed:
            super().close()
            self.copier.close()


class StagedTritonTransfer(TritonTransfer):
    """The fused kernel gathers into (scatters from) a device staging buffer and the copy
    engines move each whole slot over PCIe, so SMs are busy only for the short
    device-to-device part (a 40 MiB chunk at HBM speed) and the link is driven by DMA.

    Two staging buffers per direction on a kernel stream beside the direction's copy stream:
    the gather of one group of chunks overlaps the DMA of the previous group. A batch that fits
    one buffer is one kernel launch; a larger batch is one launch per buffer-full.
    ``staging_bytes`` (per direction, default 256 MiB) trades GPU memory for fewer launches.
    """

    name = "gpu-triton-staged"

    def __init__(self, *args, staging_bytes: int | None = None, max_programs: int | None = None,
                 **kw):
        super().__init__(*args, max_programs=max_programs or 16, **kw)
        if max_programs is None:
            # Short device-to-device bursts: a wide grid finishes them at HBM speed.
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            self.copier.max_programs = 4 * sms
        total = staging_bytes if staging_bytes is not None else 256 << 20
        self.staging_chunks = max(1, total // (2 * self.slot_bytes))
        n = self.staging_chunks * self.slot_bytes
        with torch.cuda.device(self.device):
            self.kernel_streams = {
                True: torch.cuda.Stream(self.device),
                False: torch.cuda.Stream(self.device),
            }
            self._buffers = {
                d: [torch.empty(n, dtype=torch.uint8, device=self.device) for _ in range(2)]
                for d in (True, False)
            }
            # Per direction and buffer: "filled" (gather or DMA-in done) and "freed" (its
            # contents consumed) events, re-recorded on each use.
            self._filled = {d: [self.rt.event_create() for _ in range(2)] for d in (True, False)}
            self._freed = {d: [self.rt.event_create() for _ in range(2)] for d in (True, False)}
        self._used = {d: [False, False] for d in (True, False)}
        self._next = {True: 0, False: 0}
        self._offsets = np.arange(self.staging_chunks, dtype=np.int64) * self.slot_bytes
        self._native = None
        self._native_events: list[int] = []
        # The C path reads its launch tables from pinned host memory, over UVA.
        if self.use_native_issue and self.table_on_host:
            try:
                self._native = self._build_native()
            except Exception as exc:  # a Triton or driver detail we did not foresee
                log.warning("native issue of staged transfers off: %r", exc)
                self._native = None
        self.issues_natively = self._native is not None

    def _build_native(self):
        """The C plan of this engine: both directions' compiled kernels, staging buffers,
        events, and a launch-table ring per direction; None where it cannot be used."""
        lib, driver = native_issue.library(), cuda_driver()
        if lib is None or driver is None:
            return None
        c = native_issue.StagedPlan()
        bpc = self.blocks_per_chunk
        ring_slots, entries = 64, self.staging_chunks * (1 + bpc)
        # Triton specializes pointer arguments on 16-byte divisibility: every staging buffer
        # must share the compiled one's.
        if any(b.data_ptr() % 16 for bufs in self._buffers.values() for b in bufs):
            return None
        u = None
        for d in (True, False):
            buf = self._buffers[d][0]
            compiled, u = self.copier.compile(to_slot=d, slot_base=buf.data_ptr(), slot_owner=buf,
                                              bpc=bpc, stream=self.kernel_streams[d])
            spec = KernelSpec.from_triton(compiled, native_issue.N_POINTERS,
                                          native_issue.MAX_SCALARS)
            if spec is None or spec.n_extra > native_issue.MAX_EXTRA:
                return None
            largest = ((ring_slots - 1) * entries, self.staging_chunks, self.copier.n_planes, bpc,
                       bpc * u["piece_units"], u["piece_units"], u["piece_units"], u["tiles"])
            if not spec.fits(largest):
                return None
            k = c.kernel[int(d)]
            k.function, k.block_threads = spec.function, spec.block_threads
            k.shared_bytes, k.n_extra = spec.shared_bytes, spec.n_extra
            k.scalar_size[:] = spec.scalar_sizes
        c.cache = self.copier.cache_base
        c.plane_off, c.plane_stride = u["plane_off"].data_ptr(), u["plane_stride"].data_ptr()
        c.n_planes, c.bpc = self.copier.n_planes, bpc
        c.unit, c.piece_units, c.tiles = u["unit"], u["piece_units"], u["tiles"]
        c.slot_bytes = self.slot_bytes
        c.arena = self.arena.data_ptr()
        c.staging_chunks, c.max_programs = self.staging_chunks, u["max_programs"]
        keep = [c]
        for d in (True, False):
            i = int(d)
            for b in range(2):
                c.staging[i][b] = self._buffers[d][b].data_ptr()
                c.filled[i][b], c.freed[i][b] = self._filled[d][b], self._freed[d][b]
            c.kernel_stream[i] = self.kernel_streams[d].cuda_stream
            c.copy_stream[i] = (self.store_stream if d else self.load_stream).cuda_stream
            table = torch.zeros(ring_slots * entries, dtype=torch.int64, pin_memory=True)
            events = (ctypes.c_void_p * ring_slots)(
                *[self.rt.event_create() for _ in range(ring_slots)])
            self._native_events += list(events)
            in_flight = (ctypes.c_uint8 * ring_slots)()
            keep += [table, events, in_flight]
            r = c.ring[i]
            r.host, r.device = table.data_ptr(), driver.device_pointer(table.data_ptr())
            r.events, r.in_flight = ctypes.addressof(events), ctypes.addressof(in_flight)
            r.slots, r.entries = ring_slots, entries
        api = native_issue.make_api(self.rt, driver)
        keep.append(api)
        return lib.kvd_staged, (ctypes.addressof(api), ctypes.addressof(c)), keep

    def _issue(self, to_slot, slots, bids, producer, fence, start, done):
        if self._native is None:
            return super()._issue(to_slot, slots, bids, producer, fence, start, done)
        fn, (api, plan), _ = self._native
        self._native_call(fn, api, plan, slots.ctypes.data, bids.ctypes.data, len(slots),
                          int(to_slot), producer, fence, start, done)

    def _enqueue(self, to_slot, slots, bids, stream, fence):
        kstream = self.kernel_streams[to_slot]
        rt = self.rt
        kernel_stream = kstream.cuda_stream
        rt.wait(kernel_stream, fence)
        arena = self.arena.data_ptr()
        copy_stream = stream.cuda_stream
        sb = self.slot_bytes
        memcpy = self.rt.memcpy_async
        for g in range(0, len(slots), self.staging_chunks):
            gs = slots[g : g + self.staging_chunks]
            gb = bids[g : g + self.staging_chunks]
            b = self._next[to_slot]
            self._next[to_slot] = 1 - b
            buf = self._buffers[to_slot][b]
            base = buf.data_ptr()
            offs = self._offsets[: len(gs)]
            filled = self._filled[to_slot][b]
            freed = self._freed[to_slot][b]
            reuse = self._used[to_slot][b]
            self._used[to_slot][b] = True
            if to_slot:
                if reuse:
                    rt.wait(kernel_stream, freed)  # its last DMA out has read it
                self.copier.launch(to_slot=True, slot_base=base, slot_owner=buf,
                                   slot_offsets=offs, block_ids=gb, stream=kstream)
                rt.record(filled, kernel_stream)
                rt.wait(copy_stream, filled)
                for off, so in zip(gs.tolist(), offs.tolist()):
                    code = memcpy(arena + off, base + so, sb, 4, copy_stream)
                    if code:
                        rt.check(code, "cudaMemcpyAsync")
                rt.record(freed, copy_stream)
            else:
                if reuse:
                    rt.wait(copy_stream, freed)  # its last scatter has read it
                for off, so in zip(gs.tolist(), offs.tolist()):
                    code = memcpy(base + so, arena + off, sb, 4, copy_stream)
                    if code:
                        rt.check(code, "cudaMemcpyAsync")
                rt.record(filled, copy_stream)
                rt.wait(kernel_stream, filled)
                self.copier.launch(to_slot=False, slot_base=base, slot_owner=buf,
                                   slot_offsets=offs, block_ids=gb, stream=kstream)
                rt.record(freed, kernel_stream)
        # A load ends with its last scatter, after every DMA in and every earlier scatter.
        return None if to_slot else kstream

    def close(self) -> None:
        if not self._closed:
            for s in self.kernel_streams.values():
                s.synchronize()
            for events in (*self._filled.values(), *self._freed.values(), self._native_events):
                for event in events:
                    self.rt.event_destroy(event)
            self._native = None
        super().close()


_CLASSES = {
    "gpu-dma": DmaTransfer,
    "gpu-triton": TritonTransfer,
    "gpu-triton-staged": StagedTritonTransfer,
}


def make_gpu_transfer(
    layout: PagedLayout,
    arena: torch.Tensor,
    chunk_tokens: int,
    *,
    engine: str = "auto",
    **options,
) -> _GpuTransfer:
    """Build the transfer engine for this layout: ``engine="auto"`` applies ``choose_engine``;
    a name from ENGINES forces one. ``options`` go to the engine: pin, background_pin, timing
    (handles report device_ms()), native_issue (False: issue from Python even where the C
    helper builds), and where they apply batch (DMA: cudaMemcpyBatchAsync or a loop),
    max_programs / num_warps / table_on_host / native_launch (kernel), staging_bytes
    (staged)."""
    if engine == "auto":
        engine, why = choose_engine(layout)
    else:
        why = "asked for"
    if engine not in _CLASSES:
        raise ValueError(f"unknown GPU transfer engine {engine!r}; expected one of {ENGINES}")
    log.info(
        "GPU transfer engine %s for %s (%s)", engine, layout.geometry.layout, why
    )
    return _CLASSES[engine](layout, arena, chunk_tokens, **options)
