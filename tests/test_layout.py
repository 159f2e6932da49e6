"""Reading every paged KV layout vLLM 0.26-0.33 hands a connector, and CPU round trips.

The builders here are shared with tests/test_gpu_transfer.py and bench/gpu_transfer.py: each
makes one rank's per-layer KV tensors the way that vLLM version lays them out in memory.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvdepot.transfer.base import ChunkCopy
from kvdepot.transfer.cpu import CpuTransfer
from kvdepot.transfer.layout import describe_layout

CHUNK = 256

# 0.33's KVCacheLayout: physical order of [L, B, H, N, C] in one backing buffer.
V033_ORDERS = ("LBNHC", "LBHNC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
KINDS = (
    "v026",  # per-layer (B, H, N, 2D) views over (B, N, H, 2D) allocations
    "kv_split",  # per-layer (2, B, N, H, D)
    *V033_ORDERS,
    "mla026",  # per-layer (B, N, latent)
    "mla_LBNHC",  # 0.33 MLA: H = 1, C = latent, layer-outer
    "mla_BLNHC",  # 0.33 MLA, block-outer
)
BLOCK_OUTER = {"BLHNC", "BLNHC", "BHLNC", "mla_BLNHC"}


def build_kv_caches(
    kind: str,
    *,
    layers: int,
    num_blocks: int,
    block_size: int,
    heads: int,
    head_dim: int,
    latent: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    fill: bool = True,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """(layer name -> tensor, backing buffers). Buffers are filled with random bytes."""
    gen = torch.Generator(device=device).manual_seed(seed)
    buffers: list[torch.Tensor] = []

    def alloc(*shape):
        buf = torch.empty(shape, dtype=dtype, device=device)
        if fill:
            raw = buf.view(torch.uint8) if buf.dim() else buf
            raw.copy_(
                torch.randint(0, 256, raw.shape, dtype=torch.uint8, device=device, generator=gen)
            )
        buffers.append(buf)
        return buf

    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    B, N, H, D = num_blocks, block_size, heads, head_dim
    caches: dict[str, torch.Tensor] = {}
    if kind == "v026":
        for name in names:
            caches[name] = alloc(B, N, H, 2 * D).permute(0, 2, 1, 3)
    elif kind == "kv_split":
        for name in names:
            caches[name] = alloc(2, B, N, H, D)
    elif kind == "mla026":
        for name in names:
            caches[name] = alloc(B, N, latent)
    elif kind in V033_ORDERS or kind.startswith("mla_"):
        order = kind.removeprefix("mla_")
        if kind.startswith("mla_"):
            H, C = 1, latent
        else:
            C = 2 * D
        sizes = {"L": layers, "B": B, "H": H, "N": N, "C": C}
        buf = alloc(*[sizes[c] for c in order])
        logical = buf.permute([order.index(c) for c in "LBHNC"])
        for i, name in enumerate(names):
            caches[name] = logical[i]
    else:
        raise ValueError(kind)
    return caches, buffers


def expected_planes(kind: str, *, layers, block_size, heads, head_dim, latent, esize):
    """(block_major, num_planes, piece_bytes) a correct reader must find."""
    N, H, D = block_size, heads, head_dim
    if kind == "kv_split":
        return False, 2 * layers, N * H * D * esize
    if kind == "mla026" or kind == "mla_LBNHC":
        return False, layers, N * latent * esize
    if kind == "mla_BLNHC":
        return True, layers, N * latent * esize
    if kind in ("LHBNC", "BHLNC") and H > 1:
        return kind == "BHLNC", layers * H, N * 2 * D * esize
    return kind in BLOCK_OUTER, layers, N * H * 2 * D * esize


def memory_bytes(x: torch.Tensor) -> torch.Tensor:
    """x's elements in address order, as bytes (x must not overlap itself)."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return x.permute(order).contiguous().view(-1).view(torch.uint8)


