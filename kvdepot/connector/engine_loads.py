"""Loads a worker enqueues on the engine's own thread (GPU).

When the scheduler's leased lookup already gave every rank's slot offsets, in the server boot
the worker's arena is mapped for, a GPU load is enqueued right on the engine thread: the copy
runs on the transfer engine's own streams, ordered after the model's work, and the worker
polls its event. No thread hand-off sits between the copy and the report: each one can cost
the interpreter's 5 ms switch interval while the other thread runs Python, and did (20 ms of
an 8k-token hit). Anything else (CPU, no offsets, another boot) is the I/O thread's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kvdepot.connector.boot_copier import BootCopier
from kvdepot.connector.copier import stream_event
from kvdepot.connector.logs import CONNECTOR_LOG
from kvdepot.connector.specs import LoadSpec


@dataclass
class InFlightLoad:
    """A load enqueued on the GPU by the engine thread."""

    req_id: str
    handle: Any  # None: nothing was enqueued (it failed to start)
    chunks: int
    nbytes: int
    writable: list[int]  # the blocks it writes: all fail if the copy does


class EngineThreadLoads:
    """Engine thread only."""

    def __init__(self, copiers: BootCopier, rank: int, *, log: logging.Logger = CONNECTOR_LOG):
        self._copiers = copiers
        self._rank = rank
        self._log = log
        self._inflight: list[InFlightLoad] = []  # asynchronous ones, until reaped

    def start(self, spec: LoadSpec, chunk_tokens: int) -> InFlightLoad | None:
        """Enqueue ``spec``'s copy now; None: the I/O thread must do it. A synchronous load
        orders the current stream (the model's next forward) after its copy and is returned
        for its caller to account; an asynchronous one is kept until ``reap`` finds it done."""
        direct = self._copiers.direct
        offsets = spec.rank_offsets(self._rank)
        if direct is None or offsets is None or spec.boot_id != direct[0]:
            return None
        copier = direct[1]
        if copier.chunk_tokens != chunk_tokens:
            return None
        bpc = copier.bpc
        chunks = [(off, spec.block_ids[i * bpc : (i + 1) * bpc]) for i, off in enumerate(offsets)]
        with self._copiers.lock:
            if self._copiers.direct is not direct:
                return None  # the server restarted just now: the I/O thread sorts it out
            try:
                # After the model's queued work (the current stream): the engine may still be
                # reading these blocks for their previous owner. Whole chunks are fenced by the
                # transfer engine itself; the block-by-block copy of a partial chunk needs the
                # event.
                partial = any(b < 0 for b in spec.block_ids)
                handle = copier.load(chunks, after=stream_event(copier.device) if partial else None)
                if spec.sync:
                    # The model's stream waits for the copy on the GPU; the host goes on
                    # launching the forward while the bytes move.
                    handle.stream_wait()
            except Exception as exc:  # noqa: BLE001 - a bad plan must not stop the engine
                self._log.warning("kvdepot: load for %s could not start: %r", spec.req_id, exc)
                handle = None
        n = len(chunks)
        load = InFlightLoad(spec.req_id, handle, n, n * copier.slot_bytes, spec.writable_blocks())
        if not spec.sync:
            self._inflight.append(load)
        return load

    @property
    def pending(self) -> bool:
        """Asynchronous loads not yet reaped."""
        return bool(self._inflight)

    def reap(self) -> list[tuple[InFlightLoad, list[int]]]:
        """The asynchronous loads that are over, each with its failed blocks."""
        if not self._inflight:
            return []
        done, still = [], []
        for load in self._inflight:
            ok = load.handle is not None
            if ok:
                try:
                    if not load.handle.done():
                        still.append(load)
                        continue
                except Exception as exc:  # noqa: BLE001 - a failed copy is a failed load
                    self._log.warning("kvdepot: load for %s failed: %r", load.req_id, exc)
                    ok = False
            done.append((load, [] if ok else load.writable))
        self._inflight = still
        return done
