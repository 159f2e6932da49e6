"""The disk tier in a running server: real server processes (or, where the core's invariants
are checked, a real server in this process), real clients storing real bytes over TCP, real
files. Restarts after SIGTERM and SIGKILL, damaged files, a working set 3x the buffer, a disk
that fills up."""

from __future__ import annotations

import os
import random
import signal
import shutil
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import small_geometry
from server_process import ServerProcess
from test_disk_tier import (
    damage_flip, damage_truncate, damage_version, http_stats, load, prompt, store, wait_until,
)

from kvdepot.client import KVDepotClient
from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.arena import SharedArena
from kvdepot.server.cache import CacheCore
from kvdepot.server.rpc import CacheServer
from kvdepot.server.tiers.chunkfile import footprint
from kvdepot.server.tiers.disk import DiskTier

SLOT = 64 << 10  # small_geometry's chunk: 64 KiB per rank
SMALL_BUFFER_GB = "0.002"  # 30 slots of 64 KiB (two slabs of 15)


def start(tmp_path: Path, disk: Path, *extra: str, buffer_gb: str = SMALL_BUFFER_GB,
          name: str = "server") -> ServerProcess:
    return ServerProcess(
        buffer_gb=float(buffer_gb), log_path=tmp_path / f"{name}.log",
        extra=["--disk-path", str(disk), "--disk-size", "0.05", "--max-workers", "2", *extra],
    ).start()


def connect(server: ServerProcess) -> KVDepotClient:
    client = KVDepotClient("127.0.0.1", server.port, timeout_ms=5000, heartbeat=False)
    assert client.connect(), server.log()
    return client


def disk_stats(server: ServerProcess) -> dict:
    [tier] = http_stats(server.http_port)["tiers"]
    return tier


def chunk_files(disk: Path) -> dict[str, Path]:
    """key hex -> its file (rank 0)."""
    return {p.name.split("-")[0]: p for p in disk.glob("??/*.kvc")}


def finish(server: ServerProcess) -> None:
    server.stop()
    try:
        os.unlink(f"/dev/shm/{server.shm_name}")
    except FileNotFoundError:
        pass


@pytest.mark.parametrize("how, policy", [
    (signal.SIGTERM, "write-through"), (signal.SIGKILL, "write-through"), (signal.SIGKILL, "write-back"),
])  # fmt: skip
def test_a_restarted_server_serves_what_the_last_one_wrote(tmp_path, how, policy):
    disk = tmp_path / "disk"
    first = start(tmp_path, disk, "--disk-write-policy", policy, name="first")
    try:
        client = connect(first)
        ns = client.register("m", small_geometry(), 1)
        kept = prompt(client, ns, 1, 8)
        store(client, ns, kept)
        written = lambda: chunk_files(disk).keys() >= {k.hex() for k in kept}  # noqa: E731
        if policy == "write-back":
            # More prompts overflow the 30-slot buffer: `kept`, least recently used, is
            # written down as it is evicted, from its tail (while a write runs, the
            # eviction takes other chains' tails: a few prompts more than its size).
            for seed in range(2, 20):
                if written():
                    break
                store(client, ns, prompt(client, ns, seed, 8))
                wait_until(lambda: disk_stats(first)["copies_in_flight"] == 0, "writes done")
        wait_until(lambda: written() and disk_stats(first)["copies_in_flight"] == 0,
                   "kept written down")
        assert disk_stats(first)["write_errors"] == 0
        client.close()
    finally:
        if how == signal.SIGKILL:
            first.kill()
        finish(first)
    files = chunk_files(disk)

    second = start(tmp_path, disk, name="second")
    try:
        tier = disk_stats(second)
        assert tier["waiting_files"] == len(files) and tier["used_bytes"] == len(files) * footprint(SLOT)
        client = connect(second)
        ns = client.register("m", small_geometry(), 1)  # the namespace's chunks join the index
        assert disk_stats(second)["waiting_files"] == 0
        keys = prompt(client, ns, 1, 8)
        assert keys == kept
        assert client.lookup(ns, keys).hit_chunks == 0  # on disk, not in the buffer
        hits, most_pending = load(client, ns, keys)  # checks every byte
        assert hits == 8 and most_pending > 0
        tier = disk_stats(second)
        assert tier["reads"] >= 8 and tier["prefetch_landed"] >= 8 and tier["checksum_failures"] == 0
        assert client.lookup(ns, keys).hit_chunks == 8  # in the buffer now
        client.close()
    finally:
        finish(second)


