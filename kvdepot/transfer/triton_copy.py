"""One fused Triton kernel that moves every piece of a batch of chunks.

A per-layer paged cache hands out pieces of 8-72 KB; one cudaMemcpyAsync per piece collapses
to 1-5 GB/s at that size (on the H200 machines each call costs ~15 us of host time). Instead
one launch covers all chunks, all planes and all blocks: each program walks (chunk, plane,
block, tile) work items, reads the block id and the slot offset from a small table, and copies
a tile of a piece. The slot side is either the arena itself (host memory registered with CUDA,
written or read over UVA) or a device staging buffer that the copy engines then move.

The grid is persistent (a bounded number of programs striding over the work): a PCIe-bound
copy needs only enough bytes in flight to cover the link's latency, and every SM it holds is
one the model cannot use.

Host cost per launch matters as much as the kernel (a 40 MiB chunk moves in ~0.8 ms): the
kernel arguments that never change are built once, and the per-launch table (slot offsets and
block ids) is written into a pinned host ring that the kernel reads over UVA, so a launch is
one kernel launch and one event, with no allocation and no upload. After the first launch of a
specialization through Triton, later ones go straight to cuLaunchKernel (native_launch.py).

Triton is optional: this module imports it, so import it only where triton is installed
(kvdepot.transfer.gpu does so lazily, after ``triton_available()``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import os
import threading

import numpy as np
import torch
import triton
import triton.language as tl

from kvdepot.transfer.native_launch import NativeLaunch
from kvdepot.transfer.pinning import cuda_runtime

log = logging.getLogger(__name__)

MAX_TILE_BYTES = 16384  # one program iteration; 8 x 16 B vectors per thread at 4 warps


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kv_copy(
    cache_ptr,  # base of the paged cache, typed by the copy unit
    slot_ptr,  # base of the slots (arena over UVA, or a device staging buffer)
    plane_off_ptr,  # int64 [n_planes]: plane start, in units from cache_ptr
    plane_stride_ptr,  # int64 [n_planes]: distance between blocks of a plane, in units
    table_ptr,  # int64 ring; at table_off: [n_chunks] slot offsets (units), [n_chunks*bpc] ids
    table_off,
    n_chunks,
    n_planes,
    bpc,
    slot_plane_stride,  # units between a plane's pieces in a slot ...
    slot_block_stride,  # ... and between a block's pieces
    piece_units,
    tiles,  # tiles per piece
    TILE: tl.constexpr,
    EVEN: tl.constexpr,  # TILE divides the piece: no masks
    VEC: tl.constexpr,  # units every address is a multiple of (for wide accesses)
    TO_SLOT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    total = n_chunks * n_planes * bpc * tiles
    lanes = tl.arange(0, TILE)
    table = table_ptr + table_off
    for w in tl.range(pid, total, nprog):
        tile = w % tiles
        piece = w // tiles
        j = piece % bpc
        rest = piece // bpc
        p = rest % n_planes
        c = rest // n_planes
        block = tl.load(table + n_chunks + c * bpc + j)
        slot = tl.load(table + c)
        src = tl.load(plane_off_ptr + p) + block * tl.load(plane_stride_ptr + p)
        dst = slot + p.to(tl.int64) * slot_plane_stride + j.to(tl.int64) * slot_block_stride
        src = tl.multiple_of(src, VEC)
        dst = tl.multiple_of(dst, VEC)
        offs = tile * TILE + lanes
        if TO_SLOT:
            if EVEN:
                tl.store(slot_ptr + dst + offs, tl.load(cache_ptr + src + offs))
            else:
                m = offs < piece_units
                tl.store(slot_ptr + dst + offs, tl.load(cache_ptr + src + offs, mask=m), mask=m)
        else:
            if EVEN:
                tl.store(cache_ptr + src + offs, tl.load(slot_ptr + dst + offs))
            else:
                m = offs < piece_units
                tl.store(cache_ptr + src + offs, tl.load(slot_ptr + dst + offs, mask=m), mask=m)


@functools.cache
def _kernel(interpret: bool):
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_kv_copy)
    # Sizes change per call (batch size, layout); specializing on them (value 1, multiples of
    # 16) would compile a new kernel for each. Alignment comes from VEC instead.
    return triton.jit(
        _kv_copy,
        do_not_specialize=[
            "table_off", "n_chunks", "n_planes", "bpc", "slot_plane_stride",
            "slot_block_stride", "piece_units", "tiles",
        ],
    )


def _pointer(addr: int, owner: torch.Tensor, dtype: torch.dtype):
    """A typed kernel argument at ``addr``: a zero-length view of the owner's storage starting
    there, reinterpreted (as triton.reinterpret does). Triton's launcher turns the address
    into a device address with cuPointerGetAttribute, which accepts registered host memory."""
    from triton.runtime.jit import TensorWrapper

    storage = owner.untyped_storage()
    view = torch.empty(0, dtype=torch.uint8, device=owner.device)
    view.set_(storage, addr - storage.data_ptr(), (1,), (1,))
    return TensorWrapper(view, dtype)


_UNIT_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _low_bit(x: int) -> int:
    return x & -x if x else 1 << 30


def _pick_tile(piece_units: int, max_tile: int) -> int:
    """The power-of-two tile with the least masked-off lanes plus per-iteration overhead
    (about 256 units' worth: four table loads and the index arithmetic)."""
    best, best_cost = 1, None
    t = min(max_tile, triton.next_power_of_2(piece_units))
    while t >= 1:
        cost = triton.cdiv(piece_units, t) * (t + 256)
        if best_cost is None or cost < best_cost:
            best, best_cost = t, cost
        if t <= 64:
            break
        t //= 2
    return best


def _unit_and_vec(align: int) -> tuple[int, int]:
    """(copy unit in bytes, units per aligned vector) for addresses aligned to ``align``."""
    unit = 4 if align >= 4 else (2 if align >= 2 else 1)
    return unit, max(1, align // unit)


def _on(stream):
    """torch's current-stream context for ``stream``; nothing without one (CPU)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class _TableRing:
    """Per-launch tables in pinned host memory, read by the kernel over UVA.

    ``slots`` fixed-size slots used in turn; a slot is rewritten only after the launch that
    read it has finished (its event), which in practice never waits. A table larger than a
    slot gets its own pinned buffer, kept until its launch is done."""

    def __init__(self, slots: int, slot_entries: int, device: torch.device, on_host: bool):
        self.on_gpu = device.type == "cuda"
        self.tensor = torch.zeros(slots * slot_entries, dtype=torch.int64, pin_memory=self.on_gpu)
        self.array = self.tensor.numpy()
        # on_host=False: each table is also copied into a device ring, for systems where a
        # kernel should not read host memory (one more async copy per launch).
        self.device_tensor = None if on_host or not self.on_gpu else torch.zeros(
            slots * slot_entries, dtype=torch.int64, device=device
        )
        self.slots = slots
        self.slot_entries = slot_entries
        self.next = 0
        # One reusable CUDA event per slot (raw handles: a torch event per launch cost ~5 us).
        self.rt = cuda_runtime() if self.on_gpu else None
        self.events = [self.rt.event_create() for _ in range(slots)] if self.rt else []
        self.in_flight = [False] * slots
        self.large: list = []  # (tensors, event) of oversized tables still in flight
        self._moved = None
        self.lock = threading.Lock()
        ring = self.tensor if self.device_tensor is None else self.device_tensor
        self.arg = _pointer(ring.data_ptr(), ring, torch.int64)

    def publish(self, slot, start: int, n: int):
        """Copy the written table into the device ring (an async copy on the current stream);
        returns the kernel argument for oversized tables."""
        if isinstance(slot, int):
            self.device_tensor[start : start + n].copy_(
                self.tensor[start : start + n], non_blocking=True
            )
            return None
        dev = slot.to(self.device_tensor.device, non_blocking=True)
        self._moved = dev  # kept with the host copy until the launch is done
        return _pointer(dev.data_ptr(), dev, torch.int64)

    def take(self, n: int):
        """(kernel argument, element offset, numpy view of n entries, slot or None)."""
        if n > self.slot_entries:
            self.large = [(t, e) for t, e in self.large if e is not None and not e.query()]
            t = torch.zeros(n, dtype=torch.int64, pin_memory=self.on_gpu)
            return _pointer(t.data_ptr(), t, torch.int64), 0, t.numpy(), t
        i = self.next
        self.next = (i + 1) % self.slots
        if self.in_flight[i]:
            if not self.rt.query(self.events[i]):
                self.rt.synchronize(self.events[i])
            self.in_flight[i] = False
        start = i * self.slot_entries
        return self.arg, start, self.array[start : start + n], i

    def done_after(self, slot, stream) -> None:
        """The launch that reads ``slot`` is enqueued on ``stream`` (None: ran already)."""
        if isinstance(slot, int):
            if self.rt is not None and stream is not None:
                self.rt.record(self.events[slot], stream.cuda_stream)
                self.in_flight[slot] = True
            return
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        self.large.append(((slot, self._moved), event))
        self._moved = None

    def close(self) -> None:
        if self.rt is not None:
            for ev in self.events:
                self.rt.event_destroy(ev)
            self.events = []
            self.rt = None


class FusedCopier:
    """Launches the fused kernel for one layout's planes.

    ``planes`` are uint8 [num_blocks, piece_bytes] strided views (PagedLayout.planes, or the
    single ``blocks`` view of a block-major layout); slot order is (plane, block).
    """

    def __init__(
        self,
        planes: tuple[torch.Tensor, ...],
        piece_bytes: int,
        *,
        max_programs: int = 64,
        num_warps: int = 4,
        ring_slots: int = 512,
        ring_slot_entries: int = 1024,
        table_on_host: bool = True,
        native_launch: bool = True,
    ):
        self.device = planes[0].device
        self.piece_bytes = piece_bytes
        self.n_planes = len(planes)
        self.max_programs = max_programs
        self.num_warps = num_warps
        ptrs = [p.data_ptr() for p in planes]
        strides = [p.stride(0) for p in planes]
        base_i = min(range(len(ptrs)), key=ptrs.__getitem__)
        self.cache_base = ptrs[base_i]  # the kernel's cache pointer (lowest plane start)
        rel = [p - self.cache_base for p in ptrs]
        g = 0
        for v in [self.cache_base, piece_bytes, *rel, *strides]:
            g = math.gcd(g, v)
        self.static_align = min(16, _low_bit(g))
        # Everything that does not change between launches, per copy unit (1, 2, 4 bytes).
        self._per_unit = {}
        for unit in (1, 2, 4):
            if unit > self.static_align:
                continue
            piece_units = piece_bytes // unit
            tile = _pick_tile(piece_units, MAX_TILE_BYTES // unit)
            self._per_unit[unit] = dict(
                dtype=_UNIT_DTYPE[unit],
                cache=_pointer(self.cache_base, planes[base_i], _UNIT_DTYPE[unit]),
                plane_off=torch.tensor([r // unit for r in rel], dtype=torch.int64).to(self.device),
                plane_stride=torch.tensor([s // unit for s in strides], dtype=torch.int64).to(
                    self.device
                ),
                piece_units=piece_units,
                tile=tile,
                tiles=triton.cdiv(piece_units, tile),
                even=piece_units % tile == 0,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the tables are read from other streams
        self.ring = _TableRing(ring_slots, ring_slot_entries, self.device, table_on_host)
        self._slot_args: dict[tuple[int, int], object] = {}
        self._kernel = _kernel(interpreting())
        # Per specialization (see _native_key): the native launcher, or None where it cannot be
        # used (then Triton's launcher is).
        self.native_launch = native_launch and self.device.type == "cuda" and not interpreting()
        self._native: dict[tuple, NativeLaunch | None] = {}
        self.native_launches = 0

    def _slot_arg(self, addr: int, owner: torch.Tensor, unit: int):
        key = (addr, unit)
        arg = self._slot_args.get(key)
        if arg is None:
            arg = self._slot_args[key] = _pointer(addr, owner, _UNIT_DTYPE[unit])
        return arg

    def unit_for(self, slot_base: int, slot_offsets: np.ndarray) -> int:
        """The alignment (bytes, at most 16) every address and size of this call shares."""
        ored = int(np.bitwise_or.reduce(slot_offsets)) if len(slot_offsets) else 0
        return min(self.static_align, _low_bit(slot_base), _low_bit(ored), 16)

    def launch(
        self,
        *,
        to_slot: bool,
        slot_base: int,
        slot_owner: torch.Tensor,
        slot_offsets: np.ndarray,  # int64 [n_chunks], bytes from slot_base
        block_ids: np.ndarray,  # int64 [n_chunks, bpc]
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """Enqueue the copy on ``stream`` (on a GPU; under Triton's interpreter, run it)."""
        n_chunks, bpc = block_ids.shape
        align = self.unit_for(slot_base, slot_offsets)
        unit, vec = _unit_and_vec(align)
        u = self._per_unit[unit]
        n = n_chunks * (1 + bpc)
        with self.ring.lock:
            table_arg, start, table, slot = self.ring.take(n)
            table[:n_chunks] = slot_offsets // unit
            table[n_chunks:] = block_ids.reshape(-1)
            if self.ring.device_tensor is not None:
                with _on(stream):  # the table's upload goes ahead of the kernel
                    moved = self.ring.publish(slot, start, n)
                if moved is not None:
                    table_arg = moved
            piece_units = u["piece_units"]
            total = n_chunks * self.n_planes * bpc * u["tiles"]
            grid = max(1, min(total, self.max_programs))
            pointers = (self.cache_base, slot_base, u["plane_off"].data_ptr(),
                        u["plane_stride"].data_ptr(), table_arg.data_ptr())
            scalars = (start, n_chunks, self.n_planes, bpc, bpc * piece_units, piece_units,
                       piece_units, u["tiles"])
            key = None
            if self.native_launch and stream is not None and isinstance(slot, int):
                key = (to_slot, unit, vec, pointers,
                       tuple(-(1 << 31) <= v < (1 << 31) for v in scalars))
                native = self._native.get(key)  # the key holds each integer's width
                if native is not None:
                    code = native(grid, stream.cuda_stream, scalars)
                    if code == 0:
                        self.native_launches += 1
                        self._after_launch(stream, slot)
                        return
                    # Not sticky (a launch that did not start): use Triton from now on.
                    log.warning(
                        "native kernel launch failed (%s); using Triton's launcher",
                        native.driver.describe(code),
                    )
                    self._native[key] = None
                    key = None
            with _on(stream):  # Triton's launcher enqueues on the current stream
                compiled = self._launch_with_triton(grid, u, table_arg, scalars, slot_base,
                                                    slot_owner, unit, vec, to_slot)
            if key is not None and key not in self._native:
                # (Oversized tables get a buffer of their own per launch: never native.)
                self._native[key] = NativeLaunch.from_triton(compiled, pointers, len(scalars))
            self._after_launch(stream, slot)

    def compile(self, *, to_slot: bool, slot_base: int, slot_owner: torch.Tensor, bpc: int,
                stream: torch.cuda.Stream) -> tuple[object, dict]:
        """Compile the kernel ``launch`` uses for slots at ``slot_base`` (offsets multiples of
        its alignment) with a launch that copies nothing; returns Triton's compiled kernel
        and what a launch of it needs: copy unit, per-unit constants (``plane_off``,
        ``plane_stride``, ``piece_units``, ``tiles``) and ``max_programs``."""
        unit, vec = _unit_and_vec(self.unit_for(slot_base, np.zeros(0, dtype=np.int64)))
        u = self._per_unit[unit]
        with self.ring.lock:
            table_arg, start, _, slot = self.ring.take(0)
            scalars = (start, 0, self.n_planes, bpc, bpc * u["piece_units"], u["piece_units"],
                       u["piece_units"], u["tiles"])
            with _on(stream):
                compiled = self._launch_with_triton(1, u, table_arg, scalars, slot_base,
                                                    slot_owner, unit, vec, to_slot)
            self._after_launch(stream, slot)
        return compiled, dict(u, unit=unit, max_programs=self.max_programs)

    def _launch_with_triton(self, grid, u, table_arg, scalars, slot_base, slot_owner, unit,
                            vec, to_slot):
        start, n_chunks, n_planes, bpc, plane_stride, block_stride, piece_units, tiles = scalars
        return self._kernel[(grid,)](
            u["cache"],
            self._slot_arg(slot_base, slot_owner, unit),
            u["plane_off"],
            u["plane_stride"],
            table_arg,
            start,
            n_chunks,
            n_planes,
            bpc,
            plane_stride,  # slots are (plane, block) ordered
            block_stride,
            piece_units,
            tiles,
            TILE=u["tile"],
            EVEN=u["even"],
            VEC=vec,
            TO_SLOT=to_slot,
            num_warps=self.num_warps,
        )

    def _after_launch(self, stream, slot) -> None:
        self.ring.done_after(slot, stream if self.device.type == "cuda" else None)

    def close(self) -> None:
        self.ring.close()
