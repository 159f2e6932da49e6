"""The RPC loop side of tiers, in-process: a real CacheServer (ZMQ, a shared-memory arena, the
worker pool) with a lower tier that keeps its bytes in this process's memory, driven by a
real client over TCP. Copies run on the worker threads; their completions wake the loop at
once, with no request and no tick."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import small_geometry

from kvdepot.client import KVDepotClient
from kvdepot.protocol import SlotStatus
from kvdepot.server.allocator import SlabAllocator
from kvdepot.server.arena import SharedArena
from kvdepot.server.cache import CacheCore
from kvdepot.server.effects import Delete, Demote, Prefetch
from kvdepot.server.locations import RemoteKey
from kvdepot.server.rpc import CacheServer
from kvdepot.server.tiers import TierIO, TierSpec

SLOT = 64 << 10


class MemoryTier:
    """A lower tier in this process's memory: real bytes, copied on the worker threads, each
    copy taking ``delay_s`` (a disk's latency) so it ends well after the request's reply."""

    def __init__(self, delay_s: float):
        self.spec = TierSpec("memory", 64 * SLOT, 4, lambda ns, key, rank: RemoteKey(ns + key + bytes([rank])))
        self.io = TierIO()
        self.delay_s = delay_s
        self.data: dict[RemoteKey, bytes] = {}
        self.finished: list[float] = []  # when each copy's I/O was done
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def _done(self) -> None:
        with self._lock:
            self.finished.append(time.monotonic())
            self.threads.add(threading.current_thread().name)

    def write(self, job: Demote, source: memoryview) -> None:
        time.sleep(self.delay_s)
        with self._lock:
            self.data[job.target] = bytes(source)
        self._done()

    def read(self, job: Prefetch, target: memoryview) -> None:
        time.sleep(self.delay_s)
        with self._lock:
            target[:] = self.data[job.source]
        self._done()

    def delete(self, job: Delete) -> None:
        with self._lock:
            self.data.pop(job.where, None)

    def scan(self):
        return iter(())

    def nodes(self):
        return []


@pytest.fixture
def tiered_server():
    tier = MemoryTier(delay_s=0.15)
    core = CacheCore(SlabAllocator(16 * SLOT, 16 * SLOT), 256, tiers=[tier.spec])
    applied: list[tuple[float, object]] = []
    event = threading.Event()
    complete = core.complete

    def recording_complete(done, now):  # on the RPC thread
        applied.append((time.monotonic(), done))
        event.set()
        return complete(done, now)

    core.complete = recording_complete  # type: ignore[method-assign]
    arena = SharedArena(f"kvdepot-test-tiers-{os.getpid()}", 16 * SLOT)
    arena.touch_pages()
    workers = ThreadPoolExecutor(2, thread_name_prefix="kvdepot-worker")
    server = CacheServer(core, arena, port=0, executor=workers, tiers={"memory": tier})
    loop = threading.Thread(target=server.serve_forever, name="kvdepot-rpc")
    loop.start()
    try:
        yield server, tier, applied, event
    finally:
        server.stop()
        loop.join(5)
        workers.shutdown(wait=True)
        arena.close()


def wait_for(event: threading.Event, what: str, timeout: float = 5.0) -> None:
    assert event.wait(timeout), f"no {what} within {timeout} s"
    event.clear()


def test_a_write_back_and_a_load_complete_without_a_request(tiered_server):
    server, tier, applied, event = tiered_server
    client = KVDepotClient("127.0.0.1", server.port, heartbeat=False, prefault=False)
    assert client.connect()
    try:
        ns = client.register("m", small_geometry(), 1)
        assert ns.slot_bytes == SLOT
        keys = client.chunk_keys(ns, list(range(16 * 256)))
        res = client.reserve(ns, 0, keys)
        assert res.status == [SlotStatus.RESERVED] * 16
        for i, offset in enumerate(res.offsets):  # the engine writes each chunk's bytes
            client.arena().slot(offset, SLOT)[:] = i + 1
        assert client.commit(res.id) == 16
        # The arena is full: the tail is written down for the next store, which waits.
        head = client.chunk_keys(ns, [7] * 256)
        assert client.reserve(ns, 0, head).status == [SlotStatus.NO_SPACE]
        # No request from here on: the copy ends on a worker thread and its completion is
        # applied by the RPC thread at once (the loop's tick is 100 ms).
        wait_for(event, "completion of the write-back")
        [(applied_at, done)] = applied
        assert done.ok and applied_at - tier.finished[0] < 0.03, applied_at - tier.finished[0]
        assert "kvdepot-rpc" not in tier.threads and len(tier.data) == 1
        assert [bytes(v[:1]) for v in tier.data.values()] == [bytes([16])]
        # Its slot is free: the store goes through; a leased lookup loads the tail back.
        res = client.reserve(ns, 0, head)
        assert res.status == [SlotStatus.RESERVED]
        client.abort(res.id)
        looked = client.lookup(ns, keys, lease_ms=5000)
        assert looked.hit_chunks == 15
        client.release([looked.lease])
        wait_for(event, "completion of the load")
        assert applied[1][1].ok and applied[1][0] - tier.finished[1] < 0.03
        looked = client.lookup(ns, keys, lease_ms=5000)
        assert looked.hit_chunks == 16
        for i, offset in enumerate(looked.offsets):
            assert (client.arena().slot(offset, SLOT) == i + 1).all(), i
        client.release([looked.lease], retrieved=[looked.lease])
    finally:
        client.close()


def test_an_admin_job_runs_at_once(tiered_server):
    server, _, _, _ = tiered_server
    started = time.monotonic()
    for _ in range(5):
        assert server.clear_cache() == 0
    # Before, an admin job waited for the loop's next 100 ms tick.
    assert (time.monotonic() - started) / 5 < 0.02


def test_a_tier_the_core_keeps_books_of_must_be_run():
    spec = MemoryTier(0).spec
    core = CacheCore(SlabAllocator(16 * SLOT, 16 * SLOT), 256, tiers=[spec])
    arena = SharedArena(f"kvdepot-test-tiers-none-{os.getpid()}", 16 * SLOT)
    try:
        with pytest.raises(ValueError, match=r"tiers \['memory'\] that nobody runs"):
            CacheServer(core, arena, port=0)
    finally:
        arena.close()
