"""Disk tier benchmark: the tier's I/O against raw disk I/O of the same sizes, prefetch
latency through a real server, and the hit ratio of a working set 3x the buffer.

(a) Throughput. The real ``DiskTier`` writes chunk files from a real shared-memory arena
    (``SharedArena``) and reads them back into it (header, O_DIRECT, CRC32C checks, rename,
    utime: everything a worker thread does), on 1 or 2 threads, for 1, 16 and 40 MiB chunks
    (40 MiB: a 256-token Qwen3-14B chunk). The baselines, on the same filesystem, from and
    into the same arena bytes: one raw ``pwrite`` / ``preadv`` per file of the chunk's size,
    O_DIRECT, and buffered (a write with ``fdatasync``, a read after
    ``posix_fadvise(DONTNEED)``). Every read is cold: O_DIRECT, or the file's pages dropped
    first. Each repetition runs the three sides back to back, in a rotating order, so the
    machine's drift hits them alike; a ratio is tier / raw O_DIRECT within one repetition,
    and the table shows the median of those ratios.
(b) Prefetch latency. A real server process with a disk tier: one chunk stored, written
    through to disk and pushed out of the buffer; then a leased lookup (answered ``pending``)
    and lookups again every ``--poll-ms`` until it is a hit, as the vLLM connector asks again
    each step. Against a raw O_DIRECT read of a file of the same size written at the same
    point (as fresh as the chunk's), before or after it in turn.
(c) Hit ratio. N prompts of a few chunks, 3x the buffer's slots, looked up in a seeded random
    order (LRU), misses stored; a real server with a disk tier and one without, the same order.

    python bench/disk_tier.py [--quick] [--dir DIR] [--out bench/results/disk_tier.json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from server_process import ServerProcess  # noqa: E402

from kvdepot.client import KVDepotClient  # noqa: E402
from kvdepot.protocol import KVGeometry, SlotStatus  # noqa: E402
from kvdepot.server.arena import SharedArena  # noqa: E402
from kvdepot.server.effects import Delete, Demote, Prefetch  # noqa: E402
from kvdepot.server.locations import ArenaSlot  # noqa: E402
from kvdepot.server.tiers.disk import DiskTier  # noqa: E402

MIB = 1 << 20
O_DIRECT = getattr(os, "O_DIRECT", 0)
NS = bytes(16)
TARGET = 0.8  # tier / raw, both directions


def geometry(layers: int, heads: int = 8, head_dim: int = 128) -> KVGeometry:
    """A layer-major geometry whose 256-token chunk is layers * heads * head_dim KiB."""
    piece = 16 * heads * 2 * head_dim * 2  # one 16-token block of one layer, bf16, K and V
    return KVGeometry(
        num_layers=layers, num_kv_heads=heads, head_size_k=head_dim, head_size_v=head_dim,
        dtype="bfloat16", block_size=16, num_planes=layers, piece_bytes=piece,
        layout=f"layer_major:{layers}x{piece}:bench",
    )


GEOMETRIES = {1: geometry(4, 2), 40: geometry(40)}  # by MiB per chunk (40: Qwen3-14B's)


# --- (a) throughput -------------------------------------------------------------------------


def raw_io(path: str, view: memoryview, direct: bool, write: bool) -> None:
    """The baseline: one file of ``len(view)`` bytes written from, or read into, ``view``."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC if write else os.O_RDONLY) | os.O_CLOEXEC
    fd = os.open(path, flags | (O_DIRECT if direct else 0), 0o600)
    try:
        done = 0
        while done < len(view):
            n = os.pwrite(fd, view[done:], done) if write else os.preadv(fd, [view[done:]], done)
            if n <= 0:
                raise OSError(f"{path}: short {'write' if write else 'read'}")
            done += n
        if write and not direct:
            os.fdatasync(fd)  # on the device, as an O_DIRECT write is
    finally:
        os.close(fd)