def test_damaged_files_are_misses_and_are_removed_and_counted(tmp_path):
    disk = tmp_path / "disk"
    first = start(tmp_path, disk, "--disk-write-policy", "write-through", name="first")
    try:
        client = connect(first)
        ns = client.register("m", small_geometry(), 1)
        heads = [prompt(client, ns, 10 + i, 1) for i in range(4)]  # four one-chunk prompts
        for keys in heads:
            store(client, ns, keys)
        wait_until(lambda: len(chunk_files(disk)) == 4, "all written through")
        client.close()
    finally:
        finish(first)
    files = chunk_files(disk)
    flipped, truncated, other_version, intact = (files[k[0].hex()] for k in heads)
    damage_flip(str(flipped))
    damage_truncate(str(truncated))
    damage_version(str(other_version))
    stray = disk / "00" / "abandoned-0-1.kvc.tmp"
    stray.write_bytes(b"\0" * 5000)

    second = start(tmp_path, disk, name="second")
    try:
        tier = disk_stats(second)
        # The scan removed what it can tell is bad; a flipped payload byte shows on reading.
        assert (tier["bad_files"], tier["temp_files_removed"], tier["waiting_files"]) == (2, 1, 2)
        assert not truncated.exists() and not other_version.exists() and not stray.exists()
        client = connect(second)
        ns = client.register("m", small_geometry(), 1)
        assert load(client, ns, heads[3]) == (1, 1)  # intact: pending, then a hit, bytes equal
        hits, _ = load(client, ns, heads[0])
        assert hits == 0 and not flipped.exists()
        assert disk_stats(second)["checksum_failures"] == 1
        assert load(client, ns, heads[1]) == (0, 0) and load(client, ns, heads[2]) == (0, 0)
        # Each miss is stored again and served like any chunk.
        store(client, ns, heads[0])
        assert load(client, ns, heads[0]) == (1, 0)
        stats = http_stats(second.http_port)
        assert stats["leases_held"] == 0 and stats["reservations_open"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{second.http_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        for line in ('kvdepot_tier_checksum_failures_total{tier="disk"} 1.0',
                     'kvdepot_tier_bad_files_total{tier="disk"} 2.0',
                     'kvdepot_tier_temp_files_removed_total{tier="disk"} 1.0'):
            assert line in metrics, line
        client.close()
    finally:
        finish(second)


def test_a_working_set_three_times_the_buffer_hits_through_the_disk(tmp_path):
    """In process, so the core's invariants can be checked after the run: a real CacheServer
    with a real DiskTier, a real client over TCP. 8 buffer slots, six 4-chunk prompts."""
    cap = 20 * footprint(SLOT)  # less than the working set: the disk evicts too
    tier = DiskTier(str(tmp_path / "disk"), cap, queue_depth=4)
    core = CacheCore(SlabAllocator(8 * SLOT, 8 * SLOT), 256, tiers=[tier.spec])
    core.adopt("disk", list(tier.scan()))
    arena = SharedArena(f"kvdepot-test-disk-{os.getpid()}", 8 * SLOT)
    arena.touch_pages()
    workers = ThreadPoolExecutor(2, thread_name_prefix="kvdepot-worker")
    server = CacheServer(core, arena, port=0, executor=workers, tiers={"disk": tier})
    loop = threading.Thread(target=server.serve_forever, name="kvdepot-rpc")
    loop.start()
    on_disk_max = 0
    try:
        client = KVDepotClient("127.0.0.1", server.port, timeout_ms=5000, heartbeat=False, prefault=False)
        assert client.connect()
        ns = client.register("m", small_geometry(), 1)
        prompts = [prompt(client, ns, 100 + i, 4) for i in range(6)]
        hit_chunks = looked_up = 0
        order = random.Random(7)
        for turn in range(80):
            # Random prompts (a cyclic order would defeat any LRU cache smaller than the set).
            keys = prompts[order.randrange(6)]
            hits, _ = load(client, ns, keys)
            if turn >= 12:
                hit_chunks, looked_up = hit_chunks + hits, looked_up + len(keys)
            if hits < len(keys):
                store(client, ns, keys[hits:], parent=keys[hits - 1] if hits else b"")
            on_disk = sum(p.stat().st_size for p in (tmp_path / "disk").glob("??/*"))
            on_disk_max = max(on_disk_max, on_disk)
            assert tier.io.used_bytes <= cap and on_disk <= cap
        client.close()
        wait_until(lambda: core.places.lower.books["disk"].in_flight == 0 and not core.leases
                   and not core.reservations, "copies done, leases and reservations gone")
        server.run_in_loop(core.check_invariants)
        stats = server.stats()
        [disk] = stats.tiers
        assert disk.prefetch_landed > 0 and disk.reads > 0 and disk.checksum_failures == 0
        # The buffer holds 2 of the 6 prompts (a third of the hits without the disk).
        assert hit_chunks / looked_up > 0.75, (hit_chunks, looked_up, disk)  # 0.91 measured
        assert disk.used_bytes <= cap and on_disk_max <= cap
    finally:
        server.stop()
        loop.join(5)
        workers.shutdown(wait=True)
        arena.close()
        tier.close()


def test_a_full_disk_leaves_stores_in_memory_and_says_why(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"cannot mount a 4 MB tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        server = start(tmp_path, small, "--disk-write-policy", "write-through", buffer_gb="0.05")
        try:
            client = connect(server)
            ns = client.register("m", small_geometry(), 1)
            prompts = [prompt(client, ns, 200 + i, 8) for i in range(12)]  # 96 chunks, 6 MiB
            for keys in prompts:
                store(client, ns, keys)
            tier = wait_until(lambda: (t := disk_stats(server))["write_errors"] and t, "a write error")
            assert "No space left on device" in tier["last_error"], tier
            # The tier's count includes writes in flight (a failed one is uncounted when it
            # ends): within its cap; the filesystem itself holds at most its 4 MB.
            assert tier["used_bytes"] <= tier["capacity_bytes"], tier
            assert shutil.disk_usage(small).used <= 4 << 20
            for keys in prompts:  # every chunk is in memory all the same
                assert load(client, ns, keys) == (8, 0)
            assert server.alive
            status = subprocess.run(
                [sys.executable, "-m", "kvdepot", "status", "--url", f"127.0.0.1:{server.http_port}"],
                capture_output=True, text=True, timeout=30,
            )
            assert "No space left on device" in status.stdout and "disk tier" in status.stdout
            client.close()
        finally:
            finish(server)
        assert server.proc.returncode == 0, server.log()
    finally:
        subprocess.run(["umount", str(small)], check=False)
