"""Slot allocation inside the arena: slabs per size class, handed back when empty.

The arena is cut into equal slabs. A slab serves slots of exactly one size (engines of
different models have different slot sizes), so slots never straddle a hole and freeing is
O(1). A slab whose last slot is freed returns to the pool and can serve any other size, so
one model's departure does not strand memory. A slot larger than a slab takes a run of
adjacent free slabs (a span).

Concurrency: an allocator has exactly one owner, the server's RPC thread, which is the only
thread that allocates or frees; that is what makes it safe without locks. Other threads
(HTTP, tier workers) only read the immutable stats snapshot the RPC thread publishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SLOT_ALIGNMENT = 4096


def align_up(n: int, alignment: int = SLOT_ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(slots=True)
class _Slab:
    slot_bytes: int  # size class served; 0 when free
    free_slots: list[int] = field(default_factory=list)  # slot indices
    used: int = 0
    span: int = 1  # >1: the first slab of a span of this many slabs


class SlabAllocator:
    def __init__(self, arena_bytes: int, slab_bytes: int):
        if slab_bytes <= 0 or slab_bytes % SLOT_ALIGNMENT:
            raise ValueError(f"slab size must be a positive multiple of {SLOT_ALIGNMENT}")
        self.slab_bytes = slab_bytes
        self.num_slabs = arena_bytes // slab_bytes
        if self.num_slabs < 1:
            raise ValueError(f"arena of {arena_bytes} bytes holds no slab of {slab_bytes} bytes")
        self.capacity = self.num_slabs * slab_bytes
        self._slabs = [_Slab(0) for _ in range(self.num_slabs)]
        self._free_slabs = set(range(self.num_slabs))
        self._partial: dict[int, set[int]] = {}  # size class -> slabs with a free slot
        self.used_bytes = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    def size_class(self, slot_bytes: int) -> int:
        return align_up(slot_bytes)

    def fits(self, slot_bytes: int) -> bool:
        """Could this size ever be allocated (in an empty arena)?"""
        return 0 < self.size_class(slot_bytes) <= self.capacity

    def allocate(self, slot_bytes: int) -> int | None:
        """A slot's byte offset, or None when no free slot or slab is left for this size."""
        size = self.size_class(slot_bytes)
        if size > self.slab_bytes:
            return self._allocate_span(size)
        partial = self._partial.get(size)
        if partial:
            index = min(partial)  # pack low slabs first so high ones empty out and return
            slab = self._slabs[index]
        else:
            if not self._free_slabs:
                return None
            index = min(self._free_slabs)
            self._free_slabs.remove(index)
            slab = self._slabs[index]
            slab.slot_bytes = size
            slab.free_slots = list(range(self.slab_bytes // size - 1, -1, -1))
            slab.used = 0
            partial = self._partial.setdefault(size, set())
            partial.add(index)
        slot = slab.free_slots.pop()
        slab.used += 1
        if not slab.free_slots:
            partial.discard(index)
        self.used_bytes += size
        return index * self.slab_bytes + slot * size

    def _allocate_span(self, size: int) -> int | None:
        need = -(-size // self.slab_bytes)
        run_start, run_len = 0, 0
        for index in range(self.num_slabs):
            if index in self._free_slabs:
                if run_len == 0:
                    run_start = index
                run_len += 1
                if run_len == need:
                    for i in range(run_start, run_start + need):
                        self._free_slabs.remove(i)
                        self._slabs[i].slot_bytes = size
                    self._slabs[run_start].span = need
                    self._slabs[run_start].used = 1
                    self.used_bytes += size
                    return run_start * self.slab_bytes
            else:
                run_len = 0
        return None

    def free(self, offset: int) -> None:
        index, within = divmod(offset, self.slab_bytes)
        if not 0 <= index < self.num_slabs:
            raise ValueError(f"offset {offset} is outside the arena")
        slab = self._slabs[index]
        size = slab.slot_bytes
        if size == 0 or within % size or slab.used == 0:
            raise ValueError(f"offset {offset} is not an allocated slot")
        self.used_bytes -= size
        if slab.span > 1 or size > self.slab_bytes:
            for i in range(index, index + slab.span):
                self._release_slab(i)
            return
        slot = within // size
        slab.free_slots.append(slot)
        slab.used -= 1
        partial = self._partial[size]
        if slab.used == 0:
            partial.discard(index)
            self._release_slab(index)
        else:
            partial.add(index)

    def _release_slab(self, index: int) -> None:
        slab = self._slabs[index]
        slab.slot_bytes, slab.free_slots, slab.used, slab.span = 0, [], 0, 1
        self._free_slabs.add(index)

    def free_slab_count(self) -> int:
        return len(self._free_slabs)
