"""The scheduler's half of the vLLM connector: vLLM's questions answered, per-step plans.

Flow for one request:
1. ``get_num_new_matched_tokens``: hash the prompt's whole chunks (chained keys, computed once
   per request) and look up the chunks past vLLM's own prefix-cache hit, with a lease
   (kvdepot.connector.lookups: inline wait of a few milliseconds at most, "ask again"
   (None) while the reply is late, a miss after the client's deadline, the result kept for
   vLLM's repeated calls).
2. ``update_state_after_alloc``: with the blocks vLLM allocated, a LoadSpec (keys + block ids;
   -1 for blocks of a chunk that vLLM's prefix cache already holds; every rank's slot offsets
   from the lookup, so workers copy at once without a round trip of their own). An
   asynchronous load keeps the request in WAITING_FOR_REMOTE_KVS until every worker reports
   it in get_finished; the lookup's lease is released then, marked as read. A hit vLLM does
   not use (its own cache covers it, or it decided otherwise) releases its lease at once.
3. ``build_connector_meta``: this step's loads, and stores for every whole prompt chunk whose
   KV is complete once this step has run (optionally decode chunks too), skipping chunks that
   were loaded from the server. Leases given up are released here, batched.
4. ``request_finished``: blocks are kept (True) when stores were planned for the request; the
   workers report it in get_finished once their copies out of those blocks are done (see
   docs/request-lifecycle.md).

The namespace comes from the workers (see metadata.KVDepotHandshake): the scheduler has no KV
tensors, and deriving the layout from configuration would be one more place to get it subtly
wrong, which would silently give 0% hits. Until it is known, every lookup is a miss.

When the server is away, every call fails fast (the client backs off after one deadline), the
lookup counts as a miss and vLLM recomputes; one warning is logged per outage
(kvdepot.connector.link).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from kvdepot.client import KVDepotClient
from kvdepot.connector.counters import empty_counters, take_counters
from kvdepot.connector.link import ServerLink
from kvdepot.connector.lookups import ASK_AGAIN, LookupBook, LookupRecord, RequestLookups
from kvdepot.connector.settings import ConnectorSettings
from kvdepot.connector.specs import LoadSpec, NamespaceSpec, StoreSpec
from kvdepot.integrations.vllm.compat import first_group, resumed_req_ids
from kvdepot.integrations.vllm.metadata import KVDepotMetadata
from kvdepot.integrations.vllm.request_keys import cacheable, request_root
from kvdepot.keys import chunk_keys

log = logging.getLogger("vllm.kvdepot")


@dataclass
class _Req:
    req_id: str
    request: Any  # vLLM's Request (token lists grow in place)
    root: bytes | None = None
    keys: list[bytes] = field(default_factory=list)  # keys of whole chunks computed so far
    skip: bool = False  # not cacheable (multimodal, prompt embeddings, an unidentifiable LoRA adapter)
    local_tokens: int = 0  # vLLM's own prefix-cache hit, as last given to us
    lookups: RequestLookups = field(default_factory=RequestLookups)
    loading: bool = False
    sync_load: bool = False  # what the last answer told vLLM (is_async = not this)
    block_ids: list[int] = field(default_factory=list)
    stored_upto: int = 0  # chunks [0, stored_upto) stored, planned, or loaded from the server
    # Stores planned out of the request's current blocks (a preemption frees those blocks and
    # resets this): while any may still be copying, a finished request keeps its blocks.
    stores_in_blocks: int = 0


class SchedulerSide:
    def __init__(
        self,
        settings: ConnectorSettings,
        *,
        block_size: int,
        engine_id: str = "",
        client_factory: Callable[..., KVDepotClient] = KVDepotClient,
        load: bool = True,
        store: bool = True,
    ):
        self.settings = settings
        # kv_role: kv_consumer only loads, kv_producer only stores, kv_both does both.
        self.load_enabled = load
        self.store_enabled = store
        self.block_size = block_size
        self.engine_id = engine_id or f"vllm-{os.getpid()}"
        self.counters = empty_counters()
        self._link = ServerLink(
            settings,
            engine_id=f"{self.engine_id}-scheduler",
            outage_effect="serving without the cache (prompts are recomputed)",
            block_size=block_size,
            client_factory=client_factory,
            log=log,
        )
        self._book = LookupBook(self._link, self.counters, log=log)
        self._reqs: dict[str, _Req] = {}
        self._new_loads: list[LoadSpec] = []
        self._held_for_stores: list[str] = []  # finished, blocks kept: tell the workers

    # --- namespace ------------------------------------------------------------------------------

    def set_namespace_spec(self, spec: NamespaceSpec) -> None:
        """From the workers' handshake: connect and register (the first attempt inline, at
        engine start-up; retries in the background)."""
        if self._link.spec is not None:
            if self._link.spec != spec:
                log.error("kvdepot: workers reported a different KV layout than before; ignored")
            return
        self._link.connect_in_background(spec)

    @property
    def spec(self) -> NamespaceSpec | None:
        return self._link.spec

    @property
    def active(self) -> bool:
        return self._link.ns is not None

    @property
    def chunk_tokens(self) -> int:
        ns = self._link.ns
        return ns.chunk_tokens if ns is not None else 0

    # --- per-request state ----------------------------------------------------------------------

    def _state(self, request: Any) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = _Req(req_id=request.request_id, request=request, skip=not cacheable(request))
            self._reqs[request.request_id] = st
        return st

    def _keys(self, st: _Req, n_chunks: int) -> list[bytes]:
        """Keys of the first n_chunks whole chunks of the request's tokens (cached, extended)."""
        ns = self._link.ns
        assert ns is not None
        if len(st.keys) >= n_chunks:
            return st.keys[:n_chunks]
        if st.root is None:
            st.root = request_root(ns.digest, st.request)
        c = ns.chunk_tokens
        tokens = st.request.all_token_ids if self.settings.store_decode else st.request.prompt_token_ids
        start = len(st.keys)
        prev = st.keys[-1] if st.keys else st.root
        # Extend the chain from the last key: chunk_keys roots at ``prev``.
        st.keys.extend(chunk_keys(prev, tokens[start * c : n_chunks * c], c))
        return st.keys[:n_chunks]

    # --- lookup ---------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        ns = self._link.ns
        if ns is None:
            return 0, False
        st = self._state(request)
        if not self.load_enabled:
            return 0, False
        if st.skip or st.loading:
            return 0, False
        c = ns.chunk_tokens
        n = len(request.prompt_token_ids) // c
        first = num_computed_tokens // c
        st.local_tokens = num_computed_tokens
        if first >= n:
            return 0, False
        found = self._book.find(st.lookups, first, lambda: self._keys(st, n)[first:n])
        if found is ASK_AGAIN:
            return None, False
        if found is None:
            return 0, False
        return self._answer(st, found, num_computed_tokens)

    def _answer(self, st: _Req, res: LookupRecord, num_computed_tokens: int) -> tuple[int, bool]:
        c = self.chunk_tokens
        end = (res.first + res.hit) * c
        if res.hit == 0 or end <= num_computed_tokens:
            return 0, False
        st.sync_load = self._load_synchronously(st)
        if st.sync_load:
            # vLLM computes at least one prompt token itself; for a synchronous load it is
            # told one token less (update_state_after_alloc still loads the whole last block;
            # the forward then rewrites that token's KV with the same values).
            end = min(end, len(st.request.prompt_token_ids) - 1)
            if end <= num_computed_tokens:
                return 0, False
        return end - num_computed_tokens, not st.sync_load

    def _load_synchronously(self, st: _Req) -> bool:
        """A synchronous load delays the whole step it runs in; worth it only when nothing
        else would wait (settings.load_mode "auto": no other request known to us)."""
        mode = self.settings.load_mode
        if mode != "auto":
            return mode == "sync"
        return len(self._reqs) == 1 and st.req_id in self._reqs

    # --- allocation -------------------------------------------------------------------------

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens == 0:
            # Either vLLM did not take the hit (its own cache covers it, or it trimmed the hit
            # away) or this is the second call after an async load: keep only a lease in use.
            if not st.loading:
                self._book.drop(st.lookups)
            return
        res = st.lookups.result
        c = self.chunk_tokens
        bs = self.block_size
        bpc = c // bs
        local = st.local_tokens
        end = local + num_external_tokens
        ids = first_group(blocks)
        c_lo, c_hi = local // c, -(-end // c)
        if res is None or c_lo < res.first or c_hi > res.first + res.hit:
            # vLLM asked for tokens we did not offer: load nothing and report the blocks as
            # failed, so they are recomputed rather than read uninitialised.
            log.error("kvdepot: vLLM asked to load tokens [%d, %d) that were not offered", local, end)
            writable = [b for i, b in enumerate(ids) if local <= i * bs and (i + 1) * bs <= end]
            spec = LoadSpec(request.request_id, b"", writable)
        else:
            keys = self._keys(st, c_hi)[c_lo:c_hi]
            load_end = end
            if st.sync_load and end == len(request.prompt_token_ids) - 1:
                load_end = c_hi * c  # the token _answer held back is loaded too
            load_ids = []
            for i in range(c_lo * bpc, c_hi * bpc):
                writable = local <= i * bs and (i + 1) * bs <= load_end and i < len(ids)
                load_ids.append(ids[i] if writable else -1)
            world = self.spec.world_size if self.spec is not None else 1
            spec = LoadSpec(request.request_id, b"".join(keys), load_ids,
                            offsets=res.offsets_of(world, c_lo, c_hi), boot_id=res.boot_id)
            # Nothing reports a synchronous load done; its slots are read within the request's
            # first step, and the lease goes when the request finishes or is preempted.
            self._book.hand_to_load(st.lookups, sync=st.sync_load)
            st.stored_upto = max(st.stored_upto, c_hi)  # the server has these chunks
            self.counters["hit_tokens"] += num_external_tokens
        spec.sync = st.sync_load
        st.loading = not st.sync_load
        self._new_loads.append(spec)

    # --- per step ---------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: Any) -> KVDepotMetadata:
        meta = KVDepotMetadata(
            chunk_tokens=self.chunk_tokens,
            loads=self._new_loads,
            preempted=_preempted(scheduler_output),
            idle_step=getattr(scheduler_output, "total_num_scheduled_tokens", 1) == 0,
            held_for_stores=self._held_for_stores,
        )
        self._new_loads, self._held_for_stores = [], []
        for req_id in meta.preempted or ():
            st = self._reqs.get(req_id)
            if st is not None:
                self._blocks_freed(st)
        touched: list[tuple[_Req, int]] = []
        num_scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = first_group(new.block_ids)
            touched.append((st, new.num_computed_tokens + num_scheduled.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        resumed = resumed_req_ids(cached)
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i] if i < len(cached.new_block_ids) else None
            if req_id in resumed:
                self._blocks_freed(st)  # (when this vLLM does not name preempted requests)
                st.block_ids = first_group(new_ids)
            elif new_ids is not None:
                st.block_ids.extend(first_group(new_ids))
            touched.append((st, cached.num_computed_tokens[i] + num_scheduled.get(req_id, 0)))
        if self._link.ns is not None and not self._link.down and self.store_enabled:
            for st, computed in touched:
                spec = self._plan_store(st, computed)
                if spec is not None:
                    meta.stores.append(spec)
        self._book.flush()
        return meta

    def _plan_store(self, st: _Req, computed: int) -> StoreSpec | None:
        if st.skip:
            return None
        c = self.chunk_tokens
        bpc = c // self.block_size
        req = st.request
        limit = len(req.all_token_ids) if self.settings.store_decode else len(req.prompt_token_ids)
        whole = min(computed, limit) // c
        whole = min(whole, len(st.block_ids) // bpc)
        if whole <= st.stored_upto:
            return None
        chain = self._keys(st, whole)
        keys = chain[st.stored_upto : whole]
        spec = StoreSpec(st.req_id, b"".join(keys), st.block_ids[st.stored_upto * bpc : whole * bpc],
                         parent=chain[st.stored_upto - 1] if st.stored_upto else b"")
        st.stored_upto = whole
        st.stores_in_blocks += 1
        return spec

    def _blocks_freed(self, st: _Req) -> None:
        """The request was preempted: vLLM freed its blocks. Stores still reading them are the
        workers' to settle before the blocks are reused (handle_preemptions: finished, or
        aborted, never committed with another request's bytes); queued ones are dropped. So
        nothing past the request's loaded prefix is known stored: plan every whole chunk again
        once it is recomputed (the server answers PRESENT for the chunks it has), so that a
        dropped store never leaves a hole in the prefix."""
        st.stores_in_blocks = 0
        st.stored_upto = 0
        st.block_ids = []
        self._book.sync_loads_read(st.lookups)

    def update_connector_output(self, connector_output: Any) -> None:
        orphans = False
        for req_id in getattr(connector_output, "finished_recving", None) or ():
            st = self._reqs.get(req_id)
            if st is not None and st.loading:
                st.loading = False
                self._book.load_reported(st.lookups)
            if self._book.orphan_load_reported(req_id):
                orphans = True
        if orphans:
            self._book.flush()

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict | None]:
        """Whether vLLM must keep the finished request's blocks (see docs/request-lifecycle.md).

        - An asynchronous load still in flight (WAITING_FOR_REMOTE_KVS): vLLM itself keeps the
          blocks until the workers report the request in ``finished_recving``; answering True
          as well would make vLLM free them twice. False.
        - Else stores planned out of the current blocks: True, and the workers are told (in
          the next step's metadata) to report the request in ``finished_sending`` once its
          stores are done, exactly once.
        - Else False.
        """
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        self._book.request_gone(st.req_id, st.lookups, loading=st.loading)
        if not self._reqs:
            # The last request: the engine may go idle, and no step would come to release its
            # leases in (they would pin their chunks until the session ends).
            self._book.flush()
        if st.loading:
            return False, None
        if st.stores_in_blocks:
            self._held_for_stores.append(st.req_id)
            return True, None
        return False, None

    def add_counter(self, name: str, value: int) -> None:
        self.counters[name] += value

    def take_counters(self) -> dict[str, int]:
        return take_counters(self.counters)

    def close(self) -> None:
        self._book.close()
        self._link.close()


def _preempted(scheduler_output: Any) -> set[str] | None:
    ids = getattr(scheduler_output, "preempted_req_ids", None)
    return set(ids) if ids is not None else None
