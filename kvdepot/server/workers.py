"""The edge that carries out the core's effects: tier I/O on the ``--max-workers`` threads.

The RPC thread hands over what ``CacheCore.take_effects`` returned (``TierWorkers.start``).
Copies and deletes run on the worker pool (the one that touches the arena's pages at start);
each copy's completion is posted to ``Completions``, which wakes the RPC loop at once through
an in-process connection to its ROUTER socket; the RPC thread then applies it to the core.
Workers never touch the core.

Probes, loads and deletes go before writes: a probe or a load is what an engine waits for, and
a delete makes the room a queued write needs. Each effect adds one task to the pool, which runs whichever
job is first by that order when a thread takes it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor

import zmq

from kvdepot.server.effects import (
    Completion, Delete, Demote, DemotionDone, Effect, Evicted, Prefetch, PrefetchDone, Probe,
    ProbeDone,
)
from kvdepot.server.locations import ARENA
from kvdepot.server.tiers import Tier

log = logging.getLogger("kvdepot.server")


class Completions:
    """Completions from any thread to the RPC thread.

    ``post`` queues one and sends an empty frame, under the fixed routing id ``identity``, from
    an inproc DEALER connected to the RPC loop's own ROUTER socket (bound at ``address``): the
    loop, blocked in its receive, wakes at once and takes what was posted (``take``). Waking
    through the ROUTER keeps the request path as it was (a blocking receive, no poll of two
    sockets, which cost every round trip ~10 us here). No TCP peer can take that routing id:
    the ROUTER refuses a second peer with an id in use, and this one connects first.
    """

    identity = b"\0kvdepot-completions"  # longer than ZMQ's generated ids (5 bytes)

    def __init__(self, ctx: zmq.Context, address: str):
        # (owner, completion): the partition whose core the completion is for.
        self._items: queue.SimpleQueue[tuple[str, Completion]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # one socket, shared by the workers
        self._closed = False
        self._wake = ctx.socket(zmq.DEALER)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.setsockopt(zmq.ROUTING_ID, self.identity)
        self._wake.connect(address)

    def post(self, completion: Completion | None = None, owner: str = "") -> None:
        """Hand a completion for partition ``owner`` over (None: only wake the loop); any
        thread."""
        if completion is not None:
            self._items.put((owner, completion))
        with self._lock:
            if self._closed:
                return
            try:
                self._wake.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # wake-ups are queued already: the loop will take this one too

    def poster(self, owner: str) -> Callable[[Completion], None]:
        """``post`` for the completions of partition ``owner``'s workers."""
        return lambda completion: self.post(completion, owner)

    def take(self) -> list[tuple[str, Completion]]:
        """Everything posted so far, with its partition; RPC thread."""
        items = []
        while True:
            try:
                items.append(self._items.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.close(linger=0)


class TierWorkers:
    """Runs one partition's effects: copies and deletes on ``executor``, against ``tiers`` by
    name, with its arena's bytes from ``arena_view(offset, nbytes)``; completions go to
    ``post`` (Completions.poster), evictions to ``on_evicted``."""

    def __init__(
        self,
        executor: Executor,
        post: Callable[[Completion], None],
        tiers: Mapping[str, Tier],
        arena_view: Callable[[int, int], memoryview],
        on_evicted: Callable[[str, int], None] | None = None,
    ):
        self.executor = executor
        self.post = post
        self.tiers = dict(tiers)
        self.arena_view = arena_view
        self.on_evicted = on_evicted
        self._reads_lock = threading.Lock()
        self._reads_running = 0
        # (run, effect) to do: loads and deletes, then writes. Appended by the RPC thread,
        # taken by the pool's threads (deque's append and popleft are atomic).
        self._first: deque[tuple[Callable, Effect]] = deque()
        self._then: deque[tuple[Callable, Effect]] = deque()

    def start(self, effects: list[Effect]) -> None:
        """Carry out the core's effects, in order; RPC thread (never blocks on I/O)."""
        evicted: dict[str, int] = {}
        for effect in effects:
            kind = type(effect)
            if kind is Evicted:
                evicted[effect.tier] = evicted.get(effect.tier, 0) + 1  # type: ignore[union-attr]
            elif kind is Demote:
                self._submit(self._then, self._demote, effect, DemotionDone)
            elif kind is Prefetch:
                self._submit(self._first, self._prefetch, effect, PrefetchDone)
            elif kind is Delete:
                self._submit(self._first, self._delete, effect, None)
            elif kind is Probe:
                self._submit(self._first, self._probe, effect, ProbeDone)
            else:
                raise TypeError(f"unknown effect {effect!r}")
        if self.on_evicted is not None:
            for tier, n in evicted.items():
                self.on_evicted(tier, n)

    def _submit(self, jobs: deque, run: Callable, effect: Effect, done: type | None) -> None:
        jobs.append((run, effect))
        try:
            self.executor.submit(self._run_next)
        except RuntimeError as exc:  # shutting down: one queued job never starts
            try:
                _, effect = jobs.pop()  # ours, unless a thread took it (then it runs)
            except IndexError:
                return
            if done is ProbeDone:
                self.post(ProbeDone(effect.job, 0, f"not started: {exc}"))  # type: ignore[union-attr]
            elif done is not None:
                self.post(done(effect.job, False, f"not started: {exc}"))  # type: ignore[union-attr]

    def _run_next(self) -> None:
        try:
            run, effect = self._first.popleft()
        except IndexError:
            run, effect = self._then.popleft()  # one task per job: there is one
        run(effect)

    def _demote(self, job: Demote) -> None:
        tier = self.tiers.get(job.tier)
        write = None if tier is None else (lambda view: tier.write(job, view))
        ok, error = self._copy(write, job.source.offset, job.nbytes)
        self.post(DemotionDone(job.job, ok, error))

    def _prefetch(self, job: Prefetch) -> None:
        tier = self.tiers.get(job.tier)
        read = None if tier is None else (lambda view: tier.read(job, view))
        with self._reads_lock:
            self._reads_running += 1
            beside_at_start = self._reads_running
        started = time.perf_counter()
        try:
            ok, error = self._copy(read, job.target.offset, job.nbytes)
        finally:
            with self._reads_lock:
                beside_at_end = self._reads_running
                self._reads_running -= 1
        # Reads running at once share the disk: each one's wall time over the reads beside it
        # is its share, so the core's estimate is the tier's speed, not one read's.
        sharing = max(1.0, (beside_at_start + beside_at_end) / 2)
        self.post(PrefetchDone(job.job, ok, error, (time.perf_counter() - started) / sharing))

    def _probe(self, job: Probe) -> None:
        found, error = 0, ""
        try:
            found = self.tiers[job.tier].probe(job)
        except Exception as exc:  # noqa: BLE001 - a tier that cannot answer is a miss
            error = f"{type(exc).__name__}: {exc}"
        self.post(ProbeDone(job.job, found, error))

    def _delete(self, job: Delete) -> None:
        try:
            self.tiers[job.tier].delete(job)
        except Exception as exc:  # noqa: BLE001 - a tier's scan at start removes leftovers
            log.warning("Tier %s could not delete %s: %s", job.tier, job.where, exc)

    def _copy(
        self, run: Callable[[memoryview], None] | None, offset: int, nbytes: int
    ) -> tuple[bool, str]:
        """Run one copy against the arena's bytes: (ok, why not)."""
        if run is None:
            return False, "no such tier"
        try:
            view = self.arena_view(offset, nbytes)
            try:
                run(view)
            finally:
                view.release()
        except Exception as exc:  # noqa: BLE001 - reported to the core, which recovers
            return False, f"{type(exc).__name__}: {exc}"
        return True, ""


def count_evictions(metrics) -> Callable[[str, int], None]:
    """``on_evicted`` for ServerMetrics: arena evictions are what it counts today."""

    def on_evicted(tier: str, n: int) -> None:
        if tier == ARENA:
            metrics.count_evictions(n)

    return on_evicted