def reference_slot(kind, caches, buffers, block_ids, num_blocks, num_planes) -> torch.Tensor:
    """The slot bytes, computed from the tensors without describe_layout."""
    if kind in BLOCK_OUTER:  # one run per block: the block's whole slice of the buffer
        return torch.cat([memory_bytes(buffers[0][b]) for b in block_ids])
    per_layer_planes = num_planes // len(caches)
    out = []
    for t in caches.values():
        bdim = 1 if kind == "kv_split" else 0
        blocks = [memory_bytes(t.select(bdim, b)) for b in block_ids]
        piece = blocks[0].numel() // per_layer_planes
        for k in range(per_layer_planes):
            out.extend(blk[k * piece : (k + 1) * piece] for blk in blocks)
    return torch.cat(out)


def make_arena(nbytes: int, directory: str | None = None) -> torch.Tensor:
    """A flat uint8 tensor over a mapped file (in /dev/shm unless ``directory`` says), as an
    engine sees the server's arena."""
    import mmap
    import os
    import tempfile

    if directory is None and os.path.isdir("/dev/shm"):
        directory = "/dev/shm"
    fd, path = tempfile.mkstemp(prefix="kvdepot-test-", dir=directory)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
        os.unlink(path)
    return torch.frombuffer(mm, dtype=torch.uint8)


GEOMS = [
    # (heads, head_dim, latent): TP shares of a model's KV heads, and MLA
    (2, 8, 24),
    (1, 16, 24),
    (4, 4, 40),
]


def _dims(kind, heads, head_dim, latent, block_size, layers=3, num_blocks=37):
    return dict(
        layers=layers,
        num_blocks=num_blocks,
        block_size=block_size,
        heads=heads,
        head_dim=head_dim,
        latent=latent,
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: f"h{g[0]}d{g[1]}")
def test_describe_layout_reads_every_layout(kind, geom):
    heads, head_dim, latent = geom
    dims = _dims(kind, heads, head_dim, latent, 16)
    caches, _ = build_kv_caches(kind, **dims)
    is_mla = kind.startswith("mla")
    layout = describe_layout(caches, dims["num_blocks"], 16, is_mla=is_mla)
    bm, n, pb = expected_planes(
        kind, layers=3, block_size=16, heads=heads, head_dim=head_dim, latent=latent, esize=2
    )
    assert (layout.block_major, layout.num_planes, layout.piece_bytes) == (bm, n, pb)
    g = layout.geometry
    if is_mla:
        assert (g.num_kv_heads, g.head_size_k, g.head_size_v) == (1, latent, 0)
    else:
        assert (g.num_kv_heads, g.head_size_k, g.head_size_v) == (heads, head_dim, head_dim)
    assert g.num_layers == 3 and g.block_size == 16
    assert len(layout.plane_layer) == n
    assert sorted(set(layout.plane_layer)) == [0, 1, 2]
    if bm:
        assert layout.blocks is not None
        assert layout.blocks.shape == (dims["num_blocks"], n * pb)
    # Every plane view covers piece_bytes at each block, inside the storage.
    for plane in layout.planes:
        assert plane.shape == (dims["num_blocks"], pb)


def test_bhlnc_is_block_major_in_memory_order():
    caches, bufs = build_kv_caches(
        "BHLNC", layers=3, num_blocks=37, block_size=16, heads=2, head_dim=8
    )
    layout = describe_layout(caches, 37, 16)
    assert layout.block_major
    # Memory order walks heads outside layers: (h0,l0) (h0,l1) (h0,l2) (h1,l0) ...
    assert layout.plane_layer == (0, 1, 2, 0, 1, 2)
    starts = [p.data_ptr() for p in layout.planes]
    assert starts == sorted(starts)
    assert layout.blocks.data_ptr() == bufs[0].data_ptr()


