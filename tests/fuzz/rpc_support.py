"""The edges of the ``rpc`` target's server: a lower tier holding real bytes in this process
and an executor that runs the tier workers' tasks only when the fuzzer says so.

The server's own TierWorkers hand their tasks to ``StepExecutor``; the harness runs them
one by one on its own thread (``run``), so copies end between any two requests, in an order
the input decides, and their completions reach the loop through the real Completions socket.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future

from kvdepot.server.effects import Delete, Demote, Prefetch, Probe
from kvdepot.server.locations import RemoteKey
from kvdepot.server.tiers import TierError, TierIO, TierSpec

SLOT = 64 << 10


class StepExecutor(Executor):
    """Queues tasks; ``run`` runs the oldest ones now, on the calling thread."""

    def __init__(self) -> None:
        self.tasks: deque[tuple[Callable[[], object], Future]] = deque()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self.tasks.append((lambda: fn(*args, **kwargs), future))
        return future

    def run(self, n: int) -> int:
        """Run up to ``n`` queued tasks; how many ran."""
        ran = 0
        while self.tasks and ran < n:
            task, future = self.tasks.popleft()
            future.set_result(task())
            ran += 1
        return ran

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.tasks.clear()


class MemoryTier:
    """A lower tier whose places are this process's bytes objects. ``failing``: the next
    copies fail (a full or broken disk) while it is true."""

    def __init__(self, capacity_slots: int, queue_depth: int, write_through: bool):
        self.spec = TierSpec(
            "memory", capacity_slots * SLOT, queue_depth, self._locate, write_through=write_through,
        )
        self.io = TierIO()
        self.data: dict[RemoteKey, bytes] = {}
        self.failing = False
        self.stray_deletes: list[Delete] = []  # deletes of places it does not hold
        self._writes = 0

    def _locate(self, ns: bytes, key: bytes, rank: int) -> RemoteKey:
        self._writes += 1  # a new place per write, as the disk tier names its files
        return RemoteKey(key + bytes([rank]) + b"%d" % self._writes)

    def write(self, job: Demote, source: memoryview) -> None:
        if self.failing:
            raise TierError("injected write failure")
        self.data[job.target] = bytes(source)  # type: ignore[index]

    def read(self, job: Prefetch, target: memoryview) -> None:
        if self.failing:
            self.data.pop(job.source, None)  # type: ignore[arg-type]
            raise TierError("injected checksum failure")
        target[:] = self.data[job.source]  # type: ignore[index]

    def delete(self, job: Delete) -> None:
        if self.data.pop(job.where, None) is None:  # type: ignore[arg-type]
            self.stray_deletes.append(job)

    def scan(self):
        return iter(())

    def probe(self, job: Probe) -> int:
        raise TierError("not a shared tier")

    def nodes(self) -> list:
        return []
