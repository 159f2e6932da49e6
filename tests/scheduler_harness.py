"""vLLM's real v1 Scheduler and the connector's real worker half, stepped in one process.

A ``Harness`` is one engine: vLLM's ``Scheduler`` (which builds the connector's scheduler
half from a KVTransferConfig naming KVDepotConnector), the connector's worker half on small
CPU KV tensors, and a model stand-in, all against a real kvdepot server process
(``DepotServer``). ``Harness.step`` is one engine step, hooks in vLLM's order (0.32's model
runner): schedule, handle_preemptions, bind metadata, start_load_kv (before the forward when
the step has synchronous loads, else after it), forward, wait_for_save, get_transfer_results
(get_finished), get_block_ids_with_load_errors, statistics, clear metadata, then
update_from_output.

The model stand-in writes, for every token position p it computes, bytes derived from a hash
chain over the request's tokens [0, p] (``PrefixKV``): KV depends on the whole prefix, so
blocks of another request, of another position or left unwritten never match. Before it
computes a request's tokens, and after every finished asynchronous load, it checks every
already-computed position of the request byte for byte; any wrong byte raises
AssertionError. The token it samples is also a function of the prefix hash only, so every
request's output is known in advance (``reference_output``) whatever was loaded, preempted
or recomputed.

Written for this project (vLLM's own helpers in its source distribution cannot be fetched
with pip here: ``pip download --no-binary :all: vllm`` must build the sdist's metadata, which
needs vLLM's CUDA build requirements).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from server_process import ServerProcess, free_port

LAYERS, HEADS, HEAD_DIM, BLOCK = 2, 2, 8, 16
CHUNK = 64  # the server's --chunk-size: 4 blocks
# One 64-byte blake2b digest gives a token's KV in every layer: L x H x (K+V) int8 values.
ROW_VALUES = LAYERS * HEADS * 2 * HEAD_DIM
assert ROW_VALUES <= 64
# Never-written KV is a NaN pattern that no int8-valued row can take.
UNWRITTEN = 0x7FC1
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def write_model(folder: str | os.PathLike) -> str:
    """A tiny seeded random Llama checkpoint with the harness's KV geometry in ``folder``: the
    scheduler never loads its weights, but the connector names them in its namespace."""
    import vllm_support

    return vllm_support.write_tiny_llama(
        folder, seed=0, hidden_size=HEADS * 2 * HEAD_DIM, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS * 2, num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
    )


def prompt(n: int, seed: int) -> list[int]:
    """``n`` reproducible token ids in [10, 1000)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(n)]


# --- the model stand-in ----------------------------------------------------------------------


