"""The connector's scheduler and worker halves, driven directly with real tensors and a real
kvdepot server, without a vLLM engine: TP rank logic, partial-chunk loads, load errors,
leases, server outages, layouts, settings, plugin registration, statistics."""

from __future__ import annotations

import logging
import os
import sys
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

sys.path.insert(0, os.path.dirname(__file__))
import vllm_support as vs  # noqa: E402

from kvdepot.integrations.vllm import compat  # noqa: E402
from kvdepot.integrations.vllm.config import settings_from_extra_config  # noqa: E402
from kvdepot.integrations.vllm.metadata import KVDepotMetadata  # noqa: E402
from kvdepot.integrations.vllm.scheduler_side import SchedulerSide  # noqa: E402
from kvdepot.integrations.vllm.stats import KVDepotStats  # noqa: E402
from kvdepot.integrations.vllm.worker_side import WorkerSide  # noqa: E402
from kvdepot.client import KVDepotError  # noqa: E402
from kvdepot.connector.specs import LoadSpec, StoreSpec  # noqa: E402
from kvdepot.protocol import KEY_BYTES  # noqa: E402

BS = 16  # engine block size (GPU-like), 16 blocks per 256-token chunk
NUM_BLOCKS = 96
LAYERS, HEADS, HEAD = 2, 2, 32


@pytest.fixture(scope="module")
def server():
    srv = vs.KVDepotServer(cpu_buffer_gb=0.25).start()
    yield srv
    srv.stop()


def settings(port, **kw):
    extra = {"kvdepot.host": "127.0.0.1", "kvdepot.port": port, "kvdepot.retry_s": 0.2}
    extra.update({f"kvdepot.{k}": v for k, v in kw.items()})
    return settings_from_extra_config(extra)


def cpu_kv(seed: int, layers=LAYERS, heads=HEADS, blocks=NUM_BLOCKS, zero=False):
    """vLLM's CPU backend shape: per layer [blocks, heads, block_size, 2*head] views of one buffer."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.zeros(layers, blocks, heads, BS, 2 * HEAD, dtype=torch.bfloat16)
    if not zero:
        buf.copy_(torch.randn(buf.shape, generator=g))
    return {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(layers)}


def make_worker(port, kv, rank=0, world=2, **kw):
    w = WorkerSide(settings(port, **kw), model="tiny", rank=rank, world_size=world,
                   block_size=BS, num_blocks=NUM_BLOCKS, engine_id=f"unit-{os.getpid()}")
    w.register_kv_caches(kv)
    assert w.spec is not None, w.layout_error
    return w


def make_scheduler(port, spec, **kw):
    kw.setdefault("load_mode", "async")  # most tests follow the asynchronous path
    s = SchedulerSide(settings(port, **kw), block_size=BS, engine_id=f"unit-{os.getpid()}")
    s.set_namespace_spec(spec)
    deadline = time.monotonic() + 10
    while not s.active:
        assert time.monotonic() < deadline, "scheduler never registered"
        time.sleep(0.01)
    return s


class Req:
    _n = 0

    def __init__(self, tokens):
        Req._n += 1
        self.request_id = f"req-{Req._n}"
        self.prompt_token_ids = list(tokens)
        self.all_token_ids = list(tokens)
        self.lora_request = None
        self.cache_salt = None
        self.mm_features = []


def sched_output(new=(), preempted=()):
    """A SchedulerOutput-shaped object: new = [(req, block_ids, num_computed, num_scheduled)]."""
    return SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(req_id=r.request_id, block_ids=(list(b),), num_computed_tokens=c)
            for r, b, c, _ in new
        ],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
        ),
        num_scheduled_tokens={r.request_id: n for r, _, _, n in new},
        preempted_req_ids=set(preempted),
    )


def blocks_of(ids):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def drain(worker, finished=(), want_recv=(), want_send=(), timeout=10.0, meta=None):
    """Call get_finished like vLLM does each step until the wanted ids show up; ``meta`` is
    the first step's metadata (the scheduler's word on which finished requests hold blocks)."""
    recv, send, errors = set(), set(), set()
    finished = set(finished)
    deadline = time.monotonic() + timeout
    while not (set(want_recv) <= recv and set(want_send) <= send):
        assert time.monotonic() < deadline, (recv, send)
        s, r = worker.get_finished(finished, meta)
        finished, meta = set(), None
        recv |= r or set()
        send |= s or set()
        errors |= worker.get_block_ids_with_load_errors()
        time.sleep(0.005)
    return recv, send, errors


def wait_stores(worker, timeout=10.0):
    deadline = time.monotonic() + timeout
    while worker.transfers.storing():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def save(worker, meta, tries=3):
    """wait_for_save, then wait until the I/O thread is done; a store the server refused for a
    transient reason (a dropped session) is sent again, as the next step's would be."""
    want = sum(s.num_chunks for s in meta.stores)
    for _ in range(tries):
        before = worker.counters["stored_chunks"] + worker.counters["store_skipped_chunks"]
        worker.wait_for_save(meta)
        wait_stores(worker)
        if worker.counters["stored_chunks"] + worker.counters["store_skipped_chunks"] - before >= want:
            return
        time.sleep(0.3)  # past the worker's reconnection interval
    raise AssertionError(f"stores not done: {worker.counters}")