def drop_cache(path: str) -> None:
    """Evict one file's pages from the page cache (so its next read comes from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def file_ops(tier: DiskTier, arena: SharedArena, raw_dir: Path, rep: int, files: int, nbytes: int) -> dict:
    """{side: (write file i, read file i)}: one repetition's files, each from and into arena
    slot i, through the tier, raw O_DIRECT and raw buffered; and the deletes of the tier's."""
    keys = [i.to_bytes(16, "little") for i in range(files)]
    wheres = [tier.spec.locate(NS, key, 0) for key in keys]
    slot = lambda i: ArenaSlot(0, i * nbytes)  # noqa: E731
    raw = lambda direct, i: str(raw_dir / f"{direct}-{rep}-{i}")  # noqa: E731

    def on_slot(fn):
        def op(i: int) -> None:
            with arena.view(i * nbytes, nbytes) as view:
                fn(i, view)
        return op

    return {
        "tier": (
            on_slot(lambda i, v: tier.write(Demote(i, "disk", NS, keys[i], 0, slot(i), nbytes, wheres[i]), v)),
            on_slot(lambda i, v: tier.read(Prefetch(i, "disk", NS, keys[i], 0, wheres[i], slot(i), nbytes), v)),
        ),
        **{side: (on_slot(lambda i, v, d=direct: raw_io(raw(d, i), v, d, write=True)),
                  on_slot(lambda i, v, d=direct: raw_io(raw(d, i), v, d, write=False)))
           for side, direct in (("raw_direct", True), ("raw_buffered", False))},
        "deletes": [Delete("disk", NS, k, 0, w) for k, w in zip(keys, wheres)],
    }