def test_layout_names_tell_byte_orders_apart():
    names = {}
    for kind in ("kv_split", *V033_ORDERS):
        caches, _ = build_kv_caches(
            kind, layers=3, num_blocks=37, block_size=16, heads=2, head_dim=8
        )
        names[kind] = describe_layout(caches, 37, 16).geometry.layout
    assert len(set(names.values())) == len(names), names
    # 0.26's per-layer tensors hold the same bytes as 0.33's LBNHC: they may share chunks.
    caches, _ = build_kv_caches("v026", layers=3, num_blocks=37, block_size=16, heads=2, head_dim=8)
    assert describe_layout(caches, 37, 16).geometry.layout == names["LBNHC"]


def test_heads_equal_to_block_size_kv_split():
    caches, _ = build_kv_caches(
        "kv_split", layers=2, num_blocks=37, block_size=16, heads=16, head_dim=8
    )
    g = describe_layout(caches, 37, 16).geometry
    assert (g.num_kv_heads, g.head_size_k) == (16, 8)


def _chunks(layout, n_chunks, block_size, rng, slot_stride):
    bpc = CHUNK // block_size
    perm = torch.randperm(layout.num_blocks, generator=rng)[: n_chunks * bpc].tolist()
    return [
        ChunkCopy(slot_offset=64 + i * slot_stride, block_ids=perm[i * bpc : (i + 1) * bpc])
        for i in range(n_chunks)
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("geom", GEOMS[:2], ids=lambda g: f"h{g[0]}d{g[1]}")
def test_cpu_round_trip_bit_exact(kind, block_size, geom):
    heads, head_dim, latent = geom
    num_blocks = 3 * (CHUNK // block_size) + 5  # room for 2 chunks, scattered
    dims = _dims(kind, heads, head_dim, latent, block_size, num_blocks=num_blocks)
    caches, bufs = build_kv_caches(kind, **dims)
    layout = describe_layout(caches, num_blocks, block_size, is_mla=kind.startswith("mla"))
    slot = layout.slot_bytes(CHUNK)
    arena = make_arena(64 + 2 * slot + 4096)
    arena.fill_(0xA5)
    rng = torch.Generator().manual_seed(1)
    chunks = _chunks(layout, 2, block_size, rng, slot)
    originals = [b.clone() for b in bufs]
    eng = CpuTransfer(layout, arena, CHUNK)
    eng.store(chunks).wait()
    for c in chunks:
        got = arena[c.slot_offset : c.slot_offset + slot]
        ref = reference_slot(kind, caches, bufs, c.block_ids, num_blocks, layout.num_planes)
        assert torch.equal(got, ref)
    assert bool((arena[:64] == 0xA5).all()) and bool((arena[64 + 2 * slot :] == 0xA5).all())
    for b in bufs:  # poison the whole cache, then load the chunks back
        b.view(torch.uint8).fill_(0x5A)
    eng.load(chunks).wait()
    touched = set(bid for c in chunks for bid in c.block_ids)
    for name, t in caches.items():
        bdim = 1 if kind == "kv_split" else 0
        for bid in range(num_blocks):
            blk = memory_bytes(t.select(bdim, bid))
            if bid in touched:
                orig_t = _same_view(t, bufs, originals)
                assert torch.equal(blk, memory_bytes(orig_t.select(bdim, bid))), (name, bid)
            else:
                assert bool((blk == 0x5A).all()), (name, bid)


def _same_view(t, bufs, originals):
    """The view t makes of its buffer, applied to that buffer's saved copy."""
    for b, o in zip(bufs, originals):
        if t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
            return o.as_strided(t.shape, t.stride(), t.storage_offset())
    raise AssertionError("view of an unknown buffer")


def test_slot_bytes_match_geometry():
    caches, _ = build_kv_caches("v026", layers=40, num_blocks=5, block_size=16, heads=8,
                                head_dim=128, fill=False)
    layout = describe_layout(caches, 5, 16)
    assert layout.slot_bytes(256) == 40 * 2**20  # a 256-token Qwen3-14B chunk is 40 MiB
    assert layout.piece_bytes == math.prod((16, 8, 256, 2))  # 64 KiB per layer and block
