"""The arena: one POSIX shared-memory segment that the server owns and engines map.

The server never reads or writes KV bytes; it creates the segment, hands out offsets and
removes the segment on shutdown. Pages are touched in the background at start so an engine's
first stores do not pay for page faults.

Two servers never share a segment. The server holds an exclusive flock on its segment for its
whole life (the kernel drops it when the process dies, however it dies), and a new segment
appears under its name only when no live server holds the old one: it is made under a hidden
temporary name, locked, then renamed over a stale one or linked in. After the arena's bytes the
segment carries an identity block (the server's boot id, the arena size, its pid), which an
engine checks against the boot id its server announced before it uses the mapping.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import threading
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass

log = logging.getLogger("kvdepot.server")

SHM_DIR = "/dev/shm"
IDENTITY_BYTES = 4096  # the identity block after the arena's bytes
_IDENTITY_MAGIC = b"kvdepot-arena/1\n"
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_TOUCH_STEP = 4 << 20  # small steps: the copy holds the GIL, and the RPC thread must not wait long


def shm_path(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or len(name) > 200:
        raise ValueError(f"invalid shared-memory name {name!r}")
    return os.path.join(SHM_DIR, name)


class SegmentInUse(OSError):
    """A live server holds the segment of that name: starting another on it is refused."""


@dataclass(frozen=True)
class ArenaIdentity:
    """Who made a segment: written after the arena's bytes, read by engines and by a server
    that finds the name taken."""

    boot_id: str
    arena_bytes: int
    pid: int

    def encode(self) -> bytes:
        body = _IDENTITY_MAGIC + json.dumps(
            {"boot_id": self.boot_id, "arena_bytes": self.arena_bytes, "pid": self.pid}
        ).encode()
        return body.ljust(IDENTITY_BYTES, b"\0")

    @staticmethod
    def read(fd: int, arena_bytes: int) -> ArenaIdentity | None:
        """The identity after ``arena_bytes`` bytes of the open segment ``fd``; None when
        there is none (not a kvdepot segment, or one of another size)."""
        block = os.pread(fd, IDENTITY_BYTES, arena_bytes)
        if not block.startswith(_IDENTITY_MAGIC):
            return None
        try:
            fields = json.loads(block[len(_IDENTITY_MAGIC) :].rstrip(b"\0"))
            return ArenaIdentity(str(fields["boot_id"]), int(fields["arena_bytes"]), int(fields["pid"]))
        except (ValueError, KeyError, TypeError):
            return None


class SharedArena:
    def __init__(
        self, name: str, size: int, mode: int = 0o600, group: int | None = None,
        boot_id: str | None = None, owner: int | None = None,
    ):
        """Create the segment ``/dev/shm/<name>`` of ``size`` arena bytes (plus the identity
        block) for the server boot ``boot_id`` (a new one when None), with file ``mode``,
        owned by user id ``owner`` and group id ``group`` (None: the server's; another needs
        root or CAP_CHOWN). Raises SegmentInUse when a live server holds that name, OSError
        when /dev/shm cannot hold it or the owner cannot be set."""
        if size <= 0:
            raise ValueError("the arena needs a positive size")
        self.name = name
        self.size = size
        self.path = shm_path(name)
        self.identity = ArenaIdentity(boot_id or uuid.uuid4().hex, size, os.getpid())
        self._ready = threading.Event()
        self._closed = False
        self._owner = owner
        self._fd = self._claim(mode, group)  # locked for the server's life; fallocate uses it
        try:
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self._closed = True
            self._remove_own_name()
            os.close(self._fd)
            raise

    @property
    def boot_id(self) -> str:
        return self.identity.boot_id

    def _claim(self, mode: int, group: int | None) -> int:
        """A new segment under ``self.path``, locked: never while a live server holds one."""
        for _ in range(16):  # each retry means another server changed the name meanwhile
            stale = self._lock_stale()
            if stale == -1:
                continue
            try:
                fd, tmp = self._create_locked(mode, group, stale)
                try:
                    installed = self._install(tmp, replace=stale is not None)
                except BaseException:
                    os.close(fd)
                    raise
                finally:
                    _unlink_quietly(tmp)
                if installed:
                    return fd
                os.close(fd)
            finally:
                if stale is not None:
                    os.close(stale)  # its lock goes; its pages go with the last mapping
        raise OSError(f"{self.path} kept changing while this server tried to create it")

    def _install(self, tmp: str, replace: bool) -> bool:
        """Give the new segment its name; False when another server just took the name."""
        if replace:  # we hold the stale one's lock, so nobody else replaces it
            os.rename(tmp, self.path)  # atomic: the name is never missing
            log.warning("Replaced a stale shared-memory segment %s", self.path)
            return True
        try:
            os.link(tmp, self.path)  # never over a segment that appeared meanwhile
            return True
        except FileExistsError:
            return False

    def _lock_stale(self) -> int | None:
        """The existing segment's fd, locked by us (its server is gone); None when there is
        none; -1 when it changed under us (try again). Raises SegmentInUse when it is held."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st, now = os.fstat(fd), _stat_or_none(self.path)
        except BlockingIOError:
            message = self._held_message(fd)
            os.close(fd)
            raise SegmentInUse(message) from None
        except BaseException:
            os.close(fd)
            raise
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)  # removed or replaced after we opened it
            return -1
        return fd

    def _held_message(self, fd: int) -> str:
        try:
            size = os.fstat(fd).st_size
            who = ArenaIdentity.read(fd, size - IDENTITY_BYTES) if size >= IDENTITY_BYTES else None
        except OSError:
            who = None
        owner = f" (pid {who.pid}, boot {who.boot_id[:8]})" if who is not None else ""
        return (
            f"{self.path} is held by a running kvdepot server{owner}: replacing it would hand "
            "that server's engines this server's memory. Start this one with another --shm-name"
        )

    def _create_locked(self, mode: int, group: int | None, stale: int | None) -> tuple[int, str]:
        """A locked, sized segment with its identity, under a hidden temporary name."""
        free = _free_bytes(SHM_DIR)
        if free is not None and stale is not None:
            free += os.fstat(stale).st_blocks * 512  # replaced: its pages go back
        if free is not None and free < self.size + IDENTITY_BYTES:
            # Without this check the first write past what tmpfs can hold kills the writer
            # (server or engine) with SIGBUS instead of an error.
            raise OSError(
                f"{SHM_DIR} has {free / 1e9:.2f} GB free, the buffer needs {self.size / 1e9:.2f} GB: "
                "lower --cpu-buffer-size or grow /dev/shm (docs/deploy.md)"
            )
        # A dot name: never a segment name (shm_path refuses those), so never a server's.
        tmp = os.path.join(SHM_DIR, f".{self.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        old_umask = os.umask(0o777 & ~mode)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        finally:
            os.umask(old_umask)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, mode)
            if group is not None or self._owner is not None:
                os.fchown(fd, -1 if self._owner is None else self._owner,
                          -1 if group is None else group)
            os.ftruncate(fd, self.size + IDENTITY_BYTES)
            os.pwrite(fd, self.identity.encode(), self.size)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        return fd, tmp

    def _remove_own_name(self) -> None:
        """Unlink the name if it is still this segment's (a lock holder's name stays its)."""
        st, now = os.fstat(self._fd), _stat_or_none(self.path)
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            _unlink_quietly(self.path)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def view(self, offset: int, nbytes: int) -> memoryview:
        """The arena's bytes [offset, offset + nbytes), for a tier worker's copy; release it
        when done. ValueError when the range is outside the arena or the arena is closed."""
        if self._closed:
            raise ValueError("the arena is closed")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"bytes [{offset}, {offset + nbytes}) are outside the arena")
        with memoryview(self._map) as whole:
            return whole[offset : offset + nbytes]

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
            self._remove_own_name()  # still locked: no new server can have claimed the name
        finally:
            os.close(self._fd)


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _free_bytes(directory: str) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