def throughput(work: Path, chunk_mib: int, threads: int, reps: int, rep_mib: int) -> dict:
    nbytes = chunk_mib * MIB
    files = max(4, rep_mib // chunk_mib)
    arena = SharedArena(f"kvdepot-bench-disk-{os.getpid()}", files * nbytes)
    tier_dir, raw_dir = work / f"tier-{chunk_mib}-{threads}", work / f"raw-{chunk_mib}-{threads}"
    raw_dir.mkdir()
    tier = DiskTier(str(tier_dir), 2 * files * (nbytes + 2 * MIB), queue_depth=16)
    pool = ThreadPoolExecutor(threads)
    sides = ["tier", "raw_direct", "raw_buffered"]
    samples: dict[str, list[float]] = {f"{side}_{op}_s": [] for side in sides for op in ("write", "read")}

    def timed(fn) -> float:
        started = time.perf_counter()
        for _ in pool.map(fn, range(files)):
            pass
        return time.perf_counter() - started

    try:
        arena.touch_pages()
        with arena.view(0, arena.size) as whole:
            np.frombuffer(whole, np.uint8)[:] = np.random.default_rng(chunk_mib).integers(
                0, 256, arena.size, dtype=np.uint8)
        for rep in range(reps):
            ops = file_ops(tier, arena, raw_dir, rep, files, nbytes)
            order = sides[rep % 3 :] + sides[: rep % 3]  # who goes first rotates
            for side in order:
                samples[f"{side}_write_s"].append(timed(ops[side][0]))
            # Cold reads: the tier and raw_direct read with O_DIRECT; drop the others' pages.
            for path in raw_dir.glob(f"False-{rep}-*"):
                drop_cache(str(path))
            for side in order:
                samples[f"{side}_read_s"].append(timed(ops[side][1]))
            for job in ops["deletes"]:
                tier.delete(job)
            for path in raw_dir.iterdir():
                path.unlink()
        assert tier.io.checksum_failures == 0 and tier.io.write_errors == 0
    finally:
        pool.shutdown()
        tier.close()
        arena.close()
        shutil.rmtree(tier_dir, ignore_errors=True)
        shutil.rmtree(raw_dir, ignore_errors=True)
    row = {"chunk_mib": chunk_mib, "threads": threads, "files_per_rep": files, "reps": reps,
           "tier_direct_io": tier.direct}
    for op in ("write", "read"):
        for side in sides:
            row[f"{side}_{op}_gbps"] = files * nbytes / statistics.median(samples[f"{side}_{op}_s"]) / 1e9
        tier_s = samples[f"tier_{op}_s"]
        row[f"{op}_ratios"] = [r / t for t, r in zip(tier_s, samples[f"raw_direct_{op}_s"])]
        row[f"{op}_ratio"] = statistics.median(row[f"{op}_ratios"])
        row[f"{op}_ratio_vs_buffered"] = statistics.median(
            r / t for t, r in zip(tier_s, samples[f"raw_buffered_{op}_s"]))
    row["seconds"] = samples
    return row


# --- (b), (c): through a real server --------------------------------------------------------


def server(work: Path, name: str, slot: int, slots: int, disk: bool, *extra: str) -> ServerProcess:
    args = ["--slab-size-mb", str(max(1, slot // MIB)), "--log-level", "WARNING", *extra]
    if disk:
        args += ["--disk-path", str(work / f"disk-{name}"), "--max-workers", "2"]
    return ServerProcess(buffer_gb=(slots * slot + 4096) / 1e9, extra=args, log_path=work / f"{name}.log")


def connect(srv: ServerProcess, geo: KVGeometry):
    client = KVDepotClient("127.0.0.1", srv.port, timeout_ms=10_000, heartbeat=False)
    assert client.connect(), srv.log()
    return client, client.register("bench", geo)


def store(client, ns, keys: list[bytes], parent: bytes = b"", fill=None, timeout: float = 30.0) -> None:
    """Reserve, write, commit; a call the buffer has no room for yet (write-backs running)
    is tried again."""
    deadline = time.monotonic() + timeout
    while True:
        res = client.reserve(ns, 0, keys, parent=parent)
        for key, status, offset in zip(keys, res.status, res.offsets):
            if status == SlotStatus.RESERVED and fill is not None:
                fill(client.arena(res.epoch).slot(offset, ns.slot_bytes), key)
        if res.id:
            client.commit(res.id)
        if all(s in (SlotStatus.RESERVED, SlotStatus.PRESENT) for s in res.status):
            return
        assert time.monotonic() < deadline, f"no room in {timeout} s: {res.status}"
        time.sleep(0.002)


def tier_stats(client):
    return client.stats().tiers[0]


def settle(client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while tier_stats(client).copies_in_flight:
        assert time.monotonic() < deadline, "disk copies still in flight"
        time.sleep(0.005)


def lookup_until_landed(client, ns, keys: list[bytes], poll_s: float, timeout: float = 30.0):
    """Leased lookups as the connector asks them (each keeps the last lease until the next
    took its own); (hits of the first reply, pending in it, final hits, seconds to the first
    and to the last reply, lookups made, the final result with its lease held)."""
    started = time.perf_counter()
    res = client.lookup(ns, keys, lease_ms=30_000)
    first_hits, first_pending, asked, first_s = res.hit_chunks, res.pending, 1, time.perf_counter() - started
    while res.pending:
        asked += 1
        assert time.perf_counter() - started < timeout, "still pending"
        time.sleep(poll_s)
        new = client.lookup(ns, keys, lease_ms=30_000)
        if res.lease:
            client.release([res.lease])
        res = new
    return first_hits, first_pending, res.hit_chunks, first_s, time.perf_counter() - started, asked, res


def prefetch_latency(work: Path, chunk_mib: int, reps: int, poll_ms: float) -> dict:
    geo, fillers = GEOMETRIES[chunk_mib], 3
    slot = geo.slot_bytes(256)
    pattern = np.random.default_rng(5).integers(0, 256, slot, dtype=np.uint8)

    def fill(view: np.ndarray, key: bytes) -> None:
        view[:] = pattern
        view[:16] = np.frombuffer(key, np.uint8)

    raw_path = work / f"raw-prefetch-{chunk_mib}"
    raw_buf = mmap.mmap(-1, slot)
    raw_buf.write(pattern.tobytes())

    def timed_raw_read() -> float:
        started = time.perf_counter()
        raw_io(str(raw_path), memoryview(raw_buf), direct=bool(O_DIRECT), write=False)
        return time.perf_counter() - started

    # The default recompute bound (10k tokens/s) skips 40 MiB loads from a disk under 1.6 GB/s:
    # here every load is wanted.
    srv = server(work, f"prefetch-{chunk_mib}", slot, fillers + 1, True, "--disk-size", str(32 * (slot + MIB) / 1e9),
                 "--disk-write-policy", "write-through", "--recompute-tokens-per-s", "1")
    lat, raw, lookups, first = [], [], [], []
    with srv:
        client, ns = connect(srv, geo)
        rng = np.random.default_rng(chunk_mib)
        for rep in range(reps + 1):  # the first is a warm-up
            [key] = client.chunk_keys(ns, rng.integers(0, 50000, 256).tolist())
            store(client, ns, [key], fill=fill)
            # The baseline's file is as fresh as the chunk's: written at the same point.
            raw_io(str(raw_path), memoryview(raw_buf), direct=bool(O_DIRECT), write=True)
            settle(client)
            for _ in range(fillers + 1):  # LRU: the chunk leaves the buffer (its copy stays)
                store(client, ns, client.chunk_keys(ns, rng.integers(0, 50000, 256).tolist()), fill=fill)
            settle(client)
            assert client.lookup(ns, [key]).hit_chunks == 0
            if rep % 2:  # who goes first alternates: the writes just settled may still drain
                t_raw = timed_raw_read()
            hits0, pending0, hits, first_s, seconds, asked, res = lookup_until_landed(client, ns, [key], poll_ms / 1000)
            if not rep % 2:
                t_raw = timed_raw_read()
            assert (hits0, pending0, hits) == (0, 1, 1), (hits0, pending0, hits)
            got = client.arena(res.epoch).slot(res.rank_offsets(0)[0], slot)
            assert (got[16:] == pattern[16:]).all() and bytes(got[:16]) == key
            client.release([res.lease], retrieved=[res.lease])
            if rep:
                lat, raw, lookups, first = lat + [seconds], raw + [t_raw], lookups + [asked], first + [first_s]
        stats = tier_stats(client)
        client.close()
    os.unlink(raw_path)
    return {
        "chunk_mib": chunk_mib, "reps": reps, "poll_ms": poll_ms,
        "prefetch_ms": statistics.median(lat) * 1e3, "prefetch_ms_max": max(lat) * 1e3,
        "raw_direct_read_ms": statistics.median(raw) * 1e3,
        "ratios": [t / r for t, r in zip(lat, raw)], "ratio": statistics.median(t / r for t, r in zip(lat, raw)),
        "lookups_median": statistics.median(lookups), "first_reply_ms": statistics.median(first) * 1e3,
        "server_reads": stats.reads, "prefetch_timeouts": stats.prefetch_timeouts,
        "server_read_gbps_estimate": stats.read_bytes_per_s / 1e9,
    }


def hit_ratio(work: Path, buffer_slots: int, chunks_per_prompt: int, accesses: int, seed: int = 7) -> dict:
    geo = GEOMETRIES[1]
    slot = geo.slot_bytes(256)
    prompts_n = 3 * buffer_slots // chunks_per_prompt
    warmup = 2 * prompts_n
    out = {"buffer_chunks": buffer_slots, "prompts": prompts_n, "chunks_per_prompt": chunks_per_prompt,
           "working_set_chunks": prompts_n * chunks_per_prompt, "chunk_mib": slot / MIB,
           "accesses_counted": accesses, "warmup_accesses": warmup}
    for disk in (True, False):
        extra = ("--disk-size", str(8 * buffer_slots * (slot + MIB) / 1e9)) if disk else ()
        srv = server(work, f"hits-{disk}", slot, buffer_slots, disk, *extra)
        counts = {"buffer_hits": 0, "disk_hits": 0, "misses": 0}
        with srv:
            client, ns = connect(srv, geo)
            rng = np.random.default_rng(seed)
            prompts = [client.chunk_keys(ns, rng.integers(0, 50000, 256 * chunks_per_prompt).tolist())
                       for _ in range(prompts_n)]
            order = random.Random(seed)  # a cyclic order defeats any LRU smaller than the set
            for turn in range(warmup + accesses):
                keys = prompts[order.randrange(prompts_n)]
                buffered, _, hits, _, _, _, res = lookup_until_landed(client, ns, keys, 0.001)
                if res.lease:
                    client.release([res.lease], retrieved=[res.lease] if hits else [])
                if turn == warmup:
                    started = time.perf_counter()
                if turn >= warmup:
                    counts["buffer_hits"] += buffered
                    counts["disk_hits"] += hits - buffered
                    counts["misses"] += len(keys) - hits
                if hits < len(keys):
                    store(client, ns, keys[hits:], parent=keys[hits - 1] if hits else b"")
            elapsed = time.perf_counter() - started
            total = accesses * chunks_per_prompt
            side = {**counts, "hit_ratio": (counts["buffer_hits"] + counts["disk_hits"]) / total,
                    "ms_per_access": elapsed / accesses * 1e3}
            if disk:
                t = tier_stats(client)
                side.update(disk_reads=t.reads, disk_writes=t.writes, disk_used_bytes=t.used_bytes,
                            dropped_writes=t.dropped_writes, prefetch_timeouts=t.prefetch_timeouts,
                            checksum_failures=t.checksum_failures)
            client.close()
        out["with_disk" if disk else "without_disk"] = side
    return out


# --- report ---------------------------------------------------------------------------------


def filesystem(path: Path) -> str:
    best = ("?", "?", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype = line.split()[:3]
        if str(path).startswith(mnt) and len(mnt) >= len(best[1]):
            best = (dev, mnt, fstype)
    return f"{best[2]} on {best[0]} (mounted at {best[1]})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer and smaller repetitions")
    ap.add_argument("--reps", type=int, default=15, help="repetitions (pairs) per throughput case")
    ap.add_argument("--rep-mib", type=int, default=160, help="MiB each side moves per repetition")
    ap.add_argument("--prefetch-reps", type=int, default=15)
    ap.add_argument("--poll-ms", type=float, default=1.0, help="how often a pending lookup asks again")
    ap.add_argument("--accesses", type=int, default=150, help="counted prompt lookups of (c)")
    ap.add_argument("--parts", default="throughput,prefetch,hits", help="which of (a), (b), (c) to run")
    ap.add_argument("--dir", default="/var/tmp", help="where the files go (the disk under test)")
    ap.add_argument("--out", default=str(REPO / "bench/results/disk_tier.json"))
    args = ap.parse_args()
    if args.quick:
        args.reps, args.rep_mib, args.prefetch_reps, args.accesses = 2, 80, 3, 30

    work = Path(tempfile.mkdtemp(prefix="kvdepot-bench-disk-", dir=args.dir))
    load0 = os.getloadavg()
    try:
        probe = DiskTier(str(work / "probe"), 1 << 30)
        probe.close()
        if not probe.direct:
            raise SystemExit(f"{args.dir} has no O_DIRECT (tmpfs?): reads would not be cold; give --dir on a disk")
        parts = args.parts.split(",")
        rows = [throughput(work, mib, threads, args.reps, args.rep_mib)
                for mib in (1, 16, 40) for threads in (1, 2) if "throughput" in parts]
        prefetch = [prefetch_latency(work, mib, args.prefetch_reps, args.poll_ms)
                    for mib in (1, 40) if "prefetch" in parts]
        hits = hit_ratio(work, 16, 4, args.accesses) if "hits" in parts else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
                   f"Linux {platform.release()}, Python {platform.python_version()}",
        "filesystem": filesystem(work),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_start_end": [load0, os.getloadavg()],
        "throughput": rows, "prefetch": prefetch, "hit_ratio": hits,
        "targets": {"tier_vs_raw_direct_min": TARGET},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"{report['machine']}; {report['filesystem']}")
    print(f"{'chunk':>6}{'thr':>4} | {'write GB/s: tier':>16}{'raw D':>7}{'raw B':>7}{'ratio':>7} | "
          f"{'read GB/s: tier':>15}{'raw D':>7}{'raw B':>7}{'ratio':>7}")
    for r in rows:
        print(f"{r['chunk_mib']:>4}Mi{r['threads']:>4} | {r['tier_write_gbps']:16.2f}{r['raw_direct_write_gbps']:7.2f}"
              f"{r['raw_buffered_write_gbps']:7.2f}{r['write_ratio']:7.2f} | {r['tier_read_gbps']:15.2f}"
              f"{r['raw_direct_read_gbps']:7.2f}{r['raw_buffered_read_gbps']:7.2f}{r['read_ratio']:7.2f}")
    print(f"(raw D: O_DIRECT; raw B: buffered, fdatasync / cold; ratio: median of tier / raw D per pair; "
          f"target >= {TARGET})")
    for p in prefetch:
        print(f"prefetch of one {p['chunk_mib']} MiB chunk: {p['prefetch_ms']:.1f} ms (max {p['prefetch_ms_max']:.1f}), "
              f"(first reply {p['first_reply_ms']:.2f}), raw O_DIRECT read {p['raw_direct_read_ms']:.1f} ms: "
              f"x{p['ratio']:.2f}")
    for side in ("with_disk", "without_disk") if hits else ():
        s = hits[side]
        print(f"working set 3x the buffer ({hits['working_set_chunks']} chunks, buffer {hits['buffer_chunks']}), "
              f"{side.replace('_', ' ')}: hit ratio {s['hit_ratio']:.2f} (buffer {s['buffer_hits']}, "
              f"disk {s['disk_hits']}, missed {s['misses']}), {s['ms_per_access']:.1f} ms per prompt")


if __name__ == "__main__":
    main()
