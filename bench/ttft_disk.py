"""The disk-tier part of bench/vllm_gpu_ttft.py (its last mode, kvdepot-disk).

- ``run_disk_modes``: the run's other modes against a server with a disk tier (write-through),
  then the server stopped (SIGTERM) and restarted on the same directory, the page cache
  dropped, and a fresh engine served from disk.
- ``pick_disk_dir``: a directory on the machine's local disk (not tmpfs), with its
  filesystem, device and free space.
- ``drop_page_cache``: sync, then ``echo 1 > /proc/sys/vm/drop_caches`` (root only); says
  whether it worked and how much the page cache held before and after.
- ``raw_direct_read``: the disk's raw rate for files of a chunk's size, written and read back
  with O_DIRECT (one ``pwrite`` / ``preadv`` per file, as the disk tier does), cold, on 1 and
  more threads: the floor a disk hit is measured against.
- ``server_stats``: a kvdepot server's /stats; ``wait_disk_idle``: until its disk tier has no
  copy in flight (write-through writes follow a store; a SIGTERM drops queued ones).
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import shutil
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvdepot.server.tiers.chunkfile import footprint

O_DIRECT = getattr(os, "O_DIRECT", 0)
_MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs", "proc", "sysfs", "squashfs"}


def mount_of(path: str) -> dict:
    """The mount holding ``path``: mount point, filesystem type, device, free bytes."""
    real = os.path.realpath(path)
    best = ("/", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, point, fstype = line.split()[:3]
            point = point.replace("\\040", " ")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                best = (point, fstype, dev)
    st = os.statvfs(real)
    return {"path": real, "mount": best[0], "fstype": best[1], "device": best[2],
            "free_bytes": st.f_bavail * st.f_frsize, "size_bytes": st.f_blocks * st.f_frsize}


def pick_disk_dir(candidates: list[str], need_bytes: int) -> tuple[str, dict]:
    """A fresh subdirectory of the first candidate on a disk filesystem (not tmpfs) with
    ``need_bytes`` free, else of the disk candidate with the most room; and its mount."""
    disks = []
    for base in candidates:
        if os.path.isdir(base):
            info = mount_of(base)
            if info["fstype"] not in _MEMORY_FS:
                disks.append((base, info))
    if not disks:
        raise RuntimeError(f"no disk filesystem among {candidates}")
    roomy = [d for d in disks if d[1]["free_bytes"] >= need_bytes]
    base, info = roomy[0] if roomy else max(disks, key=lambda d: d[1]["free_bytes"])
    return os.path.join(base, f"kvdepot-ttft-disk-{os.getpid()}"), info


def _cached_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return -1


def drop_page_cache() -> dict:
    """Write back dirty pages, then drop the clean page cache (needs root)."""
    before = _cached_kib()
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        ok, why = True, ""
    except OSError as exc:
        ok, why = False, f"{type(exc).__name__}: {exc}"
    return {"dropped": ok, "error": why, "cached_kib_before": before, "cached_kib_after": _cached_kib()}


def _move(path: str, view: memoryview, write: bool, direct: bool) -> None:
    flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC if write else os.O_RDONLY) | os.O_CLOEXEC
    fd = os.open(path, flags | (O_DIRECT if direct else 0), 0o600)
    try:
        done = 0
        while done < len(view):
            n = os.pwritev(fd, [view[done:]], done) if write else os.preadv(fd, [view[done:]], done)
            if n <= 0:
                raise OSError(f"{path}: short {'write' if write else 'read'}")
            done += n
    finally:
        os.close(fd)


def raw_direct_read(work: str, file_bytes: int, files: int, threads: list[int], write_cap_s: float = 30.0) -> dict:
    """Raw I/O of ``files`` files of ``file_bytes`` (4 KiB multiple) under ``work``:
    write them (O_DIRECT if the filesystem takes it), drop the page cache, read them all back
    on each thread count in ``threads``. GB/s (10^9 bytes) per direction."""
    os.makedirs(work, exist_ok=True)
    direct = bool(O_DIRECT)
    src = mmap.mmap(-1, file_bytes)  # page-aligned, as O_DIRECT needs; random, never zeros
    src.write(os.urandom(file_bytes))
    paths = []
    started = time.perf_counter()
    try:
        for i in range(files):
            path = os.path.join(work, f"raw-{i:03d}")
            try:
                _move(path, memoryview(src), True, direct)
            except OSError as exc:
                if not (direct and exc.errno == errno.EINVAL):
                    raise
                direct = False  # no O_DIRECT on this filesystem: buffered, then synced
                _move(path, memoryview(src), True, direct)
            paths.append(path)
            if time.perf_counter() - started > write_cap_s:
                break
        os.sync()
        write_s = time.perf_counter() - started
        out = {"direct": direct, "file_bytes": file_bytes, "files": len(paths),
               "write_gbps": len(paths) * file_bytes / write_s / 1e9, "read_gbps": {}}
        for n in threads:
            out["page_cache"] = drop_page_cache()
            bufs = [mmap.mmap(-1, file_bytes) for _ in range(n)]

            def read(i: int, bufs=bufs, n=n) -> None:
                for path in paths[i::n]:
                    _move(path, memoryview(bufs[i]), False, direct)

            t = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(read, range(n)))
            out["read_gbps"][str(n)] = len(paths) * file_bytes / (time.perf_counter() - t) / 1e9
        out["best_read_gbps"] = max(out["read_gbps"].values())
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def server_stats(http_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/stats", timeout=5) as r:
        return json.loads(r.read())


def wait_disk_idle(http_port: int, timeout_s: float = 300.0) -> dict:
    """Poll /stats until the disk tier has had no copy in flight for two polls; its stats."""
    deadline, quiet = time.monotonic() + timeout_s, 0
    while True:
        stats = server_stats(http_port)
        tier = stats["tiers"][0]
        quiet = quiet + 1 if tier["copies_in_flight"] == 0 else 0
        if quiet >= 2 or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def tier_summary(stats: dict) -> dict:
    """What a run reports of a server's disk tier."""
    keys = ("settings", "capacity_bytes", "used_bytes", "files", "waiting_files", "writes",
            "written_bytes", "reads", "read_bytes", "checksum_failures", "write_errors",
            "read_errors", "dropped_writes", "prefetch_started", "prefetch_landed",
            "prefetch_timeouts", "prefetch_skipped", "read_bytes_per_s", "last_error")
    tier = stats["tiers"][0]
    return {"stored_chunks": stats["stored_chunks"], "hit_chunks": stats["hit_chunks"],
            **{k: tier.get(k) for k in keys}}


