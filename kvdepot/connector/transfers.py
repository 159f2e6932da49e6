"""One tensor-parallel rank's loads and stores: the worker half of the connector, engine-neutral.

- Every server call runs on one background I/O thread per worker ("kvdepot-io"), so the
  forward pass never waits for the server. Loads go before stores in its queue. What it does
  for one load or store: kvdepot.connector.jobs.
- Loads (``start_loads``) on a GPU are enqueued right on the engine thread when the
  scheduler's lookup gave their offsets (kvdepot.connector.engine_loads); the others go to
  the I/O thread. Chunks this rank could not get, and any error, become failed blocks, handed
  out (``take_load_errors``) no later than the round in which the load is reported finished
  (``take_finished_loads``), so the engine recomputes them instead of reading garbage. A
  synchronous load has landed (or is stream-ordered before the forward) when ``start_loads``
  returns, and is never reported finished; its failed blocks come with the same step.
- Stores (``queue_stores``, after the step's forward) are copied out of the engine's blocks:
  a finished request's blocks must be kept until ``storing`` no longer names it; blocks of a
  preempted request may be reused by the next step, so ``handle_preemptions`` drops its
  queued stores and waits for a running one before that step runs.
- Each rank stores and loads only its own shard; the server counts a chunk as a hit only when
  every rank has committed it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable
from typing import Callable

from kvdepot.client import KVDepotClient
from kvdepot.connector.boot_copier import BootCopier
from kvdepot.connector.copier import stream_event
from kvdepot.connector.counters import empty_counters, take_counters
from kvdepot.connector.engine_loads import EngineThreadLoads
from kvdepot.connector.jobs import Job, ServerJobs
from kvdepot.connector.link import ServerLink
from kvdepot.connector.logs import CONNECTOR_LOG
from kvdepot.connector.settings import ConnectorSettings
from kvdepot.connector.specs import LoadSpec, NamespaceSpec, StoreSpec
from kvdepot.transfer.layout import PagedLayout


class TransferWorker:
    """Nothing moves before ``start``. ``link``: its connection to the server; ``copiers``:
    its copier over the server boot's arena."""

    def __init__(
        self,
        settings: ConnectorSettings,
        *,
        rank: int,
        block_size: int,
        engine_id: str,
        client_factory: Callable[..., KVDepotClient] = KVDepotClient,
        log: logging.Logger = CONNECTOR_LOG,
    ):
        self.settings = settings
        self.rank = rank
        self._log = log
        self.link = ServerLink(
            settings,
            engine_id=engine_id,
            who=f"rank {rank}: ",
            # The scheduler logs the one warning per outage for the engine.
            outage_level=logging.INFO,
            outage_effect="loads and stores are skipped (the engine recomputes)",
            on_registered=self._prepare_copier,
            client_factory=client_factory,
            log=log,
        )
        self.copiers = BootCopier(log=log)
        self._engine_loads = EngineThreadLoads(self.copiers, rank, log=log)

        self._cv = threading.Condition()
        self.counters = empty_counters()  # under _cv
        self._jobs = ServerJobs(self.link, self.copiers, rank=rank, block_size=block_size,
                                lock=self._cv, counters=self.counters, log=log)
        self._loads: collections.deque[Job] = collections.deque()
        self._stores: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

        # Results handed from the I/O thread to the engine thread (under _cv).
        self._done_loads: list[tuple[str, list[int]]] = []
        self._store_pending: dict[str, int] = {}  # req -> stores queued or running
        self._load_errors: set[int] = set()
        self._loading: set[str] = set()  # asynchronous loads the I/O thread has, unreported

    def start(self, layout: PagedLayout, spec: NamespaceSpec) -> None:
        """The engine's KV cache is known: register ``spec``'s namespace and start moving."""
        self.copiers.layout = layout
        self.link.spec = spec
        self._thread = threading.Thread(target=self._io_loop, name="kvdepot-io", daemon=True)
        self._thread.start()

    # --- the engine thread ------------------------------------------------------------------

    def handle_preemptions(self, preempted: set[str] | None) -> None:
        """Before a step that may hand preempted requests' blocks to others (``preempted``;
        None: unknown, so every request): their queued stores are dropped (the scheduler plans
        them again after the resume), a running one may finish within preempt_wait_ms, else it
        is aborted: never committed."""
        if not self._store_pending:
            return
        with self._cv:
            if preempted is None:
                targets = set(self._store_pending)
            else:
                targets = set(preempted) & set(self._store_pending)
            if not targets:
                return
            kept: collections.deque[Job] = collections.deque()
            for job in self._stores:
                if job.spec.req_id in targets:
                    self._count_store_done(job.spec.req_id)
                else:
                    kept.append(job)
            self._stores = kept
            deadline = time.monotonic() + self.settings.preempt_wait_ms / 1000.0
            while self._running is not None and self._running.kind == "store" and (
                self._running.spec.req_id in targets
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    self._running.dropped = True
                    self.counters["store_errors"] += 1
                    self._log.warning(
                        "kvdepot: a store of preempted request %s is still copying after %d ms; "
                        "it will be aborted", self._running.spec.req_id, self.settings.preempt_wait_ms,
                    )
                    return
                self._cv.wait(timeout=left)

    def start_loads(self, loads: list[LoadSpec], chunk_tokens: int) -> None:
        """This step's loads; returns once the synchronous ones have landed (or are ordered
        before the forward on the GPU)."""
        queued = []
        for spec in loads:
            load = self._engine_loads.start(spec, chunk_tokens)
            if load is None:
                queued.append(spec)
            elif spec.sync:
                failed = [] if load.handle is not None else load.writable
                with self._cv:
                    self._count_load(load.chunks, load.nbytes, failed)
                    # Handed out with this very step (take_load_errors): recomputed.
                    self._load_errors.update(failed)
        if not queued:
            return
        event = self._stream_event()
        jobs = []
        with self._cv:
            for spec in queued:
                job = Job("load", spec, chunk_tokens, event,
                          finished=threading.Event() if spec.sync else None)
                if not spec.sync:
                    self._loading.add(spec.req_id)
                self._loads.append(job)
                jobs.append(job)
            self._cv.notify_all()
        # This step's forward reads the synchronous loads' blocks: they must have landed.
        # (The I/O thread finishes every job: each server call has a deadline.)
        for job in jobs:
            if job.finished is not None:
                job.finished.wait()

    def _count_load(self, chunks: int, nbytes: int, failed: list[int]) -> None:
        """(under _cv) One load's counters."""
        if failed:
            self.counters["load_failed_blocks"] += len(failed)
        else:
            self.counters["loaded_chunks"] += chunks
            self.counters["loaded_bytes"] += nbytes

    def queue_stores(self, stores: list[StoreSpec], chunk_tokens: int) -> None:
        """Stores out of blocks the step's forward has written (copied after it)."""
        if not stores:
            return
        event = self._stream_event()
        with self._cv:
            for spec in stores:
                self._store_pending[spec.req_id] = self._store_pending.get(spec.req_id, 0) + 1
                self._stores.append(Job("store", spec, chunk_tokens, event))
            self._cv.notify_all()

    def take_finished_loads(self, wait: bool) -> set[str]:
        """Requests whose asynchronous loads are over since the last call; their failed blocks
        go to ``take_load_errors``. ``wait``: the step computes nothing (its requests wait for
        their loads): wait up to load_wait_ms for loads in flight instead of returning at once.
        The engine would otherwise spin empty steps holding the GIL, and each time the I/O
        thread gives the GIL up it waits up to the 5 ms switch interval to get it back (a
        32 MiB load took 1.3 s that way, 10 ms this way). A step with work never waits."""
        with self._cv:
            if wait and self.settings.load_wait_ms > 0 and (self._engine_loads.pending or self._loading):
                deadline = time.monotonic() + self.settings.load_wait_ms / 1000.0
                while self._loads_pending():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    # GPU loads are polled (their events); the I/O thread's notify wakes us.
                    self._cv.wait(timeout=min(left, 2e-4) if self._engine_loads.pending else left)
            self._reap_engine_loads()
            finished = set()
            for req_id, failed in self._done_loads:
                finished.add(req_id)
                self._loading.discard(req_id)
                self._load_errors.update(failed)
            self._done_loads.clear()
        return finished

    def _loads_pending(self) -> bool:
        self._reap_engine_loads()
        if self._engine_loads.pending:
            return True
        done = {req_id for req_id, _ in self._done_loads}
        return any(req_id not in done for req_id in self._loading)

    def _reap_engine_loads(self) -> None:
        """(under _cv) Finished engine-thread loads become done loads."""
        for load, failed in self._engine_loads.reap():
            self._count_load(load.chunks, load.nbytes, failed)
            self._done_loads.append((load.req_id, failed))

    def storing(self, req_ids: Iterable[str] | None = None) -> set[str]:
        """Of ``req_ids`` (default: all), the requests with stores queued or running: their
        blocks are still read."""
        with self._cv:
            if req_ids is None:
                return set(self._store_pending)
            return {r for r in req_ids if self._store_pending.get(r, 0)}

    def take_load_errors(self) -> set[int]:
        """Blocks whose loads failed since the last call: the engine must recompute them."""
        with self._cv:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def add_counter(self, name: str, value: int) -> None:
        with self._cv:
            self.counters[name] += value

    def take_counters(self) -> dict[str, int]:
        with self._cv:
            return take_counters(self.counters)

    def shutdown(self) -> None:
        """A graceful end: stores in flight get up to settings.shutdown_wait_ms to commit;
        then queued ones are dropped and a running one aborts its reservation (nothing is
        left half-written on the server); the client says goodbye, ending the session."""
        with self._cv:
            deadline = time.monotonic() + self.settings.shutdown_wait_ms / 1000.0
            while (self._stores or self._loads or self._running) and time.monotonic() < deadline:
                self._cv.wait(timeout=0.05)
            for job in self._stores:
                self._count_store_done(job.spec.req_id)
                self.counters["store_errors"] += 1
            if self._stores or (self._running is not None and self._running.kind == "store"):
                self._log.warning("kvdepot: rank %d: stores still in flight at shutdown are dropped", self.rank)
            self._stores.clear()
            if self._running is not None:
                self._running.dropped = True
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            # A running call ends within the client's deadline.
            self._thread.join(timeout=2 * self.settings.timeout_ms / 1000.0 + 1.0)
        self.copiers.close()
        self.link.close()

    def _stream_event(self):
        layout = self.copiers.layout
        return stream_event(layout.device) if layout is not None else None

    # --- the I/O thread ---------------------------------------------------------------------

    def _io_loop(self) -> None:
        layout = self.copiers.layout
        if layout is not None and layout.device.type == "cuda":
            from kvdepot.transfer.pinning import relax_stream_capture  # CUDA engines only

            try:
                # This thread registers, pins and compiles while vLLM may capture its graphs.
                relax_stream_capture()
            except Exception as exc:  # noqa: BLE001 - transfers work; capture is at risk
                self._log.warning("kvdepot: rank %d could not relax CUDA graph capture for its "
                                  "I/O thread: %r", self.rank, exc)
        while True:
            with self._cv:
                while not self._closed and not self._loads and not self._stores:
                    if self.link.attempt_due():
                        break  # idle: try to (re)connect
                    self._cv.wait(timeout=0.2)
                if self._closed:
                    return
                job = self._loads.popleft() if self._loads else (
                    self._stores.popleft() if self._stores else None
                )
                self._running = job
            try:
                if job is None:
                    self.link.ensure()
                elif job.kind == "load":
                    failed, lease = self._jobs.load(job)
                    # Report first, release after: the bytes have landed, and the engine thread
                    # waiting in take_finished_loads should not also wait for a round trip (each
                    # GIL hand-off back to this thread can cost up to the 5 ms switch interval
                    # while the engine thread runs).
                    self._load_done(job, failed)
                    self._jobs.release_quietly(lease)
                else:
                    try:
                        self._jobs.store(job)
                    finally:
                        self._store_done(job.spec.req_id)
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything
                self._log.warning("kvdepot: unexpected error in the I/O thread: %r", exc)
                # (a store's own finally has already counted it done)
                if job is not None and job.kind == "load":
                    self._load_done(job, job.spec.writable_blocks())
            finally:
                with self._cv:
                    self._running = None
                    self._cv.notify_all()

    def _prepare_copier(self) -> None:
        """Map and start pinning the arena now, at registration, not at the first load."""
        client, ns = self.link.client, self.link.ns
        assert client is not None and ns is not None
        try:
            self.copiers.for_epoch(client, ns, client.epoch)
        except Exception as exc:  # noqa: BLE001 - the first transfer tries again
            self._log.warning("kvdepot: rank %d could not prepare the transfer engine: %r", self.rank, exc)

    def _load_done(self, job: Job, failed: list[int]) -> None:
        with self._cv:
            if job.finished is not None:  # synchronous: handed out with its own step
                if failed:
                    self.counters["load_failed_blocks"] += len(failed)
                    self._load_errors.update(failed)
            else:
                self._done_loads.append((job.spec.req_id, failed))
                if failed:
                    self.counters["load_failed_blocks"] += len(failed)
            self._cv.notify_all()
        if job.finished is not None:
            job.finished.set()

    def _store_done(self, req_id: str) -> None:
        with self._cv:
            self._count_store_done(req_id)
            self._cv.notify_all()

    def _count_store_done(self, req_id: str) -> None:
        """(under _cv) One store of req_id is over: done, failed, dropped or aborted."""
        n = self._store_pending.get(req_id, 0)
        if n > 1:
            self._store_pending[req_id] = n - 1
        else:
            self._store_pending.pop(req_id, None)
