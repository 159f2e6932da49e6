"""The scheduler's half of the connector: lookups, leases, and the per-step load/store plans.

Flow for one request:
1. ``get_num_new_matched_tokens``: hash the prompt's whole chunks (chained keys, computed once
   per request), send one Lookup for the chunks past vLLM's own prefix-cache hit, with a lease
   so that the hit cannot be evicted before it is loaded. The reply is awaited inline for a few
   milliseconds only (a local round trip is far less); if it is late the answer is None ("ask
   again next step") so the scheduler never stalls, and after the client's deadline the lookup
   counts as a miss. The result is kept for the request, so vLLM's repeated calls (the request
   may wait for free blocks) cost nothing and take no second lease.
2. ``update_state_after_alloc``: with the blocks vLLM allocated, a LoadSpec (keys + block ids;
   -1 for blocks of a chunk that vLLM's prefix cache already holds; every rank's slot offsets
   from the lookup, so workers copy at once without a round trip of their own). Loads are
   asynchronous: the request waits in WAITING_FOR_REMOTE_KVS until every worker reports it in
   get_finished; the lookup's lease is released then, marked as read.
   A hit vLLM does not use (its own cache covers it, or it decided otherwise) releases its lease
   at once.
3. ``build_connector_meta``: this step's loads, and stores for every whole prompt chunk whose
   KV is complete once this step has run (optionally decode chunks too), skipping chunks that
   were loaded from the server. Leases of finished loads are released here, batched.
4. ``request_finished``: blocks are kept (True) when stores were planned for the request; the
   workers report it in get_finished once their copies out of those blocks are done.

The namespace comes from the workers (see metadata.KVDepotHandshake): the scheduler has no KV
tensors, and deriving the layout from configuration would be one more place to get it subtly
wrong, which would silently give 0% hits. Until it is known, every lookup is a miss.

When the server is away, every call fails fast (the client backs off after one deadline), the
lookup counts as a miss and vLLM recomputes; one warning is logged per outage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from kvdepot.client import (
    KVDepotClient,
    KVDepotError,
    Namespace,
    ServerRestarted,
    ServerUnavailable,
)
from kvdepot.integrations.vllm.compat import first_group, resumed_req_ids
from kvdepot.integrations.vllm.config import ConnectorSettings
from kvdepot.integrations.vllm.identity import adapter_identity
from kvdepot.integrations.vllm.metadata import (
    KVDepotMetadata,
    LoadSpec,
    NamespaceSpec,
    StoreSpec,
)
from kvdepot.integrations.vllm.stats import empty_counters
from kvdepot.keys import chunk_keys
from kvdepot.protocol import ErrorCode

log = logging.getLogger("vllm.kvdepot")

# A miss is remembered this long for a request that waits (for blocks, for its turn): vLLM
# asks again every step, and a fresh lookup per step would cost a round trip each time.
MISS_TTL_S = 0.5


@dataclass
class _Lookup:
    first: int  # chunk index the lookup started at
    hit: int  # chunks hit from ``first``
    lease: int
    epoch: int
    at: float
    offsets: list[int] = field(default_factory=list)  # rank-major slot offsets of the hits
    boot_id: str = ""  # the server boot the offsets belong to


@dataclass
class _Req:
    req_id: str
    request: Any  # vLLM's Request (token lists grow in place)
    root: bytes | None = None
    keys: list[bytes] = field(default_factory=list)  # keys of whole chunks computed so far
    skip: bool = False  # not cacheable (multimodal, prompt embeddings, an unidentifiable LoRA adapter)
    local_tokens: int = 0  # vLLM's own prefix-cache hit, as last given to us
    pending: Any = None  # PendingReply of a lookup in flight
    pending_first: int = 0
    pending_sent: float = 0.0
    lookup: _Lookup | None = None
    load_lease: int = 0  # lease held until the load is reported finished
    loading: bool = False
    sync_load: bool = False  # what the last answer told vLLM (is_async = not this)
    sync_leases: list[int] = field(default_factory=list)  # held until the request finishes
    block_ids: list[int] = field(default_factory=list)
    stored_upto: int = 0  # chunks [0, stored_upto) stored, planned, or loaded from the server
    # Stores planned out of the request's current blocks (a preemption frees those blocks and
    # resets this): while any may still be copying, a finished request keeps its blocks.
    stores_in_blocks: int = 0


def request_root(ns_digest: bytes, request: Any) -> bytes:
    """The first link of a request's key chain.

    KV also depends on the LoRA adapter, and vLLM's per-request ``cache_salt`` isolates
    tenants; both are folded into the root so such requests never share chunks with others.
    The adapter is named by its weights (identity.adapter_identity), never by its per-engine
    name and id: another engine may serve other weights under the same label.
    """
    parts = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        adapter = adapter_identity(lora)
        if adapter is None:
            # _cacheable identified it a moment ago and it is gone now: a root that nothing
            # else reaches, so the request shares nothing.
            adapter = "unidentified:" + os.urandom(16).hex()
        parts.append(f"adapter:{adapter}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(f"salt:{salt}")
    if not parts:
        return ns_digest
    h = hashlib.blake2b(digest_size=len(ns_digest), key=ns_digest, person=b"kvdepot-rq-v1".ljust(16, b"\0"))
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.digest()


def _cacheable(request: Any) -> bool:
    if getattr(request, "prompt_token_ids", None) is None:
        return False  # prompt embeddings: no tokens to key on
    if getattr(request, "mm_features", None) or getattr(request, "mm_positions", None):
        return False  # KV depends on the images too, which the keys do not cover
    lora = getattr(request, "lora_request", None)
    if lora is not None and adapter_identity(lora) is None:
        return False  # KV depends on the adapter's weights, which cannot be identified
    return True


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
        self._client_factory = client_factory
        self._client: KVDepotClient | None = None
        self._ns: Namespace | None = None
        self._spec: NamespaceSpec | None = None
        self._reqs: dict[str, _Req] = {}
        self._new_loads: list[LoadSpec] = []
        self._to_release: list[int] = []
        self._retrieved: list[int] = []  # of _to_release: leases whose chunks were loaded
        self._orphan_loads: dict[str, int] = {}  # finished requests' loads still in flight
        self._held_for_stores: list[str] = []  # finished, blocks kept: tell the workers
        self._down = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.counters = empty_counters()

    # --- namespace and connection -------------------------------------------------------------

    def set_namespace_spec(self, spec: NamespaceSpec) -> None:
        """From the workers' handshake: connect and register.

        The first attempt runs inline (engine start-up; one round trip, at most the client's
        deadline when the server is away), so the very first requests already use the cache;
        if it fails, a background thread retries every retry_s.
        """
        if self._spec is not None:
            if self._spec != spec:
                log.error("kvdepot: workers reported a different KV layout than before; ignored")
            return
        self._spec = spec
        self._client = self._client_factory(
            host=self.settings.host,
            port=self.settings.port,
            engine_id=f"{self.engine_id}-scheduler",
            timeout_ms=self.settings.timeout_ms,
        )
        if self._register_once() is None:
            self._thread = threading.Thread(target=self._connect_loop, name="kvdepot-sched-connect", daemon=True)
            self._thread.start()

    def _connect_loop(self) -> None:
        while not self._closed:
            deadline = time.monotonic() + self.settings.retry_s
            while not self._closed and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._closed or self._register_once() is not None:
                return

    def _register_once(self) -> bool | None:
        """One attempt: True registered, False refused for good (cache off), None try later."""
        spec, client = self._spec, self._client
        assert spec is not None and client is not None
        try:
            if client.connect():
                try:
                    ns = client.register(spec.model, spec.geometry, spec.world_size, spec.salt)
                except KVDepotError as exc:  # the session dropped right after the handshake
                    if exc.code != int(ErrorCode.NO_SESSION):
                        raise
                    client.connect()
                    ns = client.register(spec.model, spec.geometry, spec.world_size, spec.salt)
                if ns.chunk_tokens % self.block_size:
                    log.error(
                        "kvdepot: the server's chunk size %d is not a multiple of vLLM's block "
                        "size %d; the cache is off for this engine", ns.chunk_tokens, self.block_size,
                    )
                    return False
                self._ns = ns
                self._server_back()
                log.info(
                    "kvdepot: scheduler using %s, namespace %s (%s, chunk %d tokens)",
                    self.settings.endpoint, ns.digest.hex()[:12], spec.geometry.describe(), ns.chunk_tokens,
                )
                return True
        except KVDepotError as exc:
            if exc.code in (int(ErrorCode.GEOMETRY_MISMATCH), int(ErrorCode.BAD_REQUEST)):
                # The server answers but will not take this model: retrying cannot help.
                log.error("kvdepot: the server refused this engine's KV layout (%s); cache off", exc)
                return False
            log.debug("kvdepot: register failed: %s", exc)
        self._server_away("not reachable")
        return None

    def _server_away(self, why: str) -> None:
        if not self._down:
            self._down = True
            log.warning(
                "kvdepot: server at %s %s; serving without the cache (prompts are recomputed) "
                "until it is back", self.settings.endpoint, why,
            )

    def _server_back(self) -> None:
        if self._down:
            self._down = False
            log.info("kvdepot: server at %s is back; using the cache again", self.settings.endpoint)

    @property
    def active(self) -> bool:
        return self._ns is not None

    @property
    def chunk_tokens(self) -> int:
        return self._ns.chunk_tokens if self._ns is not None else 0

    # --- per-request state ----------------------------------------------------------------------

    def _state(self, request: Any) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = _Req(req_id=request.request_id, request=request, skip=not _cacheable(request))
            self._reqs[request.request_id] = st
        return st

    def _keys(self, st: _Req, n_chunks: int) -> list[bytes]:
        """Keys of the first n_chunks whole chunks of the request's tokens (cached, extended)."""
        assert self._ns is not None
        if len(st.keys) >= n_chunks:
            return st.keys[:n_chunks]
        if st.root is None:
            st.root = request_root(self._ns.digest, st.request)
        c = self._ns.chunk_tokens
        tokens = st.request.all_token_ids if self.settings.store_decode else st.request.prompt_token_ids
        start = len(st.keys)
        prev = st.keys[-1] if st.keys else st.root
        # Extend the chain from the last key: chunk_keys roots at ``prev``.
        st.keys.extend(chunk_keys(prev, tokens[start * c : n_chunks * c], c))
        return st.keys[:n_chunks]

    # --- lookup ---------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        ns = self._ns
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
        client = self._client
        assert client is not None
        if st.pending is not None:
            # A lookup from an earlier call: collect it first (never abandon one: its lease
            # would be held until it expired).
            outcome = self._collect(st)
            if outcome is not None:
                return outcome
        answer = self._answer_if_valid(st, first, num_computed_tokens)
        if answer is not None:
            return answer
        self._drop_lookup(st)

        keys = self._keys(st, n)[first:n]
        try:
            st.pending = client.send_lookup(ns, keys, lease_ms=self.settings.lease_ms)
        except KVDepotError as exc:
            return self._lookup_failed(exc)
        now = time.monotonic()
        st.pending_first, st.pending_sent = first, now
        self.counters["lookups"] += 1
        self.counters["queried_tokens"] += (n - first) * c
        # A local round trip takes ~0.1-0.3 ms: wait that long inline rather than costing the
        # request a scheduler step, but never longer than lookup_wait_ms.
        wait_until = now + self.settings.lookup_wait_ms / 1000.0
        while not st.pending.ready() and time.monotonic() < wait_until:
            time.sleep(20e-6)
        outcome = self._collect(st)
        if outcome is not None:
            return outcome
        return self._answer_if_valid(st, first, num_computed_tokens) or (0, False)

    def _answer_if_valid(self, st: _Req, first: int, num_computed_tokens: int) -> tuple[int, bool] | None:
        """The answer from the request's lookup result, None when there is none still valid."""
        res, client = st.lookup, self._client
        if res is None or client is None or not self._still_valid(
            res, first, time.monotonic(), client.epoch
        ):
            return None
        return self._answer(st, res, num_computed_tokens)

    def _collect(self, st: _Req) -> tuple[int | None, bool] | None:
        """Take a finished lookup's result into st.lookup. Returns an answer for vLLM when
        there is nothing to evaluate: (None, False) while in flight, (0, False) on errors."""
        pending = st.pending
        if not pending.ready():
            return None, False  # ask again next step; the client's deadline bounds this
        st.pending = None
        try:
            result = pending.result()
        except KVDepotError as exc:
            return self._lookup_failed(exc)
        self._server_back()
        self._drop_lookup(st)
        client = self._client
        boot = client.boot_id if client is not None and client.epoch == result.epoch else None
        st.lookup = _Lookup(
            st.pending_first, result.hit_chunks, result.lease, result.epoch, time.monotonic(),
            offsets=list(getattr(result, "offsets", ()) or ()) if boot else [],
            boot_id=boot or "",
        )
        return None

    def _lookup_failed(self, exc: KVDepotError) -> tuple[int, bool]:
        """A lookup that could not be sent or answered is a miss; note why."""
        self.counters["lookup_errors"] += 1
        if isinstance(exc, ServerRestarted):
            # Keys and namespace are unchanged across boots; only leases died, and the server
            # is evidently back.
            self._server_back()
        elif isinstance(exc, ServerUnavailable) and exc.code != int(ErrorCode.NO_SESSION):
            self._server_away(f"is not answering ({exc.message})")
        else:  # e.g. the server dropped our session and the client opened a new one
            log.debug("kvdepot: lookup failed: %s", exc)
        return 0, False

    def _still_valid(self, res: _Lookup, first: int, now: float, epoch: int) -> bool:
        if res.epoch != epoch:
            return False  # the server restarted: the lease is void, the hit may be gone
        if res.hit == 0:
            return res.first == first and now - res.at < MISS_TTL_S
        # A later call may come with a longer local hit; a shorter one needs a new lookup.
        return res.first <= first and now - res.at < self.settings.lease_ms / 2000.0

    def _answer(self, st: _Req, res: _Lookup, num_computed_tokens: int) -> tuple[int, bool]:
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

    def _drop_lookup(self, st: _Req) -> None:
        if st.lookup is not None and st.lookup.lease:
            self._to_release.append(st.lookup.lease)
        st.lookup = None

    # --- allocation -------------------------------------------------------------------------

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens == 0:
            # Either vLLM did not take the hit (its own cache covers it, or it trimmed the hit
            # away) or this is the second call after an async load: keep only a lease in use.
            if not st.loading:
                self._drop_lookup(st)
            return
        res = st.lookup
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
            spec = LoadSpec(request.request_id, b"".join(keys), load_ids,
                            offsets=self._load_offsets(res, c_lo, c_hi), boot_id=res.boot_id)
            if st.sync_load:
                # Nothing reports a synchronous load done; its slots are read within the
                # request's first step, and the lease goes when the request finishes.
                if res.lease:
                    st.sync_leases.append(res.lease)
            else:
                st.load_lease = res.lease
            st.lookup = None  # the lease now belongs to the load
            st.stored_upto = max(st.stored_upto, c_hi)  # the server has these chunks
            self.counters["hit_tokens"] += num_external_tokens
        spec.sync = st.sync_load
        st.loading = not st.sync_load
        self._new_loads.append(spec)

    def _load_offsets(self, res: _Lookup, c_lo: int, c_hi: int) -> list[int]:
        """Every rank's offsets of chunks [c_lo, c_hi), rank-major, from the lookup's."""
        world = self._spec.world_size if self._spec is not None else 1
        hit = res.hit
        if not res.offsets or len(res.offsets) != world * hit:
            return []
        return [
            res.offsets[r * hit + (c - res.first)] for r in range(world) for c in range(c_lo, c_hi)
        ]

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
        if self._ns is not None and not self._down and self.store_enabled:
            for st, computed in touched:
                spec = self._plan_store(st, computed)
                if spec is not None:
                    meta.stores.append(spec)
        self._release_leases()
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
        for lease in st.sync_leases:  # the load was read in its own step, long ago
            self._release_loaded(lease)
        st.sync_leases = []

    def update_connector_output(self, connector_output: Any) -> None:
        orphans = False
        for req_id in getattr(connector_output, "finished_recving", None) or ():
            st = self._reqs.get(req_id)
            if st is not None and st.loading:
                st.loading = False
                if st.load_lease:
                    self._release_loaded(st.load_lease)
                    st.load_lease = 0
            if req_id in self._orphan_loads:
                lease = self._orphan_loads.pop(req_id)
                if lease:
                    self._release_loaded(lease)
                    # The request is gone: no step may follow to release it in (an idle engine).
                    orphans = True
        if orphans:
            self._release_leases()

    def _release_loaded(self, lease: int) -> None:
        self._to_release.append(lease)
        self._retrieved.append(lease)

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
        if st.pending is not None:
            st.pending.abandon()  # its lease, if any, is given back when the reply comes
            st.pending = None
        self._drop_lookup(st)
        for lease in st.sync_leases:
            self._release_loaded(lease)
        if st.loading:
            # The workers may still be copying into the blocks and out of the leased slots:
            # the lease goes when they report the load (or expires by its TTL).
            self._orphan_loads[st.req_id] = st.load_lease
            return False, None
        if st.stores_in_blocks:
            self._held_for_stores.append(st.req_id)
            return True, None
        return False, None

    def _release_leases(self) -> None:
        if not self._to_release or self._client is None:
            return
        leases, self._to_release = self._to_release, []
        retrieved, self._retrieved = self._retrieved, []
        try:
            self._client.release(leases, retrieved=retrieved)
        except KVDepotError as exc:
            # Leases of a restarted server are void anyway; others expire by their TTL.
            log.debug("kvdepot: releasing %d leases failed: %s", len(leases), exc)

    def add_counter(self, name: str, value: int) -> None:
        self.counters[name] += value

    def take_counters(self) -> dict[str, int]:
        out, self.counters = self.counters, empty_counters()
        return out

    def close(self) -> None:
        self._closed = True
        self._to_release.extend(lease for lease in self._orphan_loads.values() if lease)
        self._orphan_loads.clear()
        self._release_leases()
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - shutting down
                pass


def _preempted(scheduler_output: Any) -> set[str] | None:
    ids = getattr(scheduler_output, "preempted_req_ids", None)
    return set(ids) if ids is not None else None