class _Chain:
    """Hash chain over one token sequence: digests[p] covers tokens [0, p]."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.digests: list[bytes] = []
        self.rows = bytearray()

    def extend(self, tokens: Sequence[int], n: int) -> None:
        k = len(self.digests)
        if k and list(tokens[: min(k, n)]) != self.tokens[: min(k, n)]:
            raise AssertionError("a request's earlier tokens changed")
        prev = self.digests[-1] if k else b"kvdepot-harness"
        for t in tokens[k:n]:
            prev = hashlib.blake2b(prev + int(t).to_bytes(4, "little"), digest_size=32).digest()
            self.tokens.append(int(t))
            self.digests.append(prev)
            self.rows += hashlib.blake2b(prev, digest_size=ROW_VALUES, person=b"kv-row").digest()


def sampled_token(digest: bytes) -> int:
    return 10 + int.from_bytes(digest[:4], "little") % 990


def reference_output(tokens: Sequence[int], max_tokens: int) -> list[int]:
    """What the stand-in generates after ``tokens``, whatever happened to the KV."""
    chain, seq = _Chain(), list(tokens)
    for _ in range(max_tokens):
        chain.extend(seq, len(seq))
        seq.append(sampled_token(chain.digests[-1]))
    return seq[len(tokens):]


class PrefixKV:
    """The KV tensors ([L, blocks, H, block, K+V], vLLM's CPU shape) and the stand-in."""

    def __init__(self, num_blocks: int):
        self.buf = torch.empty(LAYERS, num_blocks, HEADS, BLOCK, 2 * HEAD_DIM, dtype=torch.bfloat16)
        self.buf.view(torch.int16).fill_(UNWRITTEN)
        self.by_token = self.buf.permute(1, 3, 0, 2, 4)  # [blocks, block, L, H, K+V]
        self._chains: dict[str, _Chain] = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.buf[i] for i, name in enumerate(LAYER_NAMES)}

    def _rows(self, req_id: str, tokens: Sequence[int], lo: int, hi: int) -> torch.Tensor:
        chain = self._chains.setdefault(req_id, _Chain())
        chain.extend(tokens, hi)
        raw = bytes(chain.rows[lo * ROW_VALUES : hi * ROW_VALUES])
        vals = torch.frombuffer(bytearray(raw), dtype=torch.int8).to(torch.bfloat16)
        return vals.view(hi - lo, LAYERS, HEADS, 2 * HEAD_DIM)

    def _index(self, blocks: Sequence[int], lo: int, hi: int):
        pos = torch.arange(lo, hi)
        if hi > len(blocks) * BLOCK:
            raise AssertionError(f"positions up to {hi} but only {len(blocks)} blocks")
        return torch.tensor(blocks, dtype=torch.long)[pos // BLOCK], pos % BLOCK

    def write(self, req_id: str, tokens: Sequence[int], blocks: Sequence[int], lo: int, hi: int) -> None:
        if hi > lo:
            blk, off = self._index(blocks, lo, hi)
            self.by_token[blk, off] = self._rows(req_id, tokens, lo, hi)

    def verify(self, req_id: str, tokens: Sequence[int], blocks: Sequence[int], hi: int, when: str) -> None:
        """Every position [0, hi) holds the bytes of its own prefix, else AssertionError."""
        if hi <= 0:
            return
        blk, off = self._index(blocks, 0, hi)
        got = self.by_token[blk, off].reshape(hi, -1).view(torch.int16)
        want = self._rows(req_id, tokens, 0, hi).reshape(hi, -1).view(torch.int16)
        bad = (got != want).any(dim=1).nonzero().flatten()
        if len(bad):
            p = int(bad[0])
            what = "never written" if bool((got[p] == UNWRITTEN).all()) else "another prefix's bytes"
            raise AssertionError(
                f"{when}: request {req_id} has wrong KV at {len(bad)} of {hi} computed positions, "
                f"first at position {p} (block {blocks[p // BLOCK]}, chunk {p // CHUNK}): {what}"
            )

    def sample(self, req_id: str, tokens: Sequence[int], n: int) -> int:
        chain = self._chains.setdefault(req_id, _Chain())
        chain.extend(tokens, n)
        return sampled_token(chain.digests[n - 1])


# --- slow copies ------------------------------------------------------------------------------


class CopyGate:
    """Holds the worker's copies (BlockCopier.load / .store) until released: a slow copy.

    Installed for one harness; ``close`` puts the copier back."""

    def __init__(self) -> None:
        from kvdepot.connector import copier

        self._cls = copier.BlockCopier
        self._orig = {"load": self._cls.load, "store": self._cls.store}
        self._open = {k: threading.Event() for k in self._orig}
        self._cv = threading.Condition()
        self.held = {k: 0 for k in self._orig}  # copies waiting at the gate now
        for kind, ev in self._open.items():
            ev.set()
            setattr(self._cls, kind, self._gated(kind))

    def _gated(self, kind: str):
        orig, ev, gate = self._orig[kind], self._open[kind], self

        def copy(copier, *args, **kwargs):
            with gate._cv:
                gate.held[kind] += 1
                gate._cv.notify_all()
            try:
                ev.wait(60)
            finally:
                with gate._cv:
                    gate.held[kind] -= 1
            return orig(copier, *args, **kwargs)

        return copy

    def hold(self, kind: str) -> None:
        self._open[kind].clear()

    def release(self, kind: str) -> None:
        self._open[kind].set()

    def release_after(self, kind: str, seconds: float) -> None:
        timer = threading.Timer(seconds, self.release, args=(kind,))
        timer.daemon = True
        timer.start()

    def wait_held(self, kind: str, timeout: float = 10.0) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: self.held[kind] > 0, timeout):
                raise AssertionError(f"no {kind} reached the copier within {timeout}s")

    def close(self) -> None:
        for kind, fn in self._orig.items():
            setattr(self._cls, kind, fn)
            self._open[kind].set()


# --- the server -------------------------------------------------------------------------------


