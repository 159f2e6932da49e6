"""The local disk tier: chunks below the shared-memory buffer, in files that outlive the server.

One file per chunk and rank (format: chunkfile.py). Bytes move between a file and the arena
slot with one ``pwritev`` / ``preadv`` of [header, slot, last partial block]: straight from
and into the arena's pages, O_DIRECT where the filesystem has it (probed at start; tmpfs has
not: buffered I/O then), no copy but a partial last block through a 4 KiB buffer.

- Writes go to a temporary file in the same directory, renamed when whole. No fsync: this is
  a cache, every read verifies the payload's CRC32C and the header's, so what a power loss
  tears is a miss, never wrong bytes; an fsync per file would cost every write a device
  flush for nothing a cache needs.
- Every read verifies the header (magic, version, CRC, the chunk it names) and the payload's
  CRC32C (the ``crc32c`` package: hardware CRC, ~15 GB/s here) before the core marks the
  slot readable. A mismatch, a short or missing file: the file is deleted, counted, and the
  load fails (a miss for the engine).
- Its own byte cap, whatever the core's books say: a write reserves its whole footprint
  (header and padding) before it creates its temporary file, waits a moment for deletes in
  flight, and fails rather than go over.
- At start (``scan``) it deletes temporary files, files it cannot read (short, another
  format version, a bad header), all but the newest copy of a chunk's rank, and the oldest
  files past the cap; the rest goes to the core to wait for its namespace.
- The directory is the tier's alone: a marker file names it, and a lock on the marker keeps
  a second server out. A non-empty directory without the marker is refused.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import secrets
import threading
import time
from collections.abc import Iterator
from itertools import count
from stat import S_ISREG

import crc32c

from kvdepot import protocol as p
from kvdepot.server.effects import Delete, Demote, Prefetch, Probe
from kvdepot.server.locations import FileRef
from kvdepot.server.tiers.base import StoredChunk, TierError, TierIO, TierSpec
from kvdepot.server.tiers.chunkfile import (
    BLOCK, HEADER_BYTES, SUFFIX, TEMP_SUFFIX, BadFile, Header, file_name, footprint, layout,
    move_all, pack, unpack,
)

log = logging.getLogger("kvdepot.server")

MARKER = "kvdepot-disk-tier"
_MARKER_TEXT = "A kvdepot disk tier (KV-cache chunk files). Safe to delete with the server stopped.\n"
_ROOM_WAIT_S = 2.0  # how long a write waits for deletes in flight to make room under the cap
_PROBE_BYTES = 1 << 20
_DEFAULT_READ_BPS = 1e9  # a disk's cold reads here (virtio, O_DIRECT): 1.0-1.2 GB/s
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_LOG_EVERY_S = 60.0


class DiskTier:
    """A ``Tier`` (base.py) on a local directory. ``capacity_bytes``: never more on disk."""

    def __init__(
        self, path: str, capacity_bytes: int, *, name: str = "disk", queue_depth: int = 16,
        write_through: bool = False, admit_hits: int = 0,
    ):
        if capacity_bytes < footprint(1):
            raise ValueError(f"a disk tier of {capacity_bytes} bytes holds no chunk file")
        if queue_depth < 1 or admit_hits < 0:
            raise ValueError("the disk queue depth must be >= 1 and admission hits >= 0")
        self.root = os.path.abspath(path)
        self.capacity_bytes = capacity_bytes
        self._marker_fd = _claim(self.root)
        self._write_ids = count()
        self._run = secrets.token_hex(4)  # names of this run's writes never meet an old file's
        self._lock = threading.Condition()
        self._files: dict[str, int] = {}  # relative path -> footprint
        self._local = threading.local()
        self._logged: dict[str, float] = {}
        try:
            self.direct, read_bps = self._probe()
        except OSError as exc:
            self.close()
            raise ValueError(f"cannot write to the disk tier at {self.root}: {exc}") from exc
        self.io = TierIO(settings={
            "path": self.root,
            "write_policy": "write-through" if write_through else "write-back",
            "admit_hits": str(admit_hits),
            "direct_io": "on" if self.direct else "off (buffered: no O_DIRECT here)",
            "fsync": "none (every read is verified)",
        })
        self.spec = TierSpec(
            name, capacity_bytes, queue_depth, self._locate, footprint=footprint,
            write_through=write_through, admit_hits=admit_hits, read_bytes_per_s=read_bps,
        )

    def close(self) -> None:
        """Give the directory up (its lock); the files stay for the next server."""
        if self._marker_fd >= 0:
            os.close(self._marker_fd)
            self._marker_fd = -1

    # --- Tier -------------------------------------------------------------------------------

    def _locate(self, digest: bytes, key: bytes, rank: int) -> FileRef:
        # A new name per write: a write never meets an older file of the same chunk, nor a
        # delete of it still queued on another worker.
        return FileRef(file_name(key, rank, f"{self._run}{next(self._write_ids):x}"))

    def write(self, job: Demote, source: memoryview) -> None:
        rel = job.target.path  # type: ignore[union-attr]
        need = footprint(job.nbytes)
        self._reserve(need, rel)
        temp = self._path(rel) + ".tmp"
        try:
            head, tail = self._buffers()
            crc = crc32c.crc32c(source)
            pack(head, Header(job.namespace, job.key, job.parent, job.rank, job.nbytes, crc))
            rest = job.nbytes % BLOCK
            if rest:
                tail[:rest] = source[job.nbytes - rest :]
                tail[rest:] = bytes(BLOCK - rest)
            self._transfer(temp, layout(head, source, tail, job.nbytes), write=True)
            os.rename(temp, self._path(rel))
        except Exception as exc:
            _unlink(temp)
            self._forget(rel)
            with self._lock:
                self.io.write_errors += 1
            raise self._error("write", rel, exc) from exc
        with self._lock:  # counters: several worker threads add to them
            self.io.writes += 1
            self.io.written_bytes += job.nbytes

    def read(self, job: Prefetch, target: memoryview) -> None:
        rel = job.source.path  # type: ignore[union-attr]
        path = self._path(rel)
        head, tail = self._buffers()
        bufs = layout(head, target, tail, job.nbytes)
        try:
            got = self._transfer(path, bufs, write=False)
        except OSError as exc:
            self._drop(rel, "read_errors")  # the core forgets this copy: so does the disk
            raise self._error("read", rel, exc) from exc
        try:
            if got < sum(len(b) for b in bufs):
                raise BadFile(f"short file ({got} bytes read)")
            header = unpack(head)
            named = (header.namespace, header.key, header.rank, header.payload_bytes)
            if named != (job.namespace, job.key, job.rank, job.nbytes):
                raise BadFile("the file holds another chunk")
        except BadFile as exc:
            self._drop(rel, "bad_files")
            raise self._error("read", rel, exc) from exc
        rest = job.nbytes % BLOCK
        if rest:
            target[job.nbytes - rest :] = tail[:rest]
        if crc32c.crc32c(target) != header.payload_crc:
            self._drop(rel, "checksum_failures")
            raise self._error("read", rel, BadFile("payload checksum (CRC32C) mismatch"))
        try:
            os.utime(path)  # its recency, for the order of re-adoption after a restart
        except OSError:
            pass
        with self._lock:
            self.io.reads += 1
            self.io.read_bytes += job.nbytes

    def delete(self, job: Delete) -> None:
        self._drop(job.where.path)  # type: ignore[union-attr]

    def scan(self) -> Iterator[StoredChunk]:
        """What the directory holds, oldest first, after removing what cannot be served
        (temporary, short, unknown-version, bad-header files; older copies; files past the
        cap). Call once, at start, before any write."""
        started = time.monotonic()
        found: dict[tuple[bytes, bytes, int], tuple[StoredChunk, int]] = {}
        removed: dict[str, int] = {}
        for rel in self._listing():
            if rel.endswith(TEMP_SUFFIX):
                _remove_stray(self._path(rel))
                self.io.temp_files_removed += 1
                continue
            try:
                chunk, size = self._inspect(rel)
            except (BadFile, OSError) as exc:
                _remove_stray(self._path(rel))
                self.io.bad_files += 1
                removed[str(exc)] = removed.get(str(exc), 0) + 1
                continue
            ident = (chunk.namespace, chunk.key, chunk.rank)
            other = found.get(ident)
            if other is not None:
                (stale, _), newer = sorted((other, (chunk, size)), key=lambda f: f[0].last_used)
                _unlink(self._path(stale.where.path))  # type: ignore[union-attr]
                removed["an older copy"] = removed.get("an older copy", 0) + 1
                chunk, size = newer
            found[ident] = (chunk, size)
        kept: list[StoredChunk] = []
        used = 0
        for chunk, size in sorted(found.values(), key=lambda f: f[0].last_used, reverse=True):
            if used + size > self.capacity_bytes:
                _unlink(self._path(chunk.where.path))  # type: ignore[union-attr]
                removed["over the cap"] = removed.get("over the cap", 0) + 1
                continue
            used += size
            self._files[chunk.where.path] = size  # type: ignore[union-attr]
            kept.append(chunk)
        self.io.used_bytes, self.io.files = used, len(self._files)
        log.info(
            "Disk tier %s: found %d chunk files (%d bytes) in %.2f s; removed %d temporary "
            "files%s", self.root, len(kept), used, time.monotonic() - started,
            self.io.temp_files_removed,
            "".join(f", {n} ({why})" for why, n in sorted(removed.items())),
        )
        return iter(kept[::-1])

    def probe(self, job: Probe) -> int:
        raise TierError("the disk tier is local: the core knows what it holds")

    def nodes(self) -> list[p.TierNode]:
        return []

    # --- files ------------------------------------------------------------------------------

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _listing(self) -> Iterator[str]:
        for sub in ("", *(f"{i:02x}" for i in range(256))):
            try:
                names = os.listdir(os.path.join(self.root, sub))
            except OSError:  # missing, or not a directory (_claim refused that already)
                continue
            for name in names:
                if name.endswith((SUFFIX, TEMP_SUFFIX)):
                    yield f"{sub}/{name}" if sub else name

    def _inspect(self, rel: str) -> tuple[StoredChunk, int]:
        path = self._path(rel)
        # Never follow a link nor block on a FIFO or a device: only our own regular files.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as f:
            stat = os.fstat(f.fileno())
            if not S_ISREG(stat.st_mode):
                raise BadFile("not a regular file")
            header = unpack(f.read(HEADER_BYTES))
        need = footprint(header.payload_bytes)
        if stat.st_size != need:  # longer would pass the cap unseen; shorter is torn
            raise BadFile("short file" if stat.st_size < need else "longer than its header says")
        return StoredChunk(
            header.namespace, header.key, header.parent, header.rank, header.payload_bytes,
            FileRef(rel), stat.st_mtime,
        ), need

    def _transfer(self, path: str, bufs: list[memoryview], write: bool) -> int:
        """Write ``bufs`` to a new file, or fill them from one; bytes moved (a read stops
        short at the file's end). O_DIRECT when the tier has it, buffered when the memory
        is not aligned for it (EINVAL)."""
        flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL if write else os.O_RDONLY) | os.O_CLOEXEC
        direct = self.direct
        while True:
            fd = os.open(path, flags | (_O_DIRECT if direct else 0), 0o600)
            try:
                return move_all(fd, bufs, write)
            except OSError as exc:
                if not (direct and exc.errno == errno.EINVAL):
                    raise
                direct = False
                if write:
                    os.unlink(path)
            finally:
                os.close(fd)

    def _buffers(self) -> tuple[memoryview, memoryview]:
        """This thread's aligned header and last-block buffers (page-aligned anonymous maps)."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = (
                memoryview(mmap.mmap(-1, HEADER_BYTES)), memoryview(mmap.mmap(-1, BLOCK)),
            )
        return bufs

    def _probe(self) -> tuple[bool, float]:
        """(O_DIRECT works here, bytes/s of one read): a probe file written and read back.
        OSError when the directory takes no file at all; a disk too full for the probe
        starts with the default speed (writes then fail and say why)."""
        path = os.path.join(self.root, ".probe" + TEMP_SUFFIX)
        size = min(_PROBE_BYTES, self.capacity_bytes // BLOCK * BLOCK)  # never past the cap
        if size < BLOCK:
            return bool(_O_DIRECT), _DEFAULT_READ_BPS  # writes fall back per file if need be
        buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        buf.write(os.urandom(size))
        direct = bool(_O_DIRECT)
        try:
            while True:
                _unlink(path)
                fd = -1
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (_O_DIRECT if direct else 0), 0o600)
                    move_all(fd, [memoryview(buf)], write=True)
                    break
                except OSError as exc:
                    if direct and exc.errno == errno.EINVAL:
                        direct = False  # no O_DIRECT on this filesystem
                        continue
                    if fd < 0:
                        raise
                    log.warning("Disk tier %s: probe write failed (%s); assuming %.1f GB/s reads",
                                self.root, exc, _DEFAULT_READ_BPS / 1e9)
                    return direct, _DEFAULT_READ_BPS
                finally:
                    if fd >= 0:
                        os.close(fd)
            fd = os.open(path, os.O_RDONLY | (_O_DIRECT if direct else 0))
            try:
                started = time.perf_counter()
                move_all(fd, [memoryview(buf)], write=False)
                return direct, size / max(time.perf_counter() - started, 1e-6)
            finally:
                os.close(fd)
        finally:
            _unlink(path)

    # --- bytes on disk ----------------------------------------------------------------------

    def _reserve(self, nbytes: int, rel: str) -> None:
        with self._lock:
            deadline = time.monotonic() + _ROOM_WAIT_S
            while self.io.used_bytes + nbytes > self.capacity_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.io.write_errors += 1
                    raise self._error("write", rel, TierError(
                        f"{self.io.used_bytes} + {nbytes} bytes would pass the cap of "
                        f"{self.capacity_bytes}"))
                self._lock.wait(left)
            self.io.used_bytes += nbytes
            self._files[rel] = nbytes
            self.io.files = len(self._files)

    def _forget(self, rel: str) -> None:
        with self._lock:
            nbytes = self._files.pop(rel, 0)
            self.io.used_bytes -= nbytes
            self.io.files = len(self._files)
            self._lock.notify_all()

    def _drop(self, rel: str, counter: str = "") -> None:
        """Delete a chunk file (counting why in ``TierIO.<counter>``)."""
        _unlink(self._path(rel))
        self._forget(rel)
        if counter:
            with self._lock:
                setattr(self.io, counter, getattr(self.io, counter) + 1)

    def _error(self, op: str, rel: str, exc: BaseException) -> TierError:
        what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (BadFile, TierError)) else str(exc)
        self.io.last_error = f"{op} {rel}: {what}"
        now = time.monotonic()
        if now - self._logged.get(what, -_LOG_EVERY_S) >= _LOG_EVERY_S:  # once a minute
            self._logged[what] = now
            log.warning("Disk tier: %s", self.io.last_error)
        return TierError(self.io.last_error)


def _claim(root: str) -> int:
    """Make or check the tier's directory, lock its marker; the marker's open descriptor."""
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, MARKER)
    if not os.path.exists(marker):
        if os.listdir(root):
            raise ValueError(
                f"{root} is not empty and not a kvdepot disk tier: give an empty or new "
                "directory (the tier deletes files in it)"
            )
        with open(marker, "w") as f:
            f.write(_MARKER_TEXT)
    fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another kvdepot server uses the disk tier at {root}") from None
    for i in range(256):
        sub = os.path.join(root, f"{i:02x}")
        if os.path.lexists(sub) and not os.path.isdir(sub):
            os.close(fd)
            raise ValueError(f"{sub} is in the disk tier's place for chunk files: remove it")
        os.makedirs(sub, exist_ok=True)
    return fd


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_stray(path: str) -> None:
    """Remove what the start-up scan cannot serve; what cannot be removed (a directory named
    like a chunk file, a file of another owner) is left alone and logged, never fatal."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("Disk tier: cannot remove %s (%s); left alone", path, exc)
