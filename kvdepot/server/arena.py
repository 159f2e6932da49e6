"""The arena: one POSIX shared-memory segment that the server owns and engines map.

The server never reads or writes KV bytes; it creates the segment, hands out offsets and
removes the segment on shutdown. Pages are touched in the background at start so an engine's
first stores do not pay for page faults.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from concurrent.futures import Executor

log = logging.getLogger("kvdepot.server")

SHM_DIR = "/dev/shm"
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_TOUCH_STEP = 4 << 20  # small steps: the copy holds the GIL, and the RPC thread must not wait long


def shm_path(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or len(name) > 200:
        raise ValueError(f"invalid shared-memory name {name!r}")
    return os.path.join(SHM_DIR, name)


class SharedArena:
    def __init__(self, name: str, size: int, mode: int = 0o600, group: int | None = None):
        if size <= 0:
            raise ValueError("the arena needs a positive size")
        self.name = name
        self.size = size
        self.path = shm_path(name)
        self._ready = threading.Event()
        self._closed = False
        try:
            os.unlink(self.path)  # a stale segment of a crashed server: replace it
            log.warning("Replaced a stale shared-memory segment %s", self.path)
        except FileNotFoundError:
            pass
        free = _free_bytes(SHM_DIR)
        if free is not None and free < size:
            # Without this check the first write past what tmpfs can hold kills the writer
            # (server or engine) with SIGBUS instead of an error.
            raise OSError(
                f"{SHM_DIR} has {free / 1e9:.2f} GB free, the buffer needs {size / 1e9:.2f} GB: "
                "lower --cpu-buffer-size or grow /dev/shm (docs/deploy.md)"
            )
        old_umask = os.umask(0o777 & ~mode)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        finally:
            os.umask(old_umask)
        try:
            os.fchmod(fd, mode)
            if group is not None:
                os.fchown(fd, -1, group)
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        self._fd = fd  # kept for fallocate in the background touch

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def touch_pages(self, executor: Executor | None = None) -> None:
        """Fault every page in (in the background when given an executor); sets ready."""
        if executor is None:
            self._touch()
        else:
            executor.submit(self._touch)

    def _touch(self) -> None:
        started = time.monotonic()
        zeros = bytes(min(_TOUCH_STEP, self.size))
        populate = True
        try:
            for start in range(0, self.size, _TOUCH_STEP):
                if self._closed:
                    return
                end = min(start + _TOUCH_STEP, self.size)
                # Reserve the pages first: a full tmpfs then says ENOSPC instead of SIGBUS.
                os.posix_fallocate(self._fd, start, end - start)
                if populate:
                    # Allocates and maps the pages in the kernel, several times faster than
                    # writing them; kernels before 5.14 lack it and get the zeros instead.
                    try:
                        self._map.madvise(_MADV_POPULATE_WRITE, start, end - start)
                        continue
                    except OSError:
                        populate = False
                self._map[start:end] = zeros[: end - start]
        except (ValueError, OSError) as exc:  # closed under us, or /dev/shm too small
            if not self._closed:
                log.error("Could not touch the arena's pages: %s (is /dev/shm large enough?)", exc)
            return
        log.info(
            "Arena ready: %.3g GB in %s touched in %.2f s",
            self.size / 1e9, self.path, time.monotonic() - started,
        )
        self._ready.set()

    def close(self) -> None:
        """Unmap and remove the segment; engines that still map it keep their pages."""
        if self._closed:
            return
        self._closed = True
        try:
            self._map.close()
        except BufferError:
            pass
        try:
            os.close(self._fd)
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _free_bytes(directory: str) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
