"""An engine's mapping of the server's arena (the /dev/shm segment)."""

from __future__ import annotations

import mmap
import os

import numpy as np

from kvdepot.server.arena import shm_path


class ArenaMapping:
    """The segment of one server boot, mapped read-write. Slots are views, never copies.

    A mapping stays valid after the server removed the segment (the pages live until the last
    unmap), which is why the client tags everything with the boot it came from.
    """

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        fd = os.open(shm_path(name), os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise OSError(f"/dev/shm/{name} is {actual} bytes, the server announced {size}")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self._tensor = None

    def slot(self, offset: int, nbytes: int) -> np.ndarray:
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"slot [{offset}, {offset + nbytes}) is outside the arena")
        return self.array[offset : offset + nbytes]

    def tensor(self):
        """The whole arena as a flat torch uint8 tensor (shares memory; needs torch)."""
        if self._tensor is None:
            import torch

            self._tensor = torch.from_numpy(self.array)
        return self._tensor

    def close(self) -> None:
        # Views handed out keep the buffer exported; then the map closes when they die.
        self.array = None  # type: ignore[assignment]
        self._tensor = None
        try:
            self._map.close()
        except BufferError:
            pass
