"""The BlockCopier over the arena of the server boot in use.

A restarted server has a new arena: the copier is replaced then (by the I/O thread, the first
time it needs the new boot's), and the old one closed once its copies in flight are done.
``direct`` is what the engine thread may enqueue GPU loads on, swapped under ``lock``, so that
no load is enqueued on a copier being closed.
"""

from __future__ import annotations

import logging
import threading

from kvdepot.client import KVDepotClient, Namespace
from kvdepot.connector.copier import BlockCopier
from kvdepot.connector.logs import CONNECTOR_LOG
from kvdepot.transfer.layout import PagedLayout


class BootCopier:
    """``layout``: the engine's KV cache, set once the engine registers it. ``current``: the
    copier of epoch ``epoch`` (None before the first); ``direct``: (boot id, copier) on a GPU,
    else None."""

    def __init__(self, *, log: logging.Logger = CONNECTOR_LOG):
        self.layout: PagedLayout | None = None
        self.current: BlockCopier | None = None
        self.epoch = -1
        self.direct: tuple[str, BlockCopier] | None = None
        self.lock = threading.Lock()
        self._log = log

    def for_epoch(self, client: KVDepotClient, ns: Namespace, epoch: int) -> BlockCopier:
        """The copier over the arena of server boot ``epoch`` (raises if that boot is gone)."""
        assert self.layout is not None
        if self.current is None or self.epoch != epoch:
            arena = client.arena(epoch).tensor()
            boot = client.boot_id or ""
            copier = BlockCopier(self.layout, arena, ns.chunk_tokens, log=self._log)
            with self.lock:  # no engine-thread load is being enqueued on the old one
                old, self.current, self.epoch = self.current, copier, epoch
                self.direct = (boot, copier) if self.layout.device.type == "cuda" else None
            if old is not None:
                old.close()  # waits for its copies in flight before unpinning
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
