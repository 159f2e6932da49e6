"""GPU transfer engines: bit-exact round trips for every layout, stream ordering, pinning.

Tests marked ``gpu`` need CUDA and skip without it. The rest run anywhere: the engine choice,
the DMA engine's address plan (executed with memmove on CPU tensors) and the fused kernel under
Triton's interpreter (when triton is installed), each against CpuTransfer.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from kvdepot.transfer.base import ChunkCopy
from kvdepot.transfer.cpu import CpuTransfer
from kvdepot.transfer.gpu import _Plan, _runs, choose_engine, triton_available
from kvdepot.transfer.layout import describe_layout
from test_layout import CHUNK, KINDS, build_kv_caches, make_arena

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _layout(kind, *, block_size=16, layers=3, heads=2, head_dim=8, latent=24, num_blocks=None,
            device="cpu", dtype=torch.bfloat16, seed=0, fill=True):
    bpc = CHUNK // block_size
    num_blocks = num_blocks or 3 * bpc + 5
    caches, bufs = build_kv_caches(
        kind, layers=layers, num_blocks=num_blocks, block_size=block_size, heads=heads,
        head_dim=head_dim, latent=latent, device=device, dtype=dtype, seed=seed, fill=fill,
    )
    layout = describe_layout(caches, num_blocks, block_size, is_mla=kind.startswith("mla"))
    return layout, caches, bufs


def _chunks(layout, n, block_size, slot_bytes, *, seed=1, base=0, consecutive=False):
    bpc = CHUNK // block_size
    if consecutive:
        ids = list(range(n * bpc))
    else:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randperm(layout.num_blocks, generator=g)[: n * bpc].tolist()
    return [
        ChunkCopy(slot_offset=base + i * slot_bytes, block_ids=ids[i * bpc : (i + 1) * bpc])
        for i in range(n)
    ]


# -- anywhere ------------------------------------------------------------------------------


def test_engine_choice_follows_run_size():
    # Qwen3-14B geometry, two blocks (the rule reads sizes, not data).
    q = dict(layers=40, heads=8, head_dim=128, num_blocks=4, fill=False)
    per_layer, _, _ = _layout("v026", **q)
    cross, _, _ = _layout("BLHNC", **q)
    assert choose_engine(cross, triton_ok=True)[0] == "gpu-dma"  # 2.5 MiB per block
    assert choose_engine(per_layer, triton_ok=True)[0] == "gpu-triton-staged"  # 64 KiB pieces
    assert choose_engine(per_layer, triton_ok=False)[0] == "gpu-dma"  # works without triton
    bhlnc, _, _ = _layout("BHLNC", **q)
    assert choose_engine(bhlnc, triton_ok=True)[0] == "gpu-dma"  # block-outer, read as such


def test_engine_choice_env_override(monkeypatch):
    layout, _, _ = _layout("v026")
    monkeypatch.setenv("KVDEPOT_GPU_ENGINE", "gpu-dma")
    assert choose_engine(layout, triton_ok=True) == ("gpu-dma", "KVDEPOT_GPU_ENGINE")
    monkeypatch.setenv("KVDEPOT_GPU_ENGINE", "nope")
    with pytest.raises(ValueError):
        choose_engine(layout)


def _reference(layout, bufs, chunks, slot_bytes, arena_bytes):
    arena = torch.zeros(arena_bytes, dtype=torch.uint8)
    CpuTransfer(layout, arena, CHUNK).store(chunks)
    return arena


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("consecutive", [False, True])
def test_dma_plan_round_trip_on_cpu(kind, block_size, consecutive):
    """The DMA engine's runs, executed with memmove, move exactly CpuTransfer's bytes."""
    layout, caches, bufs = _layout(kind, block_size=block_size)
    slot = layout.slot_bytes(CHUNK)
    chunks = _chunks(layout, 2, block_size, slot, consecutive=consecutive)
    ref = _reference(layout, bufs, chunks, slot, 2 * slot)
    arena = torch.zeros(2 * slot, dtype=torch.uint8)
    plan = _Plan(layout, CHUNK // block_size)
    slots = np.array([c.slot_offset for c in chunks], dtype=np.int64)
    bids = np.array([list(c.block_ids) for c in chunks], dtype=np.int64)
    cache, dst, sizes = _runs(plan, arena.data_ptr(), slots, bids)
    assert int(sizes.sum()) == 2 * slot
    if consecutive and kind in ("v026", "LBNHC", "BLHNC", "mla026"):
        assert len(sizes) < 2 * layout.num_planes * (CHUNK // block_size)  # runs were merged
    for c, d, n in zip(cache.tolist(), dst.tolist(), sizes.tolist()):
        ctypes.memmove(d, c, n)
    assert torch.equal(arena, ref)
    saved = [b.clone() for b in bufs]
    for b in bufs:
        b.view(torch.uint8).fill_(0)
    for c, d, n in zip(cache.tolist(), dst.tolist(), sizes.tolist()):
        ctypes.memmove(c, d, n)
    _check_loaded(layout, bufs, saved, chunks, 0)


def _check_loaded(layout, bufs, saved, chunks, poison):
    """Loaded blocks hold the saved bytes again; every other block still holds the poison."""
    touched = torch.zeros(layout.num_blocks, dtype=torch.bool, device=bufs[0].device)
    touched[[bid for c in chunks for bid in c.block_ids]] = True
    for plane, orig in zip(layout.planes, _planes_of(layout, bufs, saved)):
        assert torch.equal(plane[touched], orig[touched])
        assert bool((plane[~touched] == poison).all())


def _interpreter_works() -> bool:
    """Some triton/numpy pairs cannot interpret a loop with a runtime start (seen: triton
    3.6 with numpy 2.5, 'only 0-dimensional arrays can be converted to Python scalars')."""
    if not triton_available():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    def probe(out_ptr, n):
        for i in tl.range(tl.program_id(0), n, tl.num_programs(0)):
            tl.store(out_ptr + i, i)

    out = torch.zeros(4, dtype=torch.int32)
    try:
        InterpretedFunction(probe)[(2,)](out, 4)
    except Exception:
        return False
    return out.tolist() == [0, 1, 2, 3]


interp = pytest.mark.skipif(
    not triton_available() or not _interpreter_works(),
    reason="triton not installed, or its interpreter cannot run here",
)


@interp
@pytest.mark.parametrize("kind", ["v026", "kv_split", "LHBNC", "BHLNC", "mla026"])
def test_fused_kernel_under_interpreter(kind, monkeypatch):
    """The kernel's indexing, run by Triton's CPU interpreter, matches CpuTransfer."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kvdepot.transfer import triton_copy

    layout, caches, bufs = _layout(kind, layers=2, head_dim=4, latent=12)
    slot = layout.slot_bytes(CHUNK)
    chunks = _chunks(layout, 2, 16, slot, base=16)
    ref = _reference(layout, bufs, chunks, slot, 16 + 2 * slot)
    plan = _Plan(layout, CHUNK // 16)
    # A ring of two small slots: the first launches take oversized tables, later ones reuse
    # the slots in turn.
    copier = triton_copy.FusedCopier(plan.views, plan.piece, max_programs=7, ring_slots=2,
                                     ring_slot_entries=20)
    arena = torch.zeros(16 + 2 * slot, dtype=torch.uint8)
    bids = np.array([list(c.block_ids) for c in chunks], dtype=np.int64)
    offs = np.array([c.slot_offset for c in chunks], dtype=np.int64)
    copier.launch(to_slot=True, slot_base=arena.data_ptr(), slot_owner=arena,
                  slot_offsets=offs, block_ids=bids)
    assert torch.equal(arena, ref)
    saved = [b.clone() for b in bufs]
    for b in bufs:
        b.view(torch.uint8).fill_(0x33)
    copier.launch(to_slot=False, slot_base=arena.data_ptr(), slot_owner=arena,
                  slot_offsets=offs, block_ids=bids)
    _check_loaded(layout, bufs, saved, chunks, 0x33)


@interp
def test_table_ring_slots_are_reused_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kvdepot.transfer import triton_copy

    layout, caches, bufs = _layout("v026", layers=2, head_dim=4)
    slot = layout.slot_bytes(CHUNK)
    chunks = _chunks(layout, 3, 16, slot)
    ref = _reference(layout, bufs, chunks, slot, 3 * slot)
    plan = _Plan(layout, CHUNK // 16)
    copier = triton_copy.FusedCopier(plan.views, plan.piece, max_programs=3, ring_slots=2,
                                     ring_slot_entries=17)
    arena = torch.zeros(3 * slot, dtype=torch.uint8)
    for c in chunks:  # three launches through two slots
        copier.launch(to_slot=True, slot_base=arena.data_ptr(), slot_owner=arena,
                      slot_offsets=np.array([c.slot_offset], dtype=np.int64),
                      block_ids=np.array([list(c.block_ids)], dtype=np.int64))
    assert copier.ring.next == 1
    assert torch.equal(arena, ref)


@interp
def test_fused_kernel_unaligned_pieces_under_interpreter(monkeypatch):
    """A slot at an odd offset makes the kernel fall back to byte units, still exact."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kvdepot.transfer import triton_copy

    layout, caches, bufs = _layout("kv_split", layers=2, heads=1, head_dim=3, dtype=torch.float16)
    slot = layout.slot_bytes(CHUNK)
    chunks = _chunks(layout, 1, 16, slot, base=1)  # odd slot offset too: byte units
    ref = _reference(layout, bufs, chunks, slot, 1 + slot)
    plan = _Plan(layout, CHUNK // 16)
    copier = triton_copy.FusedCopier(plan.views, plan.piece, max_programs=5)
    arena = torch.zeros(1 + slot, dtype=torch.uint8)
    offs = np.array([1], dtype=np.int64)
    assert copier.unit_for(arena.data_ptr(), offs) == 1
    bids = np.array([list(c.block_ids) for c in chunks], dtype=np.int64)
    copier.launch(to_slot=True, slot_base=arena.data_ptr(), slot_owner=arena,
                  slot_offsets=offs, block_ids=bids)
    assert torch.equal(arena, ref)


# -- on a GPU ------------------------------------------------------------------------------

GPU_ENGINES = ["gpu-dma", "gpu-dma-loop", "dma-python-issue", "gpu-triton", "gpu-triton-staged",
               "staged-devtable", "staged-python-issue"]


def _engine(name, layout, arena, **kw):
    from kvdepot.transfer.gpu import make_gpu_transfer

    if name == "gpu-dma-loop":
        return make_gpu_transfer(layout, arena, CHUNK, engine="gpu-dma", batch=False, **kw)
    if name == "dma-python-issue":
        return make_gpu_transfer(layout, arena, CHUNK, engine="gpu-dma", native_issue=False, **kw)
    if name == "staged-devtable":
        name = "gpu-triton-staged"
        kw.setdefault("table_on_host", False)  # (issued from Python: the C path's ring is pinned)
    if name == "staged-python-issue":
        name = "gpu-triton-staged"
        kw.setdefault("native_issue", False)
    if name == "gpu-triton-staged":
        kw.setdefault("staging_bytes", 1)  # one chunk at a time: exercises the grouping
    return make_gpu_transfer(layout, arena, CHUNK, engine=name, **kw)


@pytest.fixture(scope="module")
def shm_arena():
    return make_arena(64 << 20)


def _gpu_round_trip(kind, block_size, engine, arena, *, geom=(2, 64, 576), n_chunks=3):
    heads, head_dim, latent = geom
    bpc = CHUNK // block_size
    layout, caches, bufs = _layout(
        kind, block_size=block_size, layers=4, heads=heads, head_dim=head_dim, latent=latent,
        num_blocks=(n_chunks + 2) * bpc + 3, device="cuda",
    )
    slot = layout.slot_bytes(CHUNK)
    base = 4096 + 16  # slots need not be page aligned
    assert base + n_chunks * slot <= arena.numel()
    chunks = _chunks(layout, n_chunks, block_size, slot, base=base)
    cpu_layout, _, cpu_bufs = _layout(
        kind, block_size=block_size, layers=4, heads=heads, head_dim=head_dim, latent=latent,
        num_blocks=(n_chunks + 2) * bpc + 3, device="cpu", fill=False,
    )
    for cb, gb in zip(cpu_bufs, bufs):
        cb.copy_(gb.cpu())
    ref = torch.zeros(base + n_chunks * slot, dtype=torch.uint8)
    CpuTransfer(cpu_layout, ref, CHUNK).store(chunks)
    arena[: base + n_chunks * slot + 4096].fill_(0xEE)
    originals = [b.clone() for b in bufs]
    with _engine(engine, layout, arena) as eng:
        h = eng.store(chunks)
        h.wait()
        assert h.done()
        got = arena[base : base + n_chunks * slot]
        assert torch.equal(got, ref[base:]), f"{engine} store of {kind} differs"
        assert bool((arena[:base] == 0xEE).all())
        end = base + n_chunks * slot
        assert bool((arena[end : end + 4096] == 0xEE).all())
        for b in bufs:
            b.view(torch.uint8).fill_(0x11)
        h = eng.load(chunks)
        h.stream_wait()
        _check_loaded(layout, bufs, originals, chunks, 0x11)


def _planes_of(layout, bufs, originals):
    """layout.planes re-pointed at the saved copies of the buffers."""
    out = []
    for plane in layout.planes:
        for b, o in zip(bufs, originals):
            s = b.untyped_storage()
            if plane.untyped_storage().data_ptr() == s.data_ptr():
                flat = torch.empty(0, dtype=torch.uint8, device=o.device)
                flat.set_(o.untyped_storage(), 0, (o.untyped_storage().nbytes(),), (1,))
                out.append(flat.as_strided(plane.shape, plane.stride(), plane.storage_offset()))
                break
        else:
            raise AssertionError("plane of an unknown buffer")
    return out


@gpu
@needs_cuda
@pytest.mark.parametrize("engine", GPU_ENGINES)
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_round_trip_bit_exact(kind, block_size, engine, shm_arena):
    _gpu_round_trip(kind, block_size, engine, shm_arena)


@gpu
@needs_cuda
@pytest.mark.parametrize("engine", ["auto", "gpu-triton", "gpu-dma"])
@pytest.mark.parametrize("geom", [(8, 128, 0), (1, 128, 0), (4, 80, 0)],
                         ids=["tp1", "tp8", "hd80"])
@pytest.mark.parametrize("kind", ["v026", "kv_split", "LHBNC", "BLHNC", "BHLNC"])
def test_gpu_round_trip_tp_shares(kind, geom, engine, shm_arena):
    name = engine
    if engine == "auto":
        layout, _, _ = _layout(kind, layers=4, heads=geom[0], head_dim=geom[1], num_blocks=4,
                               fill=False)
        name = choose_engine(layout)[0]
    _gpu_round_trip(kind, 16, name, shm_arena, geom=(geom[0], geom[1], 576), n_chunks=2)


@gpu
@needs_cuda
@pytest.mark.parametrize("engine", ["gpu-dma", "gpu-triton", "gpu-triton-staged"])
def test_store_waits_for_model_stream_and_load_orders_reader(engine, shm_arena):
    """No host sync: a store enqueued right after a slow model kernel still copies the values
    that kernel wrote; a reader on the model stream after stream_wait sees the loaded bytes."""
    layout, caches, bufs = _layout("v026", layers=4, heads=2, head_dim=64, device="cuda")
    slot = layout.slot_bytes(CHUNK)
    chunks = _chunks(layout, 2, 16, slot)
    model = torch.cuda.Stream()
    with _engine(engine, layout, shm_arena) as eng:
        eng.ready() or eng._pin.wait()
        with torch.cuda.stream(model):
            torch.cuda._sleep(50_000_000)  # tens of ms of "attention"
            for b in bufs:
                b.view(torch.uint8).fill_(0x77)
            h = eng.store(chunks)  # after=None: the current (model) stream
        h.wait()
        assert bool((shm_arena[: 2 * slot] == 0x77).all())
        shm_arena[: 2 * slot].fill_(0x42)
        with torch.cuda.stream(model):
            torch.cuda._sleep(20_000_000)
            h = eng.load(chunks)
            h.stream_wait()
            seen = torch.stack([p[chunks[0].block_ids[0]].clone() for p in layout.planes])
        model.synchronize()
        assert bool((seen == 0x42).all())


@gpu
@needs_cuda
@pytest.mark.parametrize("engine", ["gpu-dma", "gpu-triton"])
def test_stores_and_loads_run_at_once(engine, shm_arena):
    layout, caches, bufs = _layout("v026", layers=4, heads=2, head_dim=64, device="cuda",
                                   num_blocks=200)
    slot = layout.slot_bytes(CHUNK)
    ids = torch.randperm(200)[:64].tolist()
    store = [ChunkCopy(i * slot, ids[i * 16 : (i + 1) * 16]) for i in range(2)]
    load = [ChunkCopy((2 + i) * slot, ids[(2 + i) * 16 : (3 + i) * 16]) for i in range(2)]
    cpu_ref = torch.randint(0, 256, (2 * slot,), dtype=torch.uint8)
    shm_arena[2 * slot : 4 * slot].copy_(cpu_ref)
    with _engine(engine, layout, shm_arena) as eng:
        hs = eng.store(store)
        hl = eng.load(load)
        hs.wait()
        hl.wait()
        back = torch.zeros(2 * slot, dtype=torch.uint8)
        arena2 = make_arena(2 * slot)
        with _engine(engine, layout, arena2) as eng2:
            eng2.store([ChunkCopy(i * slot, c.block_ids) for i, c in enumerate(load)]).wait()
            back.copy_(arena2)
        assert torch.equal(back, cpu_ref)


@gpu
@needs_cuda
def test_pinning_is_shared_and_released(shm_arena):
    from kvdepot.transfer import pinning

    arena = make_arena(8 << 20)
    pin = pinning.pin_arena(arena, torch.device("cuda", 0))
    pin.wait()
    assert pin.ready() and pin.owned and pin.seconds is not None
    assert pin.device_ptr != 0
    again = pinning.pin_arena(arena, torch.device("cuda", 0))
    assert again is pin
    pinning.release_arena(again)
    assert pin.owned  # still held by the first user
    pinning.release_arena(pin)
    assert not pin.owned
    # Registered again from scratch: the range was really unregistered.
    pin2 = pinning.pin_arena(arena, torch.device("cuda", 0), background=False)
    assert pin2.owned
    pinning.release_arena(pin2)
    torch.cuda.synchronize()  # no CUDA error left behind for torch to trip over


@gpu
@needs_cuda
@pytest.mark.parametrize("on_host", [True, False])
def test_table_ring_reuse_with_launches_in_flight(on_host, shm_arena):
    """More launches in flight than table slots: a slot is rewritten only after its kernel ran."""
    from kvdepot.transfer.triton_copy import _TableRing

    layout, caches, bufs = _layout("v026", layers=4, heads=2, head_dim=64, device="cuda",
                                   num_blocks=16 * 8 + 3)
    slot = layout.slot_bytes(CHUNK)
    chunks = _chunks(layout, 8, 16, slot)
    cpu_layout, _, cpu_bufs = _layout("v026", layers=4, heads=2, head_dim=64,
                                      num_blocks=16 * 8 + 3, fill=False)
    for cb, gb in zip(cpu_bufs, bufs):
        cb.copy_(gb.cpu())
    ref = torch.zeros(8 * slot, dtype=torch.uint8)
    CpuTransfer(cpu_layout, ref, CHUNK).store(chunks)
    with _engine("gpu-triton", layout, shm_arena, table_on_host=on_host) as eng:
        eng.copier.ring = _TableRing(2, 64, eng.device, on_host)
        torch.cuda._sleep(20_000_000)  # keep the first kernels queued behind a busy stream
        handles = [eng.store([c]) for c in chunks]
        for h in handles:
            h.wait()
        assert torch.equal(shm_arena[: 8 * slot], ref)


@gpu
@needs_cuda
@pytest.mark.parametrize("engine", ["gpu-dma", "gpu-triton-staged"])
def test_timing_handles_report_device_time(engine, shm_arena):
    layout, _, _ = _layout("v026", device="cuda")
    slot = layout.slot_bytes(CHUNK)
    with _engine(engine, layout, shm_arena, timing=True) as eng:
        for h in (eng.store(_chunks(layout, 2, 16, slot)), eng.load(_chunks(layout, 2, 16, slot))):
            h.wait()
            assert h.device_ms() > 0


@gpu
@needs_cuda
def test_bad_requests_raise(shm_arena):
    layout, _, _ = _layout("v026", device="cuda")
    with _engine("gpu-dma", layout, shm_arena) as eng:
        assert eng.store([]).done()
        with pytest.raises(ValueError):
            eng.store([ChunkCopy(0, [0])])
        with pytest.raises(ValueError):
            eng.store([ChunkCopy(shm_arena.numel(), list(range(16)))])
        with pytest.raises(ValueError):
            eng.load([ChunkCopy(0, [layout.num_blocks] * 16)])


def _disjoint_batches(kind, batches, *, seed, base):
    """(layout, buffers, batches of chunks, arena end) on the GPU: consecutive slots from
    ``base``, every chunk its own blocks, so loads never overwrite each other."""
    layout, caches, bufs = _layout(kind, layers=4, heads=2, head_dim=64, device="cuda",
                                   num_blocks=16 * sum(batches) + 3)
    slot = layout.slot_bytes(CHUNK)
    ids = torch.randperm(layout.num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    plans, used = [], 0
    for n in batches:
        plans.append([ChunkCopy(base + i * slot, ids[(used + i) * 16 : (used + i + 1) * 16])
                      for i in range(n)])
        base += n * slot
        used += n
    return layout, bufs, plans, base


@gpu
@needs_cuda
@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("engine", ["gpu-triton", "gpu-triton-staged"])
@pytest.mark.parametrize("kind", ["v026", "kv_split", "mla026"])
def test_native_launches_match_tritons_launcher(kind, engine, shm_arena):
    """After the first launch of a specialization, launches go straight to cuLaunchKernel:
    many calls of varying batch sizes (table offsets and chunk counts change, pointers do not)
    leave exactly the bytes of Triton's own launcher, both ways."""
    layout, bufs, plans, end = _disjoint_batches(kind, [1, 3, 2, 1, 2], seed=10, base=4096)
    arenas = {}
    for native in (False, True):
        shm_arena[: end + 4096].fill_(0xEE)
        # (Issued from Python: natively issued staged transfers launch from C.)
        with _engine(engine, layout, shm_arena, native_launch=native,
                     native_issue=False) as eng:
            for chunks in plans:
                eng.store(chunks)
            torch.cuda.synchronize()
            assert (eng.copier.native_launches > 0) == native
            arenas[native] = shm_arena[: end + 4096].clone()
            originals = [b.clone() for b in bufs]
            for b in bufs:
                b.view(torch.uint8).fill_(0x11)
            for chunks in plans[:3]:  # disjoint block sets: later plans reuse no block
                eng.load(chunks).stream_wait()
            torch.cuda.synchronize()
            _check_loaded(layout, bufs, originals, [c for p in plans[:3] for c in p], 0x11)
            for b, o in zip(bufs, originals):
                b.copy_(o)
    assert torch.equal(arenas[True], arenas[False])


@gpu
@needs_cuda
@pytest.mark.parametrize("options", [
    dict(engine="gpu-dma"),
    dict(engine="gpu-dma", batch=False),
    dict(engine="gpu-triton-staged"),
    dict(engine="gpu-triton-staged", staging_bytes=1),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("kind", ["v026", "kv_split", "mla026", "BLHNC"])
def test_native_issue_matches_python_issue(kind, options, shm_arena):
    """Transfers issued from C (native/issue.c: runs merged and batched there; staging
    buffers reused, launch tables in their own ring) leave exactly the bytes of the same
    engine issued from Python, over batches of varying size issued back to back behind a busy
    model stream, both ways; and the C path is really taken."""
    from kvdepot.transfer.gpu import make_gpu_transfer

    if options["engine"] == "gpu-triton-staged" and not triton_available():
        pytest.skip("needs triton")
    layout, bufs, plans, end = _disjoint_batches(kind, [1, 3, 2, 1, 4], seed=11, base=4096 + 16)
    assert end + 4096 <= shm_arena.numel()
    originals = [b.clone() for b in bufs]
    arenas, loaded = {}, {}
    for native in (False, True):
        shm_arena[: end + 4096].fill_(0xEE)
        with make_gpu_transfer(layout, shm_arena, CHUNK, native_issue=native, **options) as eng:
            assert eng.issues_natively == native
            torch.cuda._sleep(20_000_000)  # the stores must wait for the model's work
            for chunks in plans:
                eng.store(chunks)
            torch.cuda.synchronize()
            arenas[native] = shm_arena[: end + 4096].clone()
            for b in bufs:
                b.view(torch.uint8).fill_(0x11)
            handles = [eng.load(chunks) for chunks in plans]
            for h in handles:
                h.stream_wait()
            torch.cuda.synchronize()
            loaded[native] = [b.clone() for b in bufs]
            _check_loaded(layout, bufs, originals, [c for p in plans for c in p], 0x11)
            for b, o in zip(bufs, originals):
                b.copy_(o)
    assert torch.equal(arenas[True], arenas[False])
    assert bool((arenas[True][:4096 + 16] == 0xEE).all())
    for a, b in zip(loaded[True], loaded[False]):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # (random bits: NaNs)