def lookup_until_answered(sched, req, computed=0, retries=3):
    """Ask like vLLM does each step until answered; a failed lookup (a miss for vLLM) is asked
    again a few times, so a transient session drop does not read as a miss here."""
    for _ in range(1000):
        errors = sched.counters["lookup_errors"]
        n, is_async = sched.get_num_new_matched_tokens(req, computed)
        if n is None:
            time.sleep(0.002)
            continue
        if sched.counters["lookup_errors"] > errors and retries:
            retries -= 1
            time.sleep(0.05)
            continue
        return n, is_async
    raise AssertionError("lookup never answered")


def layer_blocks(kv, ids):
    return [t[list(ids)].clone() for t in kv.values()]


def wait_prepared(worker, timeout=10.0):
    """Until the worker has registered and mapped the arena (its I/O thread does it at start)."""
    deadline = time.monotonic() + timeout
    while worker.transfers.copiers.current is None:
        assert time.monotonic() < deadline, "the worker never prepared its copier"
        time.sleep(0.01)


def store_prompt(port, seed, n_tokens=512):
    """Engine A (one rank) computes and stores a prompt of whole chunks in blocks 0..; returns
    its KV, worker, scheduler and the tokens."""
    kv = cpu_kv(seed)
    worker = make_worker(port, kv, world=1)
    sched = make_scheduler(port, worker.spec)
    tokens = vs.random_prompt(n_tokens, seed=seed)
    req = Req(tokens)
    lookup_until_answered(sched, req)
    blocks = range(n_tokens // BS)
    save(worker, sched.build_connector_meta(sched_output([(req, blocks, 0, n_tokens)])))
    return kv, worker, sched, tokens


# --- tensor parallelism: every rank its own shard, hits only when all ranks have it ----------


def test_tp2_ranks_store_and_load_their_own_shards(server):
    kv_a = [cpu_kv(1), cpu_kv(2)]  # engine A, ranks 0 and 1 (different shards)
    wa = [make_worker(server.port, kv_a[r], rank=r) for r in range(2)]
    assert wa[0].spec == wa[1].spec  # same namespace on every rank
    sched_a = make_scheduler(server.port, wa[0].spec)
    tokens = vs.random_prompt(600, seed=11)
    req = Req(tokens)
    assert lookup_until_answered(sched_a, req) == (0, False)
    sched_a.update_state_after_alloc(req, blocks_of(range(38)), 0)
    meta = sched_a.build_connector_meta(sched_output([(req, range(38), 0, 600)]))
    assert meta.loads == [] and len(meta.stores) == 1
    assert meta.stores[0].num_chunks == 2 and meta.stores[0].block_ids == list(range(32))

    # Rank 0 alone has stored: not a hit yet, a load would miss rank 1's shard.
    save(wa[0], meta)
    probe = make_scheduler(server.port, wa[0].spec)
    assert lookup_until_answered(probe, Req(tokens)) == (0, False)
    save(wa[1], meta)
    time.sleep(0.6)  # past the probe's remembered miss
    probe_req = Req(tokens)
    assert lookup_until_answered(probe, probe_req) == (512, True)
    assert probe.request_finished(probe_req, []) == (False, None)  # its lease goes too
    probe.build_connector_meta(sched_output())

    # The request ends: blocks are kept until both ranks report their stores done.
    assert sched_a.request_finished(req, list(range(38))) == (True, None)
    end = sched_a.build_connector_meta(sched_output())
    assert end.held_for_stores == [req.request_id]
    for w in wa:
        sent = drain(w, finished={req.request_id}, want_send={req.request_id}, meta=end)[1]
        assert sent == {req.request_id}

    # Engine B (fresh tensors) loads both chunks, each rank its own shard.
    kv_b = [cpu_kv(0, zero=True), cpu_kv(0, zero=True)]
    wb = [make_worker(server.port, kv_b[r], rank=r) for r in range(2)]
    sched_b = make_scheduler(server.port, wb[0].spec)
    req_b = Req(tokens)
    assert lookup_until_answered(sched_b, req_b) == (512, True)
    target = list(range(50, 88))
    sched_b.update_state_after_alloc(req_b, blocks_of(target), 512)
    meta_b = sched_b.build_connector_meta(sched_output())
    assert [s.req_id for s in meta_b.loads] == [req_b.request_id]
    load = meta_b.loads[0]
    assert load.rank_offsets(0) != load.rank_offsets(1)  # each rank its own slots, no Acquire
    assert meta_b.stores == []  # nothing of a not-yet-scheduled request is stored
    for w in wb:
        w.start_load_kv(meta_b)
    for r, w in enumerate(wb):
        recv, _, errors = drain(w, want_recv={req_b.request_id})
        assert errors == set()
        for got, want in zip(layer_blocks(kv_b[r], target[:32]), layer_blocks(kv_a[r], range(32))):
            assert torch.equal(got, want)
    # The scheduler's lease is released once vLLM reports the load done.
    sched_b.update_connector_output(SimpleNamespace(finished_recving={req_b.request_id}))
    sched_b.build_connector_meta(sched_output())
    assert server.stats().leases_held == 0
    for x in [*wa, *wb]:
        x.shutdown()
    for s in (sched_a, sched_b, probe):
        s.close()


def test_partial_chunk_load_leaves_locally_cached_blocks_alone(server):
    kv_a = cpu_kv(5)
    wa = make_worker(server.port, kv_a, world=1)
    sched = make_scheduler(server.port, wa.spec)
    tokens = vs.random_prompt(520, seed=12)
    req = Req(tokens)
    lookup_until_answered(sched, req)
    meta = sched.build_connector_meta(sched_output([(req, range(33), 0, 520)]))
    save(wa, meta)

    kv_b = cpu_kv(0, zero=True)
    sentinel = torch.full_like(kv_b["model.layers.0.self_attn.attn"][0], 7.0)
    target = list(range(40, 73))
    for t in kv_b.values():
        t[target[:5]] = sentinel  # vLLM's own prefix cache holds the first 5 blocks (80 tokens)
    wb = make_worker(server.port, kv_b, world=1)
    sched_b = make_scheduler(server.port, wb.spec)
    req_b = Req(tokens)
    assert lookup_until_answered(sched_b, req_b, computed=80) == (512 - 80, True)
    sched_b.update_state_after_alloc(req_b, blocks_of(target), 512 - 80)
    meta_b = sched_b.build_connector_meta(sched_output())
    assert meta_b.loads[0].block_ids[:5] == [-1] * 5  # never written
    wb.start_load_kv(meta_b)
    _, _, errors = drain(wb, want_recv={req_b.request_id})
    assert errors == set()
    for name in kv_b:
        assert torch.equal(kv_b[name][target[:5]], sentinel.expand(5, *sentinel.shape))
        assert torch.equal(kv_b[name][target[5:32]], kv_a[name][5:32])
    for x in (wa, wb):
        x.shutdown()
    sched.close()
    sched_b.close()


def test_load_from_the_lookups_offsets_enqueued_by_the_engine_thread(server):
    kv_a, wa, sched, tokens = store_prompt(server.port, seed=21)

    kv_b = cpu_kv(0, zero=True)
    wb = make_worker(server.port, kv_b, world=1)
    wait_prepared(wb)  # at registration, before any load
    # On a GPU the worker enqueues loads on the engine thread (its copies are asynchronous);
    # the CPU copier takes that path here so its bookkeeping runs without a GPU.
    wb.transfers.copiers.direct = (wb.transfers.link.client.boot_id, wb.transfers.copiers.current)
    before = server.stats()
    req = Req(tokens)
    assert lookup_until_answered(sched, req) == (512, True)
    target = list(range(40, 72))
    sched.update_state_after_alloc(req, blocks_of(target), 512)
    meta = sched.build_connector_meta(sched_output())
    spec = meta.loads[0]
    assert spec.boot_id == wb.transfers.link.client.boot_id and spec.rank_offsets(0) is not None
    wb.start_load_kv(meta)
    assert not wb.transfers._loads  # nothing went to the I/O thread: no Acquire round trip
    _, _, errors = drain(wb, want_recv={req.request_id})
    assert errors == set()
    for got, want in zip(layer_blocks(kv_b, target), layer_blocks(kv_a, range(32))):
        assert torch.equal(got, want)
    assert wb.counters["loaded_chunks"] == 2
    # The scheduler's lease is the only one; released as read once vLLM reports the load.
    assert server.stats().leases_held == before.leases_held + 1
    sched.update_connector_output(SimpleNamespace(finished_recving={req.request_id}))
    sched.build_connector_meta(sched_output())
    after = server.stats()
    assert after.leases_held == before.leases_held
    assert after.retrieved_chunks == before.retrieved_chunks + 2

    # Offsets the arena does not have: the load fails to start, its blocks are reported for
    # recompute, nothing is written, the engine goes on.
    bad = LoadSpec("bad", spec.keys, list(range(72, 104)), offsets=[1 << 50, 1 << 50],
                   boot_id=spec.boot_id)
    wb.start_load_kv(KVDepotMetadata(chunk_tokens=256, loads=[bad]))
    _, _, errors = drain(wb, want_recv={"bad"})
    assert errors == set(range(72, 104))
    assert not kv_b["model.layers.0.self_attn.attn"][72:104].any()
    for x in (wa, wb):
        x.shutdown()
    sched.close()


def test_sync_load_when_alone_lands_before_the_step_and_reports_nothing(server):
    kv_a, wa, sched_a, tokens = store_prompt(server.port, seed=31)

    kv_b = cpu_kv(0, zero=True)
    wb = make_worker(server.port, kv_b, world=1)
    sched = make_scheduler(server.port, wb.spec, load_mode="auto")
    before = server.stats()
    req = Req(tokens)
    # Alone: synchronous (vLLM schedules it at once; the copy lands before its forward). The
    # whole prompt is cached, but vLLM computes one token itself: one less is offered, the
    # whole last block is still loaded.
    assert lookup_until_answered(sched, req) == (511, False)
    target = list(range(40, 72))
    sched.update_state_after_alloc(req, blocks_of(target), 511)
    meta = sched.build_connector_meta(sched_output([(req, target, 511, 1)]))
    assert meta.loads[0].sync and meta.loads[0].block_ids == target
    wb.start_load_kv(meta)  # returns once the bytes are in the blocks
    for got, want in zip(layer_blocks(kv_b, target), layer_blocks(kv_a, range(32))):
        assert torch.equal(got, want)
    assert wb.get_block_ids_with_load_errors() == set()
    assert wb.get_finished(set(), meta) == (None, None)  # nothing waits for a report
    assert wb.counters["loaded_chunks"] == 2
    # Its lease is held while the request lives, released as read when it finishes.
    assert server.stats().leases_held == before.leases_held + 1
    # A second request while the first still runs: asynchronous, so the first never waits.
    other = Req(tokens)
    assert lookup_until_answered(sched, other) == (512, True)
    assert sched.request_finished(other, []) == (False, None)
    assert sched.request_finished(req, target) == (False, None)
    sched.build_connector_meta(sched_output())
    after = server.stats()
    assert after.leases_held == before.leases_held
    assert after.retrieved_chunks == before.retrieved_chunks + 2

    # A synchronous load the server cannot serve (chunks it never had): its blocks come back
    # with the same step, for vLLM to recompute, and nothing is written.
    bad = LoadSpec("bad", bytes(2 * KEY_BYTES), list(range(0, 32)), sync=True)
    wb.start_load_kv(KVDepotMetadata(chunk_tokens=256, loads=[bad]))
    assert wb.get_block_ids_with_load_errors() == set(range(0, 32))
    assert not kv_b["model.layers.0.self_attn.attn"][0:32].any()
    for x in (wa, wb):
        x.shutdown()
    sched_a.close()
    sched.close()


# --- failures: reported blocks, fast misses, one warning ------------------------------------


def test_load_after_server_restart_reports_every_block_for_recompute():
    srv = vs.KVDepotServer(cpu_buffer_gb=0.1).start()
    try:
        _, wa, sched, tokens = store_prompt(srv.port, seed=13)
        kv_b = cpu_kv(0, zero=True)
        wb = make_worker(srv.port, kv_b, world=1)
        wait_prepared(wb)
        req = Req(tokens)
        assert lookup_until_answered(sched, req) == (512, True)
        sched.update_state_after_alloc(req, blocks_of(range(40, 72)), 512)
        meta = sched.build_connector_meta(sched_output())
        old_boot = wb.transfers.link.client.boot_id
        srv.stop()  # the server goes away between the scheduler's lookup and the worker's load
        srv.start()
        # Once the worker has heard of the new boot (any call of its, here one from the test),
        # the scheduler's offsets are of a boot whose leases died with it: never used.
        deadline = time.monotonic() + 10
        while wb.transfers.link.client.boot_id == old_boot:
            assert time.monotonic() < deadline, "the worker never saw the new server"
            try:
                wb.transfers.link.client.stats()
            except KVDepotError:
                time.sleep(0.05)
        wb.start_load_kv(meta)
        recv, _, errors = drain(wb, want_recv={req.request_id})
        # Reported in the same get_finished round as the request itself.
        assert errors == set(range(40, 72))
        assert not kv_b["model.layers.0.self_attn.attn"][40:72].any()
        wa.shutdown()
        wb.shutdown()
        sched.close()
    finally:
        srv.stop()


def test_server_down_costs_nothing_and_warns_once(caplog):
    port = vs.free_port()  # nobody listens
    w = make_worker(port, cpu_kv(4), world=1, timeout_ms=300)
    s = SchedulerSide(settings(port, timeout_ms=300), block_size=BS, engine_id="down")
    with caplog.at_level(logging.INFO, logger="vllm.kvdepot"):
        s.set_namespace_spec(w.spec)
        req = Req(vs.random_prompt(700, seed=14))
        t0 = time.perf_counter()
        for _ in range(100):
            assert s.get_num_new_matched_tokens(req, 0) == (0, False)
        assert (time.perf_counter() - t0) / 100 < 0.001  # never waits for the server
        meta = s.build_connector_meta(sched_output([(req, range(44), 0, 700)]))
        assert meta.stores == []  # no namespace yet: nothing planned
        time.sleep(1.0)  # several reconnection attempts
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "kvdepot" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    # The server comes up on that port: the scheduler registers and hits work again.
    srv = vs.KVDepotServer(cpu_buffer_gb=0.1, port=port).start()
    try:
        deadline = time.monotonic() + 10
        while not s.active:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert lookup_until_answered(s, Req(vs.random_prompt(700, seed=14))) == (0, False)
    finally:
        s.close()
        w.shutdown()
        srv.stop()


def test_killed_server_turns_lookups_into_fast_misses():
    srv = vs.KVDepotServer(cpu_buffer_gb=0.1).start()
    w = make_worker(srv.port, cpu_kv(6), world=1)
    s = make_scheduler(srv.port, w.spec)
    try:
        srv.kill()
        time.sleep(0.2)
        t0 = time.perf_counter()
        n = None
        for _ in range(200):  # a lookup in flight at the kill may need its deadline, not more
            n, _ = s.get_num_new_matched_tokens(Req(vs.random_prompt(300, seed=15)), 0)
            if n is not None:
                break
            time.sleep(0.01)
        assert n == 0
        assert time.perf_counter() - t0 < 1.5
    finally:
        s.close()
        w.shutdown()
        srv.stop()


# --- leases ---------------------------------------------------------------------------------


def test_hit_that_vllm_does_not_use_releases_its_lease(server):
    w = make_worker(server.port, cpu_kv(8), world=1)
    s = make_scheduler(server.port, w.spec)
    tokens = vs.random_prompt(300, seed=16)
    r = Req(tokens)
    lookup_until_answered(s, r)
    save(w, s.build_connector_meta(sched_output([(r, range(19), 0, 300)])))
    req = Req(tokens)
    assert lookup_until_answered(s, req) == (256, True)
    assert server.stats().leases_held == 1
    # Called again (the request waited a step): no second lookup, no second lease.
    assert s.get_num_new_matched_tokens(req, 0) == (256, True)
    assert server.stats().leases_held == 1
    s.update_state_after_alloc(req, blocks_of(range(60, 79)), 0)  # vLLM took none of it
    s.build_connector_meta(sched_output())
    assert server.stats().leases_held == 0
    w.shutdown()
    s.close()


def test_preemption_waits_for_the_store_reading_its_blocks(server):
    w = make_worker(server.port, cpu_kv(9), world=1)
    s = make_scheduler(server.port, w.spec)
    req = Req(vs.random_prompt(1024, seed=17))
    lookup_until_answered(s, req)
    w.wait_for_save(s.build_connector_meta(sched_output([(req, range(64), 0, 1024)])))
    w.handle_preemptions(KVDepotMetadata(preempted={req.request_id}))
    assert not w.transfers.storing()  # its blocks may now be reused
    w.shutdown()
    s.close()


def test_store_plans_follow_the_steps_and_skip_loaded_chunks(server):
    """Chunked prefill stores each chunk once it is complete; resumed requests replace their
    block list; with store_decode, generated tokens are stored too; loaded chunks never are."""
    w = make_worker(server.port, cpu_kv(10), world=1)
    s = make_scheduler(server.port, w.spec, store_decode=True)
    req = Req(vs.random_prompt(600, seed=18))
    lookup_until_answered(s, req)
    meta = s.build_connector_meta(sched_output([(req, range(20), 0, 300)]))  # 300 of 600 tokens
    assert [x.block_ids for x in meta.stores] == [list(range(16))]
    cached = SimpleNamespace(req_ids=[req.request_id], resumed_req_ids=set(),
                             new_block_ids=[([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37],)],
                             num_computed_tokens=[300])
    step2 = SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                            num_scheduled_tokens={req.request_id: 300}, preempted_req_ids=set())
    meta = s.build_connector_meta(step2)  # 600 computed: chunk 1 complete, 88 prompt tokens left over
    assert [x.block_ids for x in meta.stores] == [list(range(16, 32))]
    # Decoding past 768 tokens: chunk 2 holds prompt and generated tokens.
    req.all_token_ids += vs.random_prompt(200, seed=19)
    cached.resumed_req_ids = {req.request_id}  # preempted and resumed: a new block list
    cached.new_block_ids = [(list(range(50, 100)),)]
    cached.num_computed_tokens = [770]
    step3 = SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                            num_scheduled_tokens={req.request_id: 1}, preempted_req_ids=set())
    meta = s.build_connector_meta(step3)
    # After a preemption every whole chunk is planned again out of the new blocks: a store
    # dropped at the preemption must not leave a hole (the server skips what it has).
    assert [x.block_ids for x in meta.stores] == [list(range(50, 98))]
    assert s.request_finished(req, []) == (True, None)  # stores were planned: keep the blocks
    w.shutdown()
    s.close()