def run_disk_modes(
    args: argparse.Namespace, log_dir: Path, raw: dict, disk: dict, save: Callable[[], None],
    start_server: Callable, run_mode: Callable, chunk_bytes: int,
) -> None:
    """``args.modes`` but the last against a server with a disk tier (``start_server(args,
    log_path, disk_dir)``, ``run_mode(mode, args, log_dir, raw)``), then the server stopped
    with SIGTERM, the page cache dropped, the server restarted on the same directory, and
    mode kvdepot-disk: a fresh engine served from disk. Fills ``disk`` with the disk's
    filesystem, the raw baseline and the tier's figures; ``save()`` after each step."""
    file_bytes = footprint(chunk_bytes)
    raw_bytes = args.raw_files * file_bytes
    disk_dir, mount = pick_disk_dir(args.disk_dirs, int(args.disk_size * 1e9) + raw_bytes)
    room_gb = (mount["free_bytes"] - raw_bytes - 2e9) / 1e9
    if room_gb < args.disk_size:
        print(f"  only {mount['free_bytes'] / 1e9:.1f} GB free: --disk-size {room_gb:.1f}", flush=True)
        args.disk_size = max(room_gb, 1.0)
    disk.update(dir=disk_dir, mount=mount, disk_size_gb=args.disk_size, workers=args.disk_workers,
                recompute_tokens_per_s_setting=args.recompute_tokens_per_s)
    print(f"  disk tier at {disk_dir}: {mount['fstype']} on {mount['device']} "
          f"({mount['free_bytes'] / 1e9:.1f} GB free)", flush=True)
    threads = sorted({1, args.disk_workers, 8})
    disk["raw"] = raw_direct_read(disk_dir + "-raw", file_bytes, args.raw_files, threads)
    r = disk["raw"]
    print(f"  raw {'O_DIRECT' if r['direct'] else 'buffered'} I/O, {r['files']} files of "
          f"{file_bytes / 2**20:.0f} MiB: write {r['write_gbps']:.2f} GB/s, read "
          + ", ".join(f"{v:.2f} GB/s on {k} threads" for k, v in r["read_gbps"].items())
          + f"; page cache drop: {r['page_cache']}", flush=True)
    save()
    try:
        with start_server(args, log_dir / "kvdepot-server.log", disk_dir) as srv:
            args.port = srv.port
            for mode in args.modes[:-1]:
                run_mode(mode, args, log_dir, raw)
                if mode == "kvdepot-store":  # let the write-through copies land first
                    t = time.monotonic()
                    disk["after_store"] = tier_summary(wait_disk_idle(srv.http_port))
                    disk["after_store"]["waited_s"] = time.monotonic() - t
                    print(f"  disk writes after the store: {disk['after_store']}", flush=True)
                save()
            disk["before_restart"] = tier_summary(wait_disk_idle(srv.http_port))
            disk["sigterm_exit"] = srv.stop()
        disk["page_cache"] = drop_page_cache()
        print(f"  server stopped (exit {disk['sigterm_exit']}); page cache drop: {disk['page_cache']}",
              flush=True)
        with start_server(args, log_dir / "kvdepot-server-restarted.log", disk_dir) as srv:
            args.port = srv.port
            disk["adopted"] = [ln for ln in srv.log().splitlines() if "Disk tier" in ln]
            run_mode("kvdepot-disk", args, log_dir, raw)
            disk["after_disk_engine"] = tier_summary(server_stats(srv.http_port))
            print(f"  disk tier after the disk engine: {disk['after_disk_engine']}", flush=True)
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
