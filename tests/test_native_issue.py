"""The C issue path (kvdepot/transfer/native/issue.c) on a machine without a GPU.

The C functions take every CUDA entry point as a function pointer, so here they get plain
host functions in their place: a copy is a memmove, an event record or wait does nothing.
That runs the DMA engine's address arithmetic (runs merged across adjacent pieces, batch and
loop forms, both directions) for every layout against CpuTransfer's bytes, and the error
reporting. The GPU tests (test_gpu_transfer.py) compare it with the Python issue path on a
real device.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from kvdepot.transfer import native_issue
from kvdepot.transfer.gpu import _Plan
from test_gpu_transfer import _check_loaded, _chunks, _layout, _reference
from test_layout import CHUNK, KINDS

lib = native_issue.library()
pytestmark = pytest.mark.skipif(lib is None, reason="no C compiler for the native issue path")

_vp, _sz, _int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
RECORD = ctypes.CFUNCTYPE(_int, _vp, _vp)
WAIT = ctypes.CFUNCTYPE(_int, _vp, _vp, ctypes.c_uint)
QUERY = ctypes.CFUNCTYPE(_int, _vp)
LAST_ERROR = ctypes.CFUNCTYPE(_int)
MEMCPY = ctypes.CFUNCTYPE(_int, _vp, _vp, _sz, _int, _vp)
_P = ctypes.POINTER
BATCH13 = ctypes.CFUNCTYPE(_int, _P(_vp), _P(_vp), _P(_sz), _sz, _vp, _P(_sz), _sz, _vp)
BATCH12 = ctypes.CFUNCTYPE(_int, _P(_vp), _P(_vp), _P(_sz), _sz, _vp, _P(_sz), _sz, _P(_sz), _vp)


class HostApi:
    """Host stand-ins for the CUDA entry points, with a log of what the C code called."""

    def __init__(self, fail_memcpy_at: int | None = None):
        self.calls: list[tuple] = []
        self.fail_memcpy_at = fail_memcpy_at

        def memcpy(dst, src, n, kind, stream):
            self.calls.append(("memcpy", n))
            if self.fail_memcpy_at is not None and len(self.copies()) > self.fail_memcpy_at:
                return 1  # cudaErrorInvalidValue
            ctypes.memmove(dst, src, n)
            return 0

        def batch(dsts, srcs, sizes, count, attrs, attr_idxs, num_attrs, *rest):
            self.calls.append(("batch", count))
            for i in range(count):
                ctypes.memmove(dsts[i], srcs[i], sizes[i])
            return 0

        self.funcs = {
            "record": RECORD(lambda e, s: self.calls.append(("record", e, s)) or 0),
            "wait": WAIT(lambda s, e, f: self.calls.append(("wait", s, e)) or 0),
            "query": QUERY(lambda e: 0),
            "sync": QUERY(lambda e: 0),
            "memcpy": MEMCPY(memcpy),
            "clear_error": LAST_ERROR(lambda: 0),
            "batch13": BATCH13(lambda *a: batch(*a)),
            "batch12": BATCH12(lambda *a: batch(*a)),
        }
        self.api = native_issue.Api(**{
            k: native_issue.function_address(self.funcs[k])
            for k in ("record", "wait", "query", "sync", "memcpy", "clear_error")
        })

    def copies(self):
        return [c for c in self.calls if c[0] in ("memcpy", "batch")]


def _dma(layout, arena, host: HostApi, batch: str | None):
    bpc = layout.blocks_per_chunk(CHUNK)
    plan = _Plan(layout, bpc)
    ptrs = np.ascontiguousarray(plan.plane_ptr.reshape(-1))
    strides = np.ascontiguousarray(plan.plane_stride.reshape(-1))
    c = native_issue.DmaPlan(
        plane_ptr=ptrs.ctypes.data, plane_stride=strides.ctypes.data, piece=plan.piece,
        slot_plane_stride=plan.slot_plane_stride, slot_block_stride=plan.slot_block_stride,
        arena=arena.data_ptr(),
        batch=native_issue.function_address(host.funcs[batch]) if batch else None,
        batch_has_fail_idx=int(batch == "batch12"), n_planes=len(plan.views),
        bpc=bpc,
    )

    def call(chunks, to_slot: bool) -> tuple[int, int]:
        slots = np.array([ch.slot_offset for ch in chunks], dtype=np.int64)
        bids = np.array([list(ch.block_ids) for ch in chunks], dtype=np.int64)
        failed = ctypes.c_int32(0)
        code = lib.kvd_dma(ctypes.addressof(host.api), ctypes.addressof(c), slots.ctypes.data,
                           bids.ctypes.data, len(chunks), int(to_slot), 11, 22, 33, 0, 44,
                           ctypes.addressof(failed))
        return code, failed.value

    call.keep = (ptrs, strides, c)
    return call


@pytest.mark.parametrize("batch", [None, "batch13", "batch12"])
@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_dma_issue_moves_cpu_transfers_bytes(kind, consecutive, batch):
    layout, caches, bufs = _layout(kind, block_size=16)
    slot = layout.slot_bytes(CHUNK)
    chunks = _chunks(layout, 2, 16, slot, consecutive=consecutive)
    ref = _reference(layout, bufs, chunks, slot, 2 * slot)
    arena = torch.zeros(2 * slot, dtype=torch.uint8)
    host = HostApi()
    dma = _dma(layout, arena, host, batch)
    assert dma(chunks, True) == (0, 0)
    assert torch.equal(arena, ref)
    # Ordered after the producer (stream 11) through the fence (33), done (44) recorded last.
    assert host.calls[0] == ("record", 33, 11) and host.calls[1] == ("wait", 22, 33)
    assert host.calls[-1] == ("record", 44, 22)
    copies = host.copies()
    batched = [c[0] for c in copies] == ["batch"]
    if batch:  # one batch call, unless everything merged into one copy
        assert batched or [c[0] for c in copies] == ["memcpy"]
    runs = copies[0][1] if batched else len(copies)
    if consecutive and kind in ("v026", "LBNHC", "BLHNC", "mla026"):
        assert runs < 2 * layout.num_planes * (CHUNK // 16)  # adjacent pieces merged
    saved = [b.clone() for b in bufs]
    for b in bufs:
        b.view(torch.uint8).fill_(0x5A)
    assert dma(chunks, False) == (0, 0)
    _check_loaded(layout, bufs, saved, chunks, 0x5A)


def test_dma_issue_reports_the_failing_call():
    layout, caches, bufs = _layout("v026", block_size=16)
    slot = layout.slot_bytes(CHUNK)
    chunks = _chunks(layout, 1, 16, slot)
    arena = torch.zeros(slot, dtype=torch.uint8)
    host = HostApi(fail_memcpy_at=2)
    code, failed = _dma(layout, arena, host, None)(chunks, True)
    assert (code, native_issue.CALLS[failed]) == (1, "cudaMemcpyAsync")
    assert len(host.copies()) == 3  # stopped at the failing copy; no completion recorded
    assert not any(c[:2] == ("record", 44) for c in host.calls)


def test_plans_match_the_c_layouts():
    """The ctypes mirrors have the C structs' sizes (checked again at every load)."""
    assert lib.kvd_sizeof_staged_plan() == ctypes.sizeof(native_issue.StagedPlan)
    assert lib.kvd_sizeof_dma_plan() == ctypes.sizeof(native_issue.DmaPlan)