# --- layouts --------------------------------------------------------------------------------


def _roundtrip(port, make_kv, world=1, is_mla=False):
    kv_a, kv_b = make_kv(True), make_kv(False)
    mk = lambda kv: WorkerSide(settings(port), model=f"layout-{id(make_kv)}", rank=0, world_size=world,  # noqa: E731
                               block_size=BS, num_blocks=NUM_BLOCKS, is_mla=is_mla)
    wa, wb = mk(kv_a), mk(kv_b)
    wa.register_kv_caches(kv_a)
    wb.register_kv_caches(kv_b)
    assert wa.spec == wb.spec and wa.spec is not None, wa.layout_error
    key_a = os.urandom(16)
    src, dst = list(range(3, 19)), list(range(60, 76))
    save(wa, KVDepotMetadata(chunk_tokens=256, stores=[StoreSpec("a", key_a, src)]))
    wb.start_load_kv(KVDepotMetadata(chunk_tokens=256, loads=[LoadSpec("b", key_a, dst)]))
    _, _, errors = drain(wb, want_recv={"b"})
    assert errors == set()
    wa.shutdown()
    wb.shutdown()
    return kv_a, kv_b, src, dst, wa.layout


def test_block_major_layout_roundtrip(server):
    # A block contiguous across layers (vLLM's cross-layer / BLHNC-style buffers).
    def make(fill):
        buf = torch.zeros(NUM_BLOCKS, LAYERS, HEADS, BS, 2 * HEAD, dtype=torch.bfloat16)
        if fill:
            buf.copy_(torch.randn(buf.shape))
        return {f"model.layers.{i}.attn": buf[:, i] for i in range(LAYERS)}

    kv_a, kv_b, src, dst, layout = _roundtrip(server.port, make)
    assert layout.block_major
    for n in kv_a:
        assert torch.equal(kv_b[n][dst], kv_a[n][src])


