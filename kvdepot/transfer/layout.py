"""Reading an engine's paged KV layout from its tensors, and where each piece goes in a slot.

vLLM hands a connector one tensor per layer. Their shapes and strides differ between versions,
backends and devices (per-layer allocations, strided views of one buffer, K and V side by side
or split, block-outer layouts that keep a block contiguous across layers, MLA). Rather than
trusting a shape, we look at memory: for each layer, the bytes of one block form one or more
contiguous *pieces*; the pieces of all layers at the same block index are the block's *planes*.

A slot holds one chunk (``blocks_per_chunk`` blocks) of one rank, piece by piece, in the
engine's own byte order, so every transfer is a copy of whole contiguous pieces:
- ``layer_major``: plane 0's pieces of the chunk's blocks, then plane 1's, ...
- ``block_major``: when each block's planes lie side by side in memory (a block contiguous
  across layers), block 0's planes, then block 1's, ...: one contiguous piece per block.
The geometry (and so the key namespace) records the layout, so engines only share chunks whose
bytes mean the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from kvdepot.protocol import KVGeometry


class LayoutError(ValueError):
    """The KV tensors do not form a paged layout kvdepot can move."""


@dataclass(frozen=True)
class PagedLayout:
    """The paged KV cache of one engine rank, as byte views."""

    geometry: KVGeometry
    num_blocks: int
    planes: tuple[torch.Tensor, ...]  # per plane: uint8 [num_blocks, piece_bytes], strided
    block_major: bool
    # block_major only: uint8 [num_blocks, num_planes * piece_bytes], one piece per block
    blocks: torch.Tensor | None
    device: torch.device
    # The layer each plane belongs to (planes are in slot order; for block_major that is memory
    # order, which need not be layer order: BHLNC interleaves heads and layers).
    plane_layer: tuple[int, ...] = ()

    @property
    def piece_bytes(self) -> int:
        return self.geometry.piece_bytes

    @property
    def num_planes(self) -> int:
        return self.geometry.num_planes

    def blocks_per_chunk(self, chunk_tokens: int) -> int:
        return chunk_tokens // self.geometry.block_size

    def slot_bytes(self, chunk_tokens: int) -> int:
        return self.geometry.slot_bytes(chunk_tokens)


def _byte_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A flat uint8 tensor over t's whole storage, and t's start offset in it (bytes)."""
    storage = t.untyped_storage()
    flat = torch.empty(0, dtype=torch.uint8, device=t.device)
    flat.set_(storage, 0, (storage.nbytes(),), (1,))
    return flat, t.storage_offset() * t.element_size()


def _contiguous_pieces(block: torch.Tensor) -> list[tuple[int, int]]:
    """Split one block's tensor (block dim removed) into contiguous runs: (elem offset, numel).

    Peels the outermost dims (by stride) until the remainder is dense in memory.
    """
    dims = sorted(
        ((s, st) for s, st in zip(block.shape, block.stride()) if s != 1), key=lambda d: -d[1]
    )
    for outer in range(len(dims) + 1):
        inner = dims[outer:]
        numel = 1
        dense = True
        for size, stride in reversed(inner):
            if stride != numel:
                dense = False
                break
            numel *= size
        if dense:
            starts = [0]
            for size, stride in dims[:outer]:
                starts = [s + i * stride for s in starts for i in range(size)]
            return [(s, numel) for s in sorted(starts)]
    raise LayoutError("unreachable: a single element is always dense")


def _find_block_dim(t: torch.Tensor, num_blocks: int) -> int:
    candidates = [d for d, s in enumerate(t.shape) if s == num_blocks]
    if not candidates:
        raise LayoutError(f"no dimension of size num_blocks={num_blocks} in shape {tuple(t.shape)}")
    # With several candidates, the block dim is the one with the largest stride among them
    # (blocks are the outermost paging unit of a layer's cache).
    return max(candidates, key=lambda d: t.stride(d))


def infer_head_dims(t: torch.Tensor, block_dim: int, block_size: int) -> tuple[int, int, int]:
    """(kv_heads, head_size_k, head_size_v) from a per-layer tensor, for logs and the namespace.

    Accepts (.., H, N, 2*D), (.., N, H, D) with a separate K/V dim of size 2, and MLA (H = 1).
    """
    dims = [s for d, s in enumerate(t.shape) if d != block_dim]
    if 2 in dims and len(dims) == 4:  # a K/V dim of size 2 somewhere
        dims.remove(2)
        rest = list(dims)
        if block_size in rest:
            rest.remove(block_size)  # once: heads may equal the block size
        heads = rest[0] if len(rest) == 2 else 1
        return heads, rest[-1], rest[-1]
    rest = list(dims)
    if block_size in rest:
        rest.remove(block_size)
    if len(rest) == 2:
        heads, last = rest
        return heads, last // 2, last - last // 2
    if len(rest) == 1:  # MLA: [blocks, block_size, latent]
        return 1, rest[0], 0
    raise LayoutError(f"cannot read heads and head size from shape {tuple(t.shape)}")


