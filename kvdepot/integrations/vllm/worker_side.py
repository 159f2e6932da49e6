"""The workers' half of the connector: one per tensor-parallel rank.

- ``register_kv_caches`` reads the paged layout from the tensors' shapes and strides
  (kvdepot.transfer.layout: any order of layers, blocks, heads and tokens, K/V split or side
  by side, MLA, CPU or GPU) and keeps the namespace spec for the scheduler's handshake.
- Every server call runs on one background I/O thread per worker ("kvdepot-io"), so the
  forward pass never waits for the server. Loads go before stores in its queue.
- Loads (``start_load_kv``) on a GPU are enqueued right there, on the engine thread: the
  scheduler's leased lookup already gave every rank's slot offsets, and the copy runs on the
  transfer engine's own streams, ordered after the model's work; ``get_finished`` polls its
  event. No thread hand-off sits between the copy and the report: each one can cost the
  interpreter's 5 ms switch interval while the other thread runs Python, and did (20 ms of an
  8k-token hit). Otherwise (CPU, no offsets, a server boot the arena is not mapped for) the
  I/O thread loads: with the scheduler's offsets, or acquiring this rank's slots itself.
  Offsets are used only in the mapping of the boot they came from; a worker that has not yet
  heard that the server restarted still reads committed bytes there (a dead server's segment
  stays mapped and nothing writes it any more); once it has, it asks the new server.
  Chunks this rank could not get, and any error, become failed blocks, reported through
  ``get_block_ids_with_load_errors`` no later than the step in which the request is reported
  finished, so vLLM recomputes them instead of reading garbage.
- Stores (``wait_for_save``, after the step's forward): reserve slots, copy the chunks' blocks
  into those the server marked RESERVED, commit. The scheduler keeps finished requests' blocks
  until ``get_finished`` reports their stores done; blocks of a preempted request may be reused
  by the next step, so ``handle_preemptions`` drops its queued stores and waits for a running
  one before that step runs.
- Each rank stores and loads only its own shard; the server counts a chunk as a hit only when
  every rank has committed it.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvdepot.client import KVDepotClient, KVDepotError, Namespace, ServerRestarted, ServerUnavailable
from kvdepot.integrations.vllm.config import ConnectorSettings
from kvdepot.integrations.vllm.copier import BlockCopier
from kvdepot.integrations.vllm.metadata import (
    KVDepotMetadata,
    LoadSpec,
    NamespaceSpec,
    StoreSpec,
    split_keys,
)
from kvdepot.integrations.vllm.stats import empty_counters
from kvdepot.protocol import ErrorCode, SlotStatus
from kvdepot.transfer.base import ChunkCopy
from kvdepot.transfer.layout import LayoutError, PagedLayout, describe_layout

log = logging.getLogger("vllm.kvdepot")


def _layer_sort_key(name: str) -> tuple:
    # "model.layers.10.self_attn.attn" after "model.layers.9...": numbers compare as numbers.
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


@dataclass
class _InFlightLoad:
    """A load enqueued on the GPU by the engine thread (see start_load_kv)."""

    req_id: str
    handle: Any  # None: nothing was enqueued (it failed to start)
    chunks: int
    nbytes: int
    writable: list[int]  # the blocks it writes: all fail if the copy does


@dataclass
class _Job:
    kind: str  # "load" | "store"
    spec: LoadSpec | StoreSpec
    chunk_tokens: int
    event: Any = None  # CUDA event the copy must follow (GPU)
    finished: threading.Event | None = None  # set when a synchronous load is done
    # A store whose source blocks may have been reused (its request was preempted and the
    # wait for it gave up): never commit it; abort its reservation instead.
    dropped: bool = False


class WorkerSide:
    def __init__(
        self,
        settings: ConnectorSettings,
        *,
        model: str,
        rank: int,
        world_size: int,
        block_size: int,
        num_blocks: int | None = None,
        is_mla: bool = False,
        engine_id: str = "",
        client_factory: Callable[..., KVDepotClient] = KVDepotClient,
    ):
        self.settings = settings
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.is_mla = is_mla
        self.engine_id = engine_id or f"vllm-{os.getpid()}"
        self._client_factory = client_factory
        self.layout: PagedLayout | None = None
        self.spec: NamespaceSpec | None = None
        self.layout_error = ""
        self._client: KVDepotClient | None = None
        self._ns: Namespace | None = None
        self._copier: BlockCopier | None = None
        self._copier_epoch = -1
        # (server boot id, copier) the engine thread may enqueue loads on; swapped by the I/O
        # thread under _copier_lock when the server restarts.
        self._direct: tuple[str, BlockCopier] | None = None
        self._copier_lock = threading.Lock()
        self._inflight: list[_InFlightLoad] = []  # engine thread only
        self._next_connect = 0.0
        self._down = False

        self._cv = threading.Condition()
        self._loads: collections.deque[_Job] = collections.deque()
        self._stores: collections.deque[_Job] = collections.deque()
        self._running: _Job | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

        # Results handed from the I/O thread to get_finished (under _cv).
        self._done_loads: list[tuple[str, list[int]]] = []
        self._store_pending: dict[str, int] = {}  # req -> stores queued or running
        # Finished requests whose blocks vLLM keeps for their stores (the scheduler said so):
        # reported in finished_sending once their stores are done.
        self._finishing: set[str] = set()
        self._load_errors: set[int] = set()
        self._loading: set[str] = set()
        self.counters = empty_counters()

    # --- registration -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_sort_key)
        ordered = {n: kv_caches[n] for n in names}
        num_blocks = self.num_blocks or _guess_num_blocks(ordered)
        try:
            self.layout = describe_layout(ordered, num_blocks, self.block_size, is_mla=self.is_mla)
        except (LayoutError, ValueError) as exc:
            self.layout_error = str(exc)
            log.warning(
                "kvdepot: cannot read the KV cache layout (%s); the cache is off for this engine", exc
            )
            return
        g = self.layout.geometry
        self.spec = NamespaceSpec(self.model, g, self.world_size, self.settings.salt)
        log.info(
            "kvdepot: rank %d/%d KV layout: %d layers, %s, %d blocks on %s",
            self.rank, self.world_size, g.num_layers, g.describe(), num_blocks, self.layout.device,
        )
        self._thread = threading.Thread(target=self._io_loop, name="kvdepot-io", daemon=True)
        self._thread.start()

    # --- the step hooks (engine thread) -----------------------------------------------------

    def handle_preemptions(self, meta: KVDepotMetadata | None) -> None:
        """Before a step that may hand preempted requests' blocks to others: their queued
        stores are dropped (the scheduler plans them again after the resume), a running one
        may finish within preempt_wait_ms, else it is aborted: never committed."""
        if meta is None or not self._store_pending:
            return
        with self._cv:
            if meta.preempted is None:
                targets = set(self._store_pending)  # unknown: every store
            else:
                targets = set(meta.preempted) & set(self._store_pending)
            if not targets:
                return
            kept: collections.deque[_Job] = collections.deque()
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
                    log.warning(
                        "kvdepot: a store of preempted request %s is still copying after %d ms; "
                        "it will be aborted", self._running.spec.req_id, self.settings.preempt_wait_ms,
                    )
                    return
                self._cv.wait(timeout=left)

    def start_load_kv(self, meta: KVDepotMetadata | None) -> None:
        if meta is None or not meta.loads:
            return
        queued = [spec for spec in meta.loads if not self._load_now(spec, meta.chunk_tokens)]
        if not queued:
            return
        event = self._record_event()
        jobs = []
        with self._cv:
            for spec in queued:
                job = _Job("load", spec, meta.chunk_tokens, event,
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

    def _load_now(self, spec: LoadSpec, chunk_tokens: int) -> bool:
        """Enqueue a GPU load on this (the engine's) thread; False: the I/O thread must do it."""
        direct = self._direct
        offsets = spec.rank_offsets(self.rank)
        if direct is None or offsets is None or spec.boot_id != direct[0]:
            return False
        copier = direct[1]
        if copier.chunk_tokens != chunk_tokens:
            return False
        bpc = copier.bpc
        chunks = [(off, spec.block_ids[i * bpc : (i + 1) * bpc]) for i, off in enumerate(offsets)]
        with self._copier_lock:
            if self._direct is not direct:
                return False  # the server restarted just now: the I/O thread sorts it out
            try:
                # After the model's queued work (the current stream): vLLM may still be reading
                # these blocks for their previous owner. Whole chunks are fenced by the engine
                # itself; the block-by-block copy of a partial chunk needs the event.
                partial = any(b < 0 for b in spec.block_ids)
                handle = copier.load(chunks, after=self._record_event() if partial else None)
                if spec.sync:
                    # The model's stream waits for the copy on the GPU; the host goes on
                    # launching the forward while the bytes move.
                    handle.stream_wait()
            except Exception as exc:  # noqa: BLE001 - a bad plan must not stop the engine
                log.warning("kvdepot: load for %s could not start: %r", spec.req_id, exc)
                handle = None
        n = len(chunks)
        load = _InFlightLoad(spec.req_id, handle, n, n * copier.slot_bytes, _writable(spec))
        if spec.sync:
            failed = [] if handle is not None else load.writable
            with self._cv:
                self._count_load(load.chunks, load.nbytes, failed)
                # Reported with this very step (get_block_ids_with_load_errors): recomputed.
                self._load_errors.update(failed)
        else:
            self._inflight.append(load)
        return True

    def _count_load(self, chunks: int, nbytes: int, failed: list[int]) -> None:
        """(under _cv) One load's counters."""
        if failed:
            self.counters["load_failed_blocks"] += len(failed)
        else:
            self.counters["loaded_chunks"] += chunks
            self.counters["loaded_bytes"] += nbytes

    def wait_for_save(self, meta: KVDepotMetadata | None) -> None:
        if meta is None or not meta.stores:
            return
        event = self._record_event()
        with self._cv:
            for spec in meta.stores:
                self._store_pending[spec.req_id] = self._store_pending.get(spec.req_id, 0) + 1
                self._stores.append(_Job("store", spec, meta.chunk_tokens, event))
            self._cv.notify_all()

    def get_finished(
        self, finished_req_ids: set[str], meta: KVDepotMetadata | None = None
    ) -> tuple[set[str] | None, set[str] | None]:
        with self._cv:
            # In a step that computes nothing (the requests wait for their loads), wait a few
            # milliseconds for loads in flight instead of returning at once: the engine would
            # otherwise spin empty steps holding the GIL, and each time the I/O thread gives
            # the GIL up it waits up to the 5 ms switch interval to get it back (a 32 MiB load
            # took 1.3 s that way, 10 ms this way). A step with work never waits.
            idle = meta is None or meta.idle_step
            if idle and self.settings.load_wait_ms > 0 and (self._inflight or self._loading):
                deadline = time.monotonic() + self.settings.load_wait_ms / 1000.0
                while self._loads_pending():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    # GPU loads are polled (their events); the I/O thread's notify wakes us.
                    self._cv.wait(timeout=min(left, 2e-4) if self._inflight else left)
            self._reap_inflight()
            recving = set()
            for req_id, failed in self._done_loads:
                recving.add(req_id)
                self._loading.discard(req_id)
                self._load_errors.update(failed)
            self._done_loads.clear()
            if meta is not None:
                self._finishing.update(meta.held_for_stores)
            sending = {r for r in self._finishing if not self._store_pending.get(r, 0)}
            self._finishing -= sending
        return (sending or None), (recving or None)

    def _loads_pending(self) -> bool:
        self._reap_inflight()
        if self._inflight:
            return True
        done = {req_id for req_id, _ in self._done_loads}
        return any(req_id not in done for req_id in self._loading)

    def _reap_inflight(self) -> None:
        """Move finished GPU loads to _done_loads (engine thread, under _cv)."""
        if not self._inflight:
            return
        still = []
        for load in self._inflight:
            ok = load.handle is not None
            if ok:
                try:
                    if not load.handle.done():
                        still.append(load)
                        continue
                except Exception as exc:  # noqa: BLE001 - a failed copy is a failed load
                    log.warning("kvdepot: load for %s failed: %r", load.req_id, exc)
                    ok = False
            failed = [] if ok else load.writable
            self._count_load(load.chunks, load.nbytes, failed)
            self._done_loads.append((load.req_id, failed))
        self._inflight = still

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._cv:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def add_counter(self, name: str, value: int) -> None:
        with self._cv:
            self.counters[name] += value

    def take_counters(self) -> dict[str, int]:
        with self._cv:
            out, self.counters = self.counters, empty_counters()
        return out

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
                log.warning("kvdepot: rank %d: stores still in flight at shutdown are dropped", self.rank)
            self._stores.clear()
            if self._running is not None:
                self._running.dropped = True
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            # A running call ends within the client's deadline.
            self._thread.join(timeout=2 * self.settings.timeout_ms / 1000.0 + 1.0)
        if self._copier is not None:
            self._copier.close()
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - shutting down
                pass

    def _record_event(self):
        if self.layout is None or self.layout.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.layout.device))
        return event

    # --- the I/O thread ---------------------------------------------------------------------

    def _io_loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._loads and not self._stores:
                    if self._ns is None and time.monotonic() >= self._next_connect:
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
                    self._ensure_connected()
                elif job.kind == "load":
                    self._do_load(job)
                else:
                    self._do_store(job)
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything
                log.warning("kvdepot: unexpected error in the I/O thread: %r", exc)
                # (a store's own finally has already counted it done)
                if job is not None and job.kind == "load":
                    self._load_done(job, _writable(job.spec))
            finally:
                with self._cv:
                    self._running = None
                    self._cv.notify_all()

    def _ensure_connected(self) -> bool:
        """Connect and register, at most once per retry period; False while the server is away."""
        if self._ns is not None:
            return True
        now = time.monotonic()
        if now < self._next_connect or self.spec is None:
            return False
        self._next_connect = now + self.settings.retry_s
        if self._client is None:
            self._client = self._client_factory(
                host=self.settings.host,
                port=self.settings.port,
                engine_id=f"{self.engine_id}-rank{self.rank}",
                timeout_ms=self.settings.timeout_ms,
            )
        try:
            spec = self.spec
            for attempt in range(2):
                if not self._client.connect():
                    break
                try:
                    self._ns = self._client.register(spec.model, spec.geometry, spec.world_size, spec.salt)
                    break
                except KVDepotError as exc:
                    # A session dropped right after the handshake: once more.
                    if attempt or exc.code != int(ErrorCode.NO_SESSION):
                        raise
            if self._ns is not None:
                self._server_back()
                self._prepare_copier()
                log.info(
                    "kvdepot: rank %d registered at %s (namespace %s, %d B per chunk)",
                    self.rank, self.settings.endpoint, self._ns.digest.hex()[:12], self._ns.slot_bytes,
                )
                return True
        except KVDepotError as exc:
            if exc.code in (int(ErrorCode.GEOMETRY_MISMATCH), int(ErrorCode.BAD_REQUEST)):
                log.error("kvdepot: rank %d: the server refused the KV layout (%s)", self.rank, exc)
                self._next_connect = float("inf")  # retrying cannot help
                return False
            log.debug("kvdepot: rank %d could not register: %s", self.rank, exc)
        self._server_away("not reachable")
        return False

    def _server_away(self, why: str) -> None:
        # INFO, not WARNING: the scheduler logs the one warning per outage for the engine.
        if not self._down:
            self._down = True
            log.info(
                "kvdepot: rank %d: server at %s %s; loads and stores are skipped (vLLM recomputes) "
                "until it is back", self.rank, self.settings.endpoint, why,
            )

    def _server_back(self) -> None:
        if self._down:
            self._down = False
            log.info("kvdepot: rank %d: server at %s is back", self.rank, self.settings.endpoint)

    def _prepare_copier(self) -> None:
        """Map and start pinning the arena now, at registration, not at the first load."""
        assert self._client is not None
        try:
            self._copier_for(self._client.epoch)
        except Exception as exc:  # noqa: BLE001 - the first transfer tries again
            log.warning("kvdepot: rank %d could not prepare the transfer engine: %r", self.rank, exc)

    def _copier_for(self, epoch: int) -> BlockCopier:
        """The copier over the arena of server boot ``epoch`` (raises if that boot is gone)."""
        assert self._client is not None and self.layout is not None and self._ns is not None
        if self._copier is None or self._copier_epoch != epoch:
            arena = self._client.arena(epoch).tensor()
            boot = self._client.boot_id or ""
            copier = BlockCopier(self.layout, arena, self._ns.chunk_tokens)
            with self._copier_lock:  # no engine-thread load is being enqueued on the old one
                old, self._copier, self._copier_epoch = self._copier, copier, epoch
                self._direct = (boot, copier) if self.layout.device.type == "cuda" else None
            if old is not None:
                old.close()  # waits for its copies in flight before unpinning
        return self._copier

    def _usable(self, job: _Job) -> bool:
        if not self._ensure_connected():
            return False
        assert self._ns is not None
        if job.chunk_tokens != self._ns.chunk_tokens:
            log.warning(
                "kvdepot: scheduler chunk size %d differs from the server's %d; skipped",
                job.chunk_tokens, self._ns.chunk_tokens,
            )
            return False
        return True

    def _do_load(self, job: _Job) -> None:
        spec: LoadSpec = job.spec  # type: ignore[assignment]
        writable = _writable(spec)
        if not spec.keys or not self._usable(job):
            self._load_done(job, writable)
            return
        client, ns = self._client, self._ns
        assert client is not None and ns is not None and self.layout is not None
        keys = split_keys(spec.keys)
        bpc = ns.chunk_tokens // self.block_size
        lease = 0
        loaded = 0
        try:
            _t0 = time.perf_counter()
            offsets = spec.rank_offsets(self.rank)
            if offsets is not None and spec.boot_id and spec.boot_id == client.boot_id:
                epoch = client.epoch  # the scheduler's lease holds the slots
            else:
                acq = _once_more_on_new_session(
                    lambda: client.acquire(ns, self.rank, keys, lease_ms=self.settings.lease_ms)
                )
                lease, offsets, epoch = acq.lease, acq.offsets, acq.epoch
            _t1 = time.perf_counter()
            copier = self._copier_for(epoch)
            if job.event is not None:
                job.event.synchronize()
            chunks = [
                (off, spec.block_ids[i * bpc : (i + 1) * bpc]) for i, off in enumerate(offsets)
            ]
            if chunks:
                copier.load(chunks).wait()
            loaded = len(chunks)
            log.debug(
                "kvdepot: load %s: %d/%d chunks, slots %s in %.1f ms, copy %.1f ms", spec.req_id,
                loaded, len(keys), "acquired" if lease else "from the scheduler", (_t1 - _t0) * 1e3,
                (time.perf_counter() - _t1) * 1e3,
            )
        except ServerRestarted:
            lease = 0  # void with the old boot
            loaded = 0
        except KVDepotError as exc:
            loaded = 0
            if isinstance(exc, ServerUnavailable):
                self._server_away(f"is not answering ({exc.message})")
            else:
                log.warning("kvdepot: load for %s failed: %s", spec.req_id, exc)
        except BaseException:
            self._release_quietly(lease)
            raise
        failed = [b for b in spec.block_ids[loaded * bpc :] if b >= 0]
        with self._cv:
            self.counters["loaded_chunks"] += loaded
            self.counters["loaded_bytes"] += loaded * ns.slot_bytes
        # Report first, release after: the bytes have landed, and the engine thread waiting in
        # get_finished should not also wait for a round trip (each GIL hand-off back to this
        # thread can cost up to the 5 ms switch interval while the engine thread runs).
        self._load_done(job, failed)
        self._release_quietly(lease)

    def _release_quietly(self, lease: int) -> None:
        if lease and self._client is not None:
            try:
                self._client.release([lease])
            except KVDepotError:
                pass  # it expires by its TTL

    def _do_store(self, job: _Job) -> None:
        spec: StoreSpec = job.spec  # type: ignore[assignment]
        try:
            if not self._usable(job):
                return
            client, ns = self._client, self._ns
            assert client is not None and ns is not None
            keys = split_keys(spec.keys)
            bpc = ns.chunk_tokens // self.block_size
            reservation = 0
            try:
                res = _once_more_on_new_session(
                    lambda: client.reserve(ns, self.rank, keys, parent=spec.parent)
                )
                reservation = res.id
                todo = [
                    ChunkCopy(res.offsets[i], spec.block_ids[i * bpc : (i + 1) * bpc])
                    for i, s in enumerate(res.status)
                    if s == SlotStatus.RESERVED
                ]
                if todo:
                    copier = self._copier_for(res.epoch)
                    if job.event is not None:
                        job.event.synchronize()
                    copier.store(todo).wait()
                with self._cv:
                    dropped = job.dropped
                if dropped:  # the blocks may hold another request's KV by now
                    reservation, abandoned = 0, reservation
                    if abandoned:
                        client.abort(abandoned)
                    return
                if reservation:
                    client.commit(reservation)
                    reservation = 0
                with self._cv:
                    self.counters["stored_chunks"] += len(todo)
                    self.counters["stored_bytes"] += len(todo) * ns.slot_bytes
                    self.counters["store_skipped_chunks"] += len(keys) - len(todo)
            except KVDepotError as exc:
                with self._cv:
                    self.counters["store_errors"] += 1
                if isinstance(exc, ServerUnavailable):
                    self._server_away(f"is not answering ({exc.message})")
                elif not isinstance(exc, ServerRestarted):
                    log.debug("kvdepot: store for %s failed: %s", spec.req_id, exc)
                if reservation and not isinstance(exc, ServerRestarted):
                    try:
                        client.abort(reservation)
                    except KVDepotError:
                        pass  # the reservation expires by its TTL
        finally:
            self._store_done(spec.req_id)

    def _load_done(self, job: _Job, failed: list[int]) -> None:
        with self._cv:
            if job.finished is not None:  # synchronous: reported with its own step
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


def _session_dropped(exc: KVDepotError) -> bool:
    """The server had dropped our session and the client has just opened a new one: not an
    outage, and nothing held before is lost but leases/reservations of the old session."""
    return isinstance(exc, ServerUnavailable) and exc.code == int(ErrorCode.NO_SESSION)


def _once_more_on_new_session(call):
    try:
        return call()
    except ServerUnavailable as exc:
        if not _session_dropped(exc):
            raise
        return call()


def _writable(spec: LoadSpec) -> list[int]:
    return [b for b in spec.block_ids if b >= 0]


def _guess_num_blocks(kv_caches: dict[str, torch.Tensor]) -> int:
    """Without vLLM's number: the largest dimension shared by every layer is the block count."""
    shapes = [set(t.shape) for t in kv_caches.values()]
    common = set.intersection(*shapes) if shapes else set()
    if not common:
        raise LayoutError("cannot tell the number of blocks from the KV tensors")
    return max(common)