def test_split_kv_layout_roundtrip(server):
    # K and V as separate halves: [2, blocks, block_size, heads, head] per layer (FlashAttention).
    def make(fill):
        t = {f"model.layers.{i}.attn": torch.zeros(2, NUM_BLOCKS, BS, HEADS, HEAD, dtype=torch.float16) for i in range(LAYERS)}
        if fill:
            for x in t.values():
                x.copy_(torch.randn(x.shape))
        return t

    kv_a, kv_b, src, dst, layout = _roundtrip(server.port, make)
    assert layout.geometry.num_planes == 2 * LAYERS
    for n in kv_a:
        assert torch.equal(kv_b[n][:, dst], kv_a[n][:, src])


def test_mla_layout_roundtrip(server):
    def make(fill):
        t = {f"model.layers.{i}.attn": torch.zeros(NUM_BLOCKS, BS, 576, dtype=torch.bfloat16) for i in range(LAYERS)}
        if fill:
            for x in t.values():
                x.copy_(torch.randn(x.shape))
        return t

    kv_a, kv_b, src, dst, layout = _roundtrip(server.port, make, is_mla=True)
    assert layout.geometry.head_size_v == 0 and layout.geometry.num_kv_heads == 1
    for n in kv_a:
        assert torch.equal(kv_b[n][dst], kv_a[n][src])