class DepotServer:
    """A kvdepot server process that can be killed, restarted (same port and segment name,
    a new boot), paused (SIGSTOP) and asked for its stats."""

    def __init__(self, log_dir: str | os.PathLike, chunk_size: int = CHUNK, buffer_gb: float = 0.02):
        self.log_dir, self.chunk_size, self.buffer_gb = Path(log_dir), chunk_size, buffer_gb
        self.port = free_port()
        self.shm_name = f"kvdepot-harness-{os.getpid()}-{self.port}"
        self.boots = 0
        self.proc: ServerProcess | None = None
        self._client = None

    def start(self) -> "DepotServer":
        self.boots += 1
        self.proc = ServerProcess(
            chunk_size=self.chunk_size, buffer_gb=self.buffer_gb, port=self.port,
            shm_name=self.shm_name, log_path=self.log_dir / f"server-{self.boots}.log",
        ).start()
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.resume()
            self.proc.kill()

    def restart(self) -> None:
        self.kill()
        self.start()
        if self._client is not None:  # a new observer: the old one backs off from the dead boot
            self._client.close()
            self._client = None

    def pause(self) -> None:
        os.kill(self.proc.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.alive:
            os.kill(self.proc.proc.pid, signal.SIGCONT)

    def stats(self):
        from kvdepot.client import KVDepotClient, KVDepotError

        if self._client is None:
            self._client = KVDepotClient("127.0.0.1", self.port, engine_id="harness-observer", timeout_ms=3000)
        deadline = time.monotonic() + 5.0
        while True:  # a new boot is noticed once (ServerRestarted), then answers
            try:
                return self._client.stats()
            except KVDepotError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stored_chunks(self, spec, tokens: Sequence[int]) -> int:
        """Whole chunks of ``tokens`` the server holds for namespace ``spec``, from their start
        (a lookup without a lease by an observer: the engines' connectors are not involved)."""
        from kvdepot.keys import chunk_keys

        self.stats()  # connects, and absorbs a boot change
        ns = self._client.register(spec.model, spec.geometry, spec.world_size, spec.salt)
        keys = chunk_keys(ns.digest, list(tokens), ns.chunk_tokens)
        return self._client.lookup(ns, keys, lease_ms=0).hit_chunks if keys else 0

    def wait_clean(self, grace_s: float = 2.0) -> None:
        """No lease and no open reservation, within ``grace_s`` (nothing steps meanwhile)."""
        deadline = time.monotonic() + grace_s
        while True:
            s = self.stats()
            if s.leases_held == 0 and s.reservations_open == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server still holds {s.leases_held} leases and {s.reservations_open} open "
                    f"reservations {grace_s}s after the engine went idle"
                )
            time.sleep(0.05)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.proc is not None:
            self.resume()
            self.proc.__exit__(None, None, None)


# --- one engine ------------------------------------------------------------------------------


