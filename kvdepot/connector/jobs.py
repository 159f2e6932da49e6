"""What a worker's I/O thread does for one load or one store, against the server.

- A load copies the chunks' slots into the engine's blocks: at the scheduler's offsets when
  they are of the server boot the client is in (the scheduler's lease holds the slots), else
  acquiring this rank's slots itself (a lease of its own, released once the load is
  reported). Offsets are used only in the mapping of the boot they came from; a worker that
  has not yet heard that the server restarted still reads committed bytes there (a dead
  server's segment stays mapped and nothing writes it any more); once it has, it asks the new
  server. Chunks this rank could not get, and any error, become failed blocks.
- A store reserves slots, copies the chunks' blocks into those the server marked RESERVED,
  and commits. A store marked ``dropped`` meanwhile (its request was preempted and the wait
  for it gave up, or the engine shuts down) may have copied another request's bytes: its
  reservation is aborted, never committed. So is the reservation of a store that failed,
  unless the server restarted (then it is void anyway).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvdepot.client import KVDepotError, ServerRestarted, ServerUnavailable
from kvdepot.connector.boot_copier import BootCopier
from kvdepot.connector.link import ServerLink, once_more_on_new_session
from kvdepot.connector.logs import CONNECTOR_LOG
from kvdepot.connector.specs import LoadSpec, StoreSpec
from kvdepot.protocol import SlotStatus, split_keys
from kvdepot.transfer.base import ChunkCopy


@dataclass
class Job:
    kind: str  # "load" | "store"
    spec: LoadSpec | StoreSpec
    chunk_tokens: int
    event: Any = None  # CUDA event the copy must follow (GPU)
    finished: threading.Event | None = None  # set when a synchronous load is done
    # A store whose source blocks may have been reused: never commit it; abort its
    # reservation instead. Set and read under the worker's lock.
    dropped: bool = False


class ServerJobs:
    """The I/O thread's side of one rank. ``lock`` and ``counters``: the worker's, counted
    into in place under the lock."""

    def __init__(self, link: ServerLink, copiers: BootCopier, *, rank: int, block_size: int,
                 lock: threading.Condition, counters: dict[str, int],
                 log: logging.Logger = CONNECTOR_LOG):
        self._link = link
        self._copiers = copiers
        self._rank = rank
        self._block_size = block_size
        self._lock = lock
        self._counters = counters
        self._log = log

    def _usable(self, job: Job) -> bool:
        if not self._link.ensure():
            return False
        ns = self._link.ns
        assert ns is not None
        if job.chunk_tokens != ns.chunk_tokens:
            self._log.warning(
                "kvdepot: scheduler chunk size %d differs from the server's %d; skipped",
                job.chunk_tokens, ns.chunk_tokens,
            )
            return False
        return True

    def load(self, job: Job) -> tuple[list[int], int]:
        """Copy a load's chunks into its blocks. Returns the blocks that failed, and a lease
        of this rank's own to release (``release_quietly``) once the load is reported."""
        spec: LoadSpec = job.spec  # type: ignore[assignment]
        writable = spec.writable_blocks()
        if not spec.keys or not self._usable(job):
            return writable, 0
        client, ns = self._link.client, self._link.ns
        assert client is not None and ns is not None
        keys = split_keys(spec.keys)
        bpc = ns.chunk_tokens // self._block_size
        lease = 0
        loaded = 0
        try:
            _t0 = time.perf_counter()
            offsets = spec.rank_offsets(self._rank)
            if offsets is not None and spec.boot_id and spec.boot_id == client.boot_id:
                epoch = client.epoch  # the scheduler's lease holds the slots
            else:
                acq = once_more_on_new_session(
                    lambda: client.acquire(ns, self._rank, keys, lease_ms=self._link.settings.lease_ms)
                )
                lease, offsets, epoch = acq.lease, acq.offsets, acq.epoch
            _t1 = time.perf_counter()
            copier = self._copiers.for_epoch(client, ns, epoch)
            if job.event is not None:
                job.event.synchronize()
            chunks = [
                (off, spec.block_ids[i * bpc : (i + 1) * bpc]) for i, off in enumerate(offsets)
            ]
            if chunks:
                copier.load(chunks).wait()
            loaded = len(chunks)
            self._log.debug(
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
                self._link.away(f"is not answering ({exc.message})")
            else:
                self._log.warning("kvdepot: load for %s failed: %s", spec.req_id, exc)
        except BaseException:
            self.release_quietly(lease)
            raise
        with self._lock:
            self._counters["loaded_chunks"] += loaded
            self._counters["loaded_bytes"] += loaded * ns.slot_bytes
        return [b for b in spec.block_ids[loaded * bpc :] if b >= 0], lease

    def release_quietly(self, lease: int) -> None:
        client = self._link.client
        if lease and client is not None:
            try:
                client.release([lease])
            except KVDepotError:
                pass  # it expires by its TTL

    def store(self, job: Job) -> None:
        """Reserve, copy, commit (or abort: see the module's doc)."""
        spec: StoreSpec = job.spec  # type: ignore[assignment]
        if not self._usable(job):
            return
        client, ns = self._link.client, self._link.ns
        assert client is not None and ns is not None
        keys = split_keys(spec.keys)
        bpc = ns.chunk_tokens // self._block_size
        reservation = 0
        try:
            res = once_more_on_new_session(
                lambda: client.reserve(ns, self._rank, keys, parent=spec.parent)
            )
            reservation = res.id
            todo = [
                ChunkCopy(res.offsets[i], spec.block_ids[i * bpc : (i + 1) * bpc])
                for i, s in enumerate(res.status)
                if s == SlotStatus.RESERVED
            ]
            if todo:
                copier = self._copiers.for_epoch(client, ns, res.epoch)
                if job.event is not None:
                    job.event.synchronize()
                copier.store(todo).wait()
            with self._lock:
                dropped = job.dropped
            if dropped:  # the blocks may hold another request's KV by now
                reservation, abandoned = 0, reservation
                if abandoned:
                    client.abort(abandoned)
                return
            if reservation:
                client.commit(reservation)
                reservation = 0
            with self._lock:
                self._counters["stored_chunks"] += len(todo)
                self._counters["stored_bytes"] += len(todo) * ns.slot_bytes
                self._counters["store_skipped_chunks"] += len(keys) - len(todo)
        except KVDepotError as exc:
            with self._lock:
                self._counters["store_errors"] += 1
            if isinstance(exc, ServerUnavailable):
                self._link.away(f"is not answering ({exc.message})")
            elif not isinstance(exc, ServerRestarted):
                self._log.debug("kvdepot: store for %s failed: %s", spec.req_id, exc)
            if reservation and not isinstance(exc, ServerRestarted):
                try:
                    client.abort(reservation)
                except KVDepotError:
                    pass  # the reservation expires by its TTL