# --- settings, versions, plugin, stats ------------------------------------------------------


def test_settings_accept_lmcache_keys_and_defaults():
    s = settings_from_extra_config({"lmcache.mp.host": "tcp://10.0.0.5", "lmcache.mp.port": "6001"})
    assert (s.host, s.port) == ("10.0.0.5", 6001)
    s = settings_from_extra_config({"kvdepot.host": "127.0.0.1", "kvdepot.port": 6000,
                                    "lmcache.mp.port": 1})
    assert (s.host, s.port) == ("127.0.0.1", 6000)  # our key wins
    d = settings_from_extra_config({})
    assert (d.host, d.port, d.load_failure_policy, d.store_decode) == ("localhost", 5555, "recompute", False)
    with pytest.raises(ValueError):
        settings_from_extra_config({"kvdepot.load_failure_policy": "ignore"})


def test_version_check():
    assert compat.check_vllm_version("0.32.0+cpu") == "0.32.0+cpu"
    with pytest.raises(compat.UnsupportedVLLMVersion, match="supports vLLM 0.26 to 0.33"):
        compat.check_vllm_version("0.25.1")
    compat.check_vllm_version("0.40.0")  # newer: a warning, not an error
    assert compat.parse_version("v0.33.1rc2") == (0, 33, 1)


def test_plugin_registers_once():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from kvdepot.integrations.vllm.plugin import register

    register()
    register()  # vLLM may load general plugins more than once per process
    cls = KVConnectorFactory.get_connector_class_by_name("KVDepotConnector")
    assert cls.__name__ == "KVDepotConnector" and cls.__module__.startswith("kvdepot.")


def test_stats_aggregate_over_workers_and_scheduler():
    a = KVDepotStats()
    a.data.update(hit_tokens=512, loaded_bytes=2_000_000)
    b = KVDepotStats()
    b.data.update(loaded_bytes=1_000_000, stored_chunks=3)
    c = a.aggregate(b)
    assert c.data["loaded_bytes"] == 3_000_000 and c.data["stored_chunks"] == 3
    assert c.reduce()["loaded_MB"] == 3.0 and not c.is_empty()
    assert KVDepotStats().is_empty()