class Harness:
    """vLLM's Scheduler + the connector's worker half + the model stand-in: one engine.

    ``extra``: kv_connector_extra_config keys (``kvdepot.`` prefix added). ``wait_ready``:
    return once both halves are registered with the server (an engine that served its first
    request at once would not wait).
    """

    def __init__(self, model_dir: str, server: DepotServer, *, num_blocks: int = 64,
                 max_num_batched_tokens: int = 256, long_prefill_token_threshold: int = 0,
                 policy: str = "fcfs", prefix_caching: bool = False, load_mode: str = "async",
                 extra: dict | None = None, wait_ready: bool = True):
        from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig,
                                 SchedulerConfig, VllmConfig)
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        from kvdepot.integrations.vllm import KVDepotConnector

        cfg = {"kvdepot.host": "127.0.0.1", "kvdepot.port": server.port, "kvdepot.retry_s": 0.2,
               "kvdepot.load_mode": load_mode}
        cfg.update({f"kvdepot.{k}": v for k, v in (extra or {}).items()})
        vllm_config = VllmConfig(
            model_config=ModelConfig(model=model_dir, dtype="bfloat16", seed=0,
                                     skip_tokenizer_init=True, max_model_len=2048),
            scheduler_config=SchedulerConfig(
                max_model_len=2048, is_encoder_decoder=False, max_num_seqs=8,
                max_num_batched_tokens=max_num_batched_tokens, policy=policy,
                long_prefill_token_threshold=long_prefill_token_threshold,
                # Admit a request when its first chunk fits, so that a later chunk can
                # preempt another request (the admission gate would avoid preemption).
                scheduler_reserve_full_isl=False,
            ),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching),
            kv_transfer_config=KVTransferConfig(
                kv_connector="KVDepotConnector", kv_connector_module_path="kvdepot.integrations.vllm",
                kv_role="kv_both", kv_connector_extra_config=cfg,
            ),
            device_config=DeviceConfig("cpu"),
        )
        kv_cache_config = KVCacheConfig(
            num_blocks=num_blocks, kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(LAYER_NAMES, FullAttentionSpec(
                block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16))],
        )
        vllm_config.cache_config.num_gpu_blocks = num_blocks
        self.server = server
        self.kv = PrefixKV(num_blocks)
        # As vLLM starts an engine: workers register their KV caches, then the scheduler is
        # built and given the workers' handshake metadata.
        self.worker = KVDepotConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
        self.worker.register_kv_caches(self.kv.tensors())
        self.scheduler = Scheduler(
            vllm_config=vllm_config, kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(vllm_config), block_size=BLOCK,
        )
        self.spec = self.worker.get_handshake_metadata().spec
        self.scheduler.connector.set_xfer_handshake_metadata_pp_aware(
            {(0, 0): self.worker.get_handshake_metadata()})
        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self._block_hasher = get_request_block_hasher(BLOCK, hash_fn)
        self.steps = 0
        self.outputs: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}
        self.preempted: list[str] = []
        self.external: dict[str, list[int]] = {}  # per request: tokens vLLM took from the connector
        self._watch_connector()
        if wait_ready:
            self.wait_ready()

    def _watch_connector(self) -> None:
        """Checks on the scheduler connector's answers as vLLM calls it: a repeated
        get_num_new_matched_tokens (vLLM calls it again and again) must give the same
        answer; the external tokens vLLM takes are recorded."""
        conn = self.scheduler.connector
        lookup, after_alloc = conn.get_num_new_matched_tokens, conn.update_state_after_alloc

        def get_num_new_matched_tokens(request, num_computed_tokens):
            first = lookup(request, num_computed_tokens)
            if first[0] is not None:
                again = lookup(request, num_computed_tokens)
                assert again == first, (
                    f"get_num_new_matched_tokens({request.request_id}, {num_computed_tokens}) "
                    f"answered {first} then {again}")
            return first

        def update_state_after_alloc(request, blocks, num_external_tokens):
            if num_external_tokens:
                self.external.setdefault(request.request_id, []).append(num_external_tokens)
            return after_alloc(request, blocks, num_external_tokens)

        conn.get_num_new_matched_tokens = get_num_new_matched_tokens
        conn.update_state_after_alloc = update_state_after_alloc

    def wait_ready(self, timeout: float = 20.0) -> None:
        sched, worker = self.scheduler.connector._sched, self.worker._worker
        deadline = time.monotonic() + timeout
        while not (sched.active and worker.transfers.link.ns is not None
                   and worker.transfers.copiers.current is not None):
            assert time.monotonic() < deadline, "the connector never registered with the server"
            time.sleep(0.01)

    # --- requests --------------------------------------------------------------------------

    def add(self, req_id: str, tokens: Sequence[int], max_tokens: int, priority: int = 0):
        from vllm import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        req = Request(request_id=req_id, prompt_token_ids=list(tokens), sampling_params=params,
                      pooling_params=None, priority=priority, block_hasher=self._block_hasher)
        self.scheduler.add_request(req)
        return req

    def abort(self, req_id: str, error: bool = False) -> None:
        """The API server's abort (or vLLM finishing a request with an error)."""
        from vllm.v1.request import RequestStatus

        status = RequestStatus.FINISHED_ERROR if error else RequestStatus.FINISHED_ABORTED
        for req in self.scheduler.finish_requests(req_id, status):
            self.finished[req.request_id] = status.name

    def status(self, req_id: str) -> str | None:
        req = self.scheduler.requests.get(req_id)
        return None if req is None else req.status.name

    # --- one engine step -------------------------------------------------------------------

    def step(self, *, after_schedule: Callable[[], None] | None = None,
             after_forward: Callable[[], None] | None = None) -> int:
        """One step; returns the number of tokens it computed. ``after_schedule`` runs before
        the worker sees the step; ``after_forward`` after the worker's hooks and before the
        scheduler takes the output (where EngineCore processes aborts that came meanwhile)."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        so = self.scheduler.schedule()
        self.preempted.extend(so.preempted_req_ids or ())
        if after_schedule is not None:
            after_schedule()
        w = self.worker
        w.handle_preemptions(so.kv_connector_metadata)
        w.bind_connector_metadata(so.kv_connector_metadata)
        sync = bool(getattr(so, "has_sync_kv_loads", False))
        if sync:
            w.start_load_kv(None)
        sampled = self._forward(so)
        if not sync:
            w.start_load_kv(None)
        w.wait_for_save()
        done = w.get_transfer_results(so.finished_req_ids)  # get_finished, in vLLM 0.32
        kv_output = KVConnectorOutput(
            finished_sending=done.finished_sending, finished_recving=done.finished_recving,
            failed_recving=done.failed_recving, invalid_block_ids=w.get_block_ids_with_load_errors(),
            kv_connector_stats=w.get_kv_connector_stats(),
            kv_connector_worker_meta=w.build_connector_worker_meta(),
        )
        w.clear_connector_metadata()
        if after_forward is not None:
            after_forward()
        req_ids = list(so.num_scheduled_tokens)
        out = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[sampled.get(r, []) for r in req_ids], kv_connector_output=kv_output,
        )
        for eco in self.scheduler.update_from_output(so, out).values():
            for o in eco.outputs:
                self.outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finish_reason is not None:
                    self.finished.setdefault(o.request_id, str(o.finish_reason))
        self._verify_loaded(done.finished_recving or ())
        self.steps += 1
        return so.total_num_scheduled_tokens

    def _forward(self, so) -> dict[str, list[int]]:
        """The model stand-in: check what each request already computed, then compute."""
        starts = {new.req_id: new.num_computed_tokens for new in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens))
        sampled = {}
        for req_id, n in so.num_scheduled_tokens.items():
            req, start = self.scheduler.requests[req_id], starts[req_id]
            blocks = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            tokens = req.all_token_ids
            self.kv.verify(req_id, tokens, blocks, start,
                           f"step {self.steps}, before computing [{start}, {start + n})")
            self.kv.write(req_id, tokens, blocks, start, start + n)
            if start + n >= req.num_tokens:
                sampled[req_id] = [self.kv.sample(req_id, tokens, start + n)]
        return sampled

    def _verify_loaded(self, recving) -> None:
        from vllm.v1.request import RequestStatus

        for req_id in recving:
            req = self.scheduler.requests.get(req_id)
            if req is not None and req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                blocks = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
                self.kv.verify(req_id, req.all_token_ids, blocks, req.num_computed_tokens,
                               f"step {self.steps - 1}, after its load")

    # --- running ---------------------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None, timeout: float = 30.0, **hooks) -> None:
        """Step as EngineCore does while the scheduler has requests (finished ones whose
        blocks the connector still holds included), or until ``until()``; ``hooks`` go to
        every step."""
        deadline = time.monotonic() + timeout
        while self.scheduler.has_requests() and not (until is not None and until()):
            if time.monotonic() > deadline:
                raise AssertionError(f"still busy after {timeout}s: {self.describe()}")
            if self.step(**hooks) == 0:
                time.sleep(0.002)  # the engine would spin; leave the cores to the I/O thread

    def run_until_finished(self, *req_ids: str, timeout: float = 30.0) -> None:
        self.run(until=lambda: all(r in self.finished for r in req_ids), timeout=timeout)
        missing = [r for r in req_ids if r not in self.finished]
        assert not missing, f"{missing} never finished: {self.describe()}"

    def describe(self) -> str:
        s = self.scheduler
        return (f"step {self.steps}; requests {[(r, q.status.name, q.num_computed_tokens) for r, q in s.requests.items()]}; "
                f"free blocks {s.kv_cache_manager.block_pool.get_num_free_blocks()}")

    def probe(self, tokens: Sequence[int], timeout: float = 5.0) -> int:
        """Ask the scheduler connector, as vLLM would for a new request, twice; the answers
        must agree. Returns the tokens offered. The probe request then finishes unscheduled,
        and one empty step lets the connector release what the lookup held."""
        from vllm import SamplingParams
        from vllm.v1.request import Request

        conn = self.scheduler.connector
        req = Request(request_id=f"probe-{self.steps}-{time.monotonic_ns()}", prompt_token_ids=list(tokens),
                      sampling_params=SamplingParams(max_tokens=1), pooling_params=None,
                      block_hasher=self._block_hasher)
        deadline = time.monotonic() + timeout
        while (answer := conn.get_num_new_matched_tokens(req, 0))[0] is None:
            assert time.monotonic() < deadline, "the lookup was never answered"
            time.sleep(0.005)
        conn.request_finished(req, [])
        self.step()
        return answer[0]

    def check_clean(self, grace_s: float = 2.0) -> None:
        """Every request done and every block back (vLLM's own no-leak conditions); on the
        server no lease and no reservation left, without any further engine step."""
        self.run()
        s = self.scheduler
        assert not s.requests and not s.running and not len(s.waiting), self.describe()
        assert not s.finished_recving_kv_req_ids and not s.failed_recving_kv_req_ids
        pool = s.kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1, self.describe()
        assert all(b.ref_cnt == 0 for b in pool.blocks), "a block still referenced"
        self.server.wait_clean(grace_s)

    def close(self) -> None:
        self.scheduler.shutdown()
        self.worker.shutdown()