def describe_layout(
    kv_caches: Mapping[str, torch.Tensor],
    num_blocks: int,
    block_size: int,
    *,
    is_mla: bool = False,
) -> PagedLayout:
    """Read the paged layout of one rank's KV tensors (one per layer, in layer order)."""
    tensors = list(kv_caches.values())
    if not tensors:
        raise LayoutError("no KV cache tensors")
    first = tensors[0]
    device, dtype = first.device, first.dtype
    for t in tensors:
        if t.device != device or t.dtype != dtype:
            raise LayoutError("all KV tensors must share one device and dtype")
    esize = first.element_size()

    plane_starts: list[tuple[torch.Tensor, int, int]] = []  # (byte view, start byte, block stride)
    layer_of: list[int] = []
    piece_bytes = None
    heads = hk = hv = None
    for layer, t in enumerate(tensors):
        bdim = _find_block_dim(t, num_blocks)
        block0 = t.select(bdim, 0)
        pieces = _contiguous_pieces(block0)
        flat, base = _byte_view(t)
        for start, numel in pieces:
            pb = numel * esize
            if piece_bytes is None:
                piece_bytes = pb
            elif pb != piece_bytes:
                raise LayoutError(
                    f"layers with different piece sizes ({pb} vs {piece_bytes} bytes) "
                    "are not supported (hybrid models)"
                )
            plane_starts.append((flat, base + start * esize, t.stride(bdim) * esize))
            layer_of.append(layer)
        if heads is None:
            heads, hk, hv = infer_head_dims(t, bdim, block_size)
            if is_mla:
                heads, hk, hv = 1, hk + hv, 0
    assert piece_bytes is not None and heads is not None

    n = len(plane_starts)
    same_storage = all(
        p[0] is plane_starts[0][0] or p[0].data_ptr() == plane_starts[0][0].data_ptr()
        for p in plane_starts
    )
    # Block-major when one block's pieces, over all layers, tile one run of memory and blocks
    # follow each other at that run's length. The pieces are compared in memory order, not
    # layer order: in BHLNC a block is one run, but it walks heads outside layers.
    by_address = sorted(range(n), key=lambda i: plane_starts[i][1])
    s0 = plane_starts[by_address[0]][1]
    stride0 = plane_starts[0][2]
    block_major = (
        n > 1
        and same_storage
        and stride0 == n * piece_bytes
        and all(
            plane_starts[i][2] == stride0 and plane_starts[i][1] == s0 + rank * piece_bytes
            for rank, i in enumerate(by_address)
        )
    )
    if block_major:
        plane_starts = [plane_starts[i] for i in by_address]
        layer_of = [layer_of[i] for i in by_address]
    planes = tuple(
        flat.as_strided((num_blocks, piece_bytes), (stride, 1), start)
        for flat, start, stride in plane_starts
    )
    blocks = (
        plane_starts[0][0].as_strided((num_blocks, n * piece_bytes), (stride0, 1), s0)
        if block_major
        else None
    )
    layout_name = (
        f"{'block' if block_major else 'layer'}_major:{n}x{piece_bytes}"
        f":{_order_signature(tensors[0], num_blocks)}"
    )
    geometry = KVGeometry(
        num_layers=len(tensors),
        num_kv_heads=int(heads),
        head_size_k=int(hk),
        head_size_v=int(hv),
        dtype=str(dtype).removeprefix("torch."),
        block_size=block_size,
        num_planes=n,
        piece_bytes=piece_bytes,
        layout=layout_name,
    )
    return PagedLayout(
        geometry=geometry,
        num_blocks=num_blocks,
        planes=planes,
        block_major=block_major,
        blocks=blocks,
        device=device,
        plane_layer=tuple(layer_of),
    )


def _order_signature(t: torch.Tensor, num_blocks: int) -> str:
    """Shape and memory order of one layer's block, e.g. '8x16x256@0,2,1' (dims by stride)."""
    bdim = _find_block_dim(t, num_blocks)
    block = t.select(bdim, 0)
    order = sorted(range(block.dim()), key=lambda d: -block.stride(d))
    return "x".join(map(str, block.shape)) + "@" + ",".join(map(str, order))
